"""One optimizer step (training.step.Stepper) run alone: micro-batches, the loss, the orthogonal term,
clipping, the non-finite check and the allocator call."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from models import LLAMA_TARGETS, tiny_llama

from adalora_export import AdaLoraConfig, RankAllocator, adapted_layers, inject_adapters, orthogonal_regularizer
from adalora_export.training.data import Example, collate
from adalora_export.training.step import NonFiniteStep, Stepper, task_loss

CAUSAL = "causal_lm"


def adapted(config: AdaLoraConfig, seed: int = 0):
    model = tiny_llama(seed=seed)
    inject_adapters(model, config)
    model.train()
    return model


def stepper_for(model, config, lr=0.1, max_grad_norm=0.0) -> Stepper:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    allocator = RankAllocator(model, config, config.total_step)
    return Stepper(model, optimizer, allocator, CAUSAL, max_grad_norm=max_grad_norm)


def examples(n: int = 4, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):  # different lengths, so padding and the global token count matter
        ids = torch.randint(0, 128, (6 + 3 * i,), generator=g).tolist()
        out.append(Example(input_ids=ids, labels=ids))
    return out


def config(**kw) -> AdaLoraConfig:
    base = dict(init_r=4, target_r=2, tinit=0, tfinal=1, deltaT=1, total_step=4, target_modules=LLAMA_TARGETS)
    return AdaLoraConfig(**{**base, **kw})


def test_micro_batches_give_the_step_of_one_batch():
    cfg = config()
    one, two = adapted(cfg), adapted(cfg)
    data = examples()
    whole = stepper_for(one, cfg).step(1, [collate(data, 0)], lr=0.1)
    split = stepper_for(two, cfg).step(1, [collate(data[:1], 0), collate(data[1:], 0)], lr=0.1)
    assert whole.items == split.items == sum(len(e.input_ids) - 1 for e in data)
    assert split.loss == pytest.approx(whole.loss, rel=1e-5)
    for (name, a), (_, b) in zip(one.named_parameters(), two.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_loss_is_the_mean_over_loss_tokens_and_the_orthogonal_term_enters_the_gradient():
    cfg = config(orth_reg_weight=0.5)
    model = adapted(cfg)
    reference = copy.deepcopy(model)
    batch = collate(examples(), 0)
    # The expected loss and gradient norm, computed by hand on a copy.
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    task = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    (task + 0.5 * orthogonal_regularizer(reference)).backward()
    grads = [p.grad for p in reference.parameters() if p.requires_grad and p.grad is not None]
    expected_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()

    result = stepper_for(model, cfg).step(1, [batch], lr=0.1)
    assert result.loss == pytest.approx(task.item(), rel=1e-5)
    assert result.grad_norm == pytest.approx(expected_norm, rel=1e-4)
    assert result.orth == pytest.approx(orthogonal_regularizer(reference).item(), rel=1e-5)

    without = stepper_for(adapted(config(orth_reg_weight=0.0)), config(orth_reg_weight=0.0))
    assert without.step(1, [batch], lr=0.1).grad_norm != pytest.approx(expected_norm, rel=1e-4)


def test_clipping_bounds_the_update():
    cfg = config(tinit=2)  # no masking at step 1, so only the optimizer moves the parameters
    model = adapted(cfg)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    result = stepper_for(model, cfg, lr=1.0, max_grad_norm=1e-3).step(1, [collate(examples(), 0)], lr=1.0)
    assert result.grad_norm > 1e-3  # reported before clipping
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    moved = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a - b) for a, b in zip(after, before)]))
    assert moved.item() == pytest.approx(1e-3, rel=1e-3)  # SGD at lr 1 moves by the clipped gradient


def test_non_finite_loss_raises_before_the_optimizer_moves():
    cfg = config()
    model = adapted(cfg)
    _, layer = next(iter(adapted_layers(model)))
    with torch.no_grad():
        layer.lora_E[0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stepper = stepper_for(model, cfg)
    with pytest.raises(NonFiniteStep, match="not finite") as info:
        stepper.step(3, [collate(examples(), 0)], lr=0.1)
    assert info.value.step == 3 and math.isnan(info.value.loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], equal_nan=True, msg=name)


def test_the_allocator_runs_every_step_and_the_final_shrink_rebuilds_what_holds_parameters():
    cfg = config(total_step=4, tinit=0, tfinal=1, deltaT=1)
    model = adapted(cfg)
    stepper = stepper_for(model, cfg)
    budgets = []
    for step in range(1, 5):
        result = stepper.step(step, [collate(examples(seed=step), 0)], lr=0.05)
        budgets.append(result.allocation.budget)
    assert budgets[0] > budgets[-1] == stepper.allocator.target_budget  # the cubic schedule went down
    assert result.allocation.final
    ranks = [layer.rank for _, layer in adapted_layers(model)]
    assert sum(ranks) == stepper.allocator.target_budget and max(ranks) <= cfg.init_r
    # After the shrink the clipped parameters and the optimizer's are the model's current ones.
    current = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in stepper.trainable} == current
    assert {id(p) for g in stepper.optimizer.param_groups for p in g["params"]} >= current
    # And one more step trains at the final ranks without error.
    loss, _ = task_loss(model, collate(examples(), 0), CAUSAL)
    assert torch.isfinite(loss)
