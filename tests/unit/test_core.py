"""The AdaLoRA core: layer, surgery, regularizer, allocator, and where PEFT goes wrong and we do not."""

from __future__ import annotations

import copy

import pytest
import torch
from adapters import adapter_at_ranks
from models import LLAMA_TARGETS, tiny_gpt2, tiny_llama
from torch import nn
from training import train_adalora
from transformers.pytorch_utils import Conv1D

from adalora_export import (
    AdaLoraConfig,
    CompactAdapter,
    RankAllocator,
    SVDLinear,
    UserError,
    adapted_layers,
    inject_adapters,
    orthogonal_regularizer,
    trainable_parameters,
)

# The batches these tests train on (training.train_adalora's random tokens): 4 x 12, seed 3.
BATCHES = dict(seed=3, shape=(4, 12))


def randomize_E(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.lora_E.copy_(torch.randn(layer.lora_E.shape, generator=g))


# ---------------------------------------------------------------- layer and surgery
@pytest.mark.parametrize("conv1d", [False, True])
def test_forward_matches_dense_delta_and_merge_unmerge_round_trip(conv1d):
    torch.manual_seed(0)
    base = Conv1D(24, 16) if conv1d else nn.Linear(16, 24)
    original = base.weight.detach().clone()
    layer = SVDLinear(base, rank=5, lora_alpha=8, init_r=5)
    with torch.no_grad():
        layer.lora_E.normal_()
    x = torch.randn(3, 7, 16)
    delta = layer.delta_weight()
    assert delta.shape == base.weight.shape
    dense = original + delta
    expected = x @ dense + base.bias if conv1d else x @ dense.T + base.bias
    out = layer(x)
    assert torch.allclose(out, expected, atol=1e-6)
    layer.merge()
    assert torch.allclose(layer(x), out, atol=1e-6)
    layer.unmerge()
    assert torch.allclose(base.weight, original, atol=1e-6)
    assert torch.allclose(layer(x), out, atol=1e-6)


def test_zero_init_keeps_base_output_and_only_adapters_train():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    paths = inject_adapters(model, AdaLoraConfig(target_modules=LLAMA_TARGETS))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    trainable, total = trainable_parameters(model)
    expected = sum(12 * (layer.in_features + layer.out_features + 1) for _, layer in adapted_layers(model))
    assert trainable == expected and total > trainable and len(paths) == 14


@pytest.mark.parametrize(
    "targets, count",
    [(["q_proj"], 2), (["self_attn.q_proj", "mlp.up_proj"], 4), (r"model\.layers\.1\..*_proj", 7), (None, 14)],
)
def test_target_selection_by_name_suffix_and_regex(targets, count):
    model = tiny_llama()
    assert len(inject_adapters(model, AdaLoraConfig(target_modules=targets))) == count


def test_gpt2_conv1d_path_trains_and_prunes():
    model = tiny_gpt2()
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=1, deltaT=1)
    inject_adapters(model, config)
    assert all(layer.fan_in_fan_out for _, layer in adapted_layers(model))
    allocator, _, losses = train_adalora(model, config, 8, **BATCHES)
    assert sum(layer.rank for _, layer in adapted_layers(model)) == allocator.target_budget
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_r": 13, "init_r": 12}, "must not exceed"),
        ({"init_r": 0, "target_r": 0}, "init_r must be an integer >= 1"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": 0.0}, "beta2"),
        ({"orth_reg_weight": -0.1}, "orth_reg_weight"),
        ({"train_type": "ia3"}, "unknown train_type"),
        ({"tinit": 5, "tfinal": 5, "total_step": 10}, "no budget phase"),
        ({"deltaT": 0}, "deltaT"),
    ],
)
def test_every_validation_error_is_a_clear_user_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        AdaLoraConfig(**kwargs)


def test_no_matching_target_is_a_user_error():
    with pytest.raises(UserError, match="match no"):
        inject_adapters(tiny_llama(), AdaLoraConfig(target_modules=["nothing_like_this"]))


def test_schedule_checked_against_total_step_before_training():
    model = tiny_llama()
    config = AdaLoraConfig(tinit=10, tfinal=10, target_modules=["q_proj"])
    inject_adapters(model, config)
    with pytest.raises(UserError, match="no budget phase"):
        RankAllocator(model, config, total_step=20)


# ---------------------------------------------------------------- allocator
def test_cubic_schedule_endpoints_and_monotone():
    model = tiny_llama()
    config = AdaLoraConfig(init_r=6, target_r=2, tinit=5, tfinal=10, deltaT=3, target_modules=["q_proj", "v_proj"])
    inject_adapters(model, config)
    allocator = RankAllocator(model, config, total_step=50)
    budgets = [allocator.budget_schedule(t)[0] for t in range(1, 51)]
    assert budgets[:5] == [24] * 5 and budgets[-10:] == [8] * 10
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert [allocator.budget_schedule(t)[1] for t in (5, 6, 7, 9, 41)] == [False, True, False, True, True]
    assert allocator.budget_schedule(40)[0] == 8  # the final step reaches the target budget exactly


def test_masks_exactly_b0_minus_budget_with_deterministic_ties():
    model = tiny_llama()
    config = AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj", "k_proj"])
    inject_adapters(model, config)
    allocator = RankAllocator(model, config, total_step=10)
    # All scores tie (zero EMAs): exactly 16 - 11 triplets masked, the earliest in model order.
    masks = allocator.mask_to_budget(11)
    flat = torch.cat([m for m in masks.values()])
    assert int((~flat).sum()) == 5
    assert flat[:5].tolist() == [False] * 5 and flat[5:].all()


def test_init_r_equal_target_r_trains_without_error_where_peft_fails():
    config = AdaLoraConfig(init_r=4, target_r=4, target_modules=LLAMA_TARGETS)
    model = tiny_llama()
    inject_adapters(model, config)
    allocator, _, _ = train_adalora(model, config, 6, **BATCHES)
    assert allocator.kept() == allocator.init_budget == allocator.target_budget
    # PEFT's kthvalue(k=0) raises on the same schedule.
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(
        tiny_llama(),
        peft.AdaLoraConfig(init_r=4, target_r=4, total_step=6, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM"),
    )
    ids = torch.randint(0, 128, (2, 8))
    theirs(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError):
        theirs.base_model.update_and_allocate(1)


def test_orthogonal_term_applied_for_a_bare_model_where_peft_skips_it():
    """A model without a task head returns no loss; PEFT then never adds the orthogonal term."""
    config = AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj"])
    ours = tiny_llama(causal_lm=False)
    inject_adapters(ours, config)
    ids = torch.randint(0, 128, (2, 8))
    loss = ours(input_ids=ids).last_hidden_state.pow(2).mean() + config.orth_reg_weight * orthogonal_regularizer(ours)
    loss.backward()
    # E = 0 at init, so the task loss gives A no gradient: only the orthogonal term can.
    assert all(layer.lora_A.grad.abs().sum() > 0 for _, layer in adapted_layers(ours))
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(
        tiny_llama(causal_lm=False), peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"])
    )
    theirs(input_ids=ids).last_hidden_state.pow(2).mean().backward()
    grads = [p.grad for n, p in theirs.named_parameters() if "lora_A" in n]
    assert all(g is None or g.abs().sum() == 0 for g in grads)
    reg = orthogonal_regularizer(ours)
    by_hand = []
    for _, layer in adapted_layers(ours):
        eye = torch.eye(layer.rank)
        by_hand += [torch.norm(layer.lora_A @ layer.lora_A.T - eye), torch.norm(layer.lora_B.T @ layer.lora_B - eye)]
    assert torch.allclose(reg, torch.stack(by_hand).mean())


def test_with_tfinal_zero_the_final_adapter_is_the_trained_model():
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=0, target_modules=LLAMA_TARGETS)
    model = tiny_llama()
    inject_adapters(model, config)
    allocator, _, _ = train_adalora(model, config, 10, **BATCHES)
    assert allocator.frozen_mask is not None  # fixed at the last step, not left at the last mask
    adapter = CompactAdapter.from_model(model, config)
    assert sum(adapter.rank_pattern.values()) == allocator.target_budget
    fresh = adapter.apply_to(tiny_llama())
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


def test_physical_shrink_keeps_outputs_and_training_continues_with_sliced_state():
    config = AdaLoraConfig(init_r=6, target_r=3, tinit=2, tfinal=4, target_modules=LLAMA_TARGETS)
    model = tiny_llama()
    inject_adapters(model, config)
    ids = torch.randint(0, 128, (2, 10))
    seen = {}

    def on_step(step, result, allocator, optimizer):
        if step == allocator.final_step - 1:
            seen["before"] = copy.deepcopy(model)
            seen["moments"] = {n: optimizer.state[l.lora_A]["exp_avg"].clone() for n, l in adapted_layers(model)}
        if step == allocator.final_step:
            masked = seen["before"]
            for name, layer in adapted_layers(masked):  # PEFT's way: zero E of the dropped triplets
                keep = torch.tensor(allocator.frozen_mask[name])
                with torch.no_grad():
                    layer.lora_E[~keep] = 0
                    # the surviving weights moved one more optimizer step since the copy; take them over
                    ours = model.get_submodule(name)
                    layer.lora_A[keep] = ours.lora_A
                    layer.lora_E[keep] = ours.lora_E
                    layer.lora_B[:, keep] = ours.lora_B
            with torch.no_grad():
                diff = (masked(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
            seen["diff"] = diff
            for _, layer in adapted_layers(model):
                state = optimizer.state[layer.lora_A]
                assert state["exp_avg"].shape == layer.lora_A.shape
                assert any(p is layer.lora_A for p in optimizer.param_groups[0]["params"])
            seen["ranks"] = {n: l.rank for n, l in adapted_layers(model)}

    allocator, optimizer, losses = train_adalora(model, config, 20, **BATCHES, on_step=on_step)
    assert seen["diff"] <= 1e-6
    assert sum(seen["ranks"].values()) == allocator.target_budget
    assert {n: l.rank for n, l in adapted_layers(model)} == seen["ranks"]  # frozen after the shrink
    assert losses[-1] < losses[allocator.final_step - 1]  # training went on after the shrink


def test_shrink_slices_optimizer_moments_exactly():
    layer = SVDLinear(nn.Linear(8, 6), rank=4, lora_alpha=8, init_r=4)
    for opt_cls, key in ((torch.optim.AdamW, "exp_avg_sq"), (torch.optim.SGD, "momentum_buffer")):
        kwargs = {"momentum": 0.9} if opt_cls is torch.optim.SGD else {}
        layer = SVDLinear(nn.Linear(8, 6), rank=4, lora_alpha=8, init_r=4)
        opt = opt_cls([layer.lora_A, layer.lora_E, layer.lora_B], lr=0.1, **kwargs)
        layer(torch.randn(5, 8)).pow(2).sum().backward()
        opt.step()
        before = opt.state[layer.lora_B][key].clone()
        layer.prune(torch.tensor([True, False, True, False]), opt)
        assert torch.equal(opt.state[layer.lora_B][key], before[:, [0, 2]])
        layer(torch.randn(5, 8)).pow(2).sum().backward()
        opt.step()  # the sliced state is used as is


def test_allocator_state_dict_round_trip_resumes_identically():
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, target_modules=["q_proj", "v_proj"])
    a, b = tiny_llama(), tiny_llama()
    inject_adapters(a, config)
    inject_adapters(b, config)
    b.load_state_dict(a.state_dict())
    alloc_a = RankAllocator(a, config, 10)
    alloc_b = RankAllocator(b, config, 10)
    randomize_E(a)
    randomize_E(b)
    for model, alloc in ((a, alloc_a), (b, alloc_b)):
        for _, layer in adapted_layers(model):
            for p in (layer.lora_A, layer.lora_E, layer.lora_B):
                p.grad = torch.ones_like(p)
        alloc.update_importance()
    state = alloc_a.state_dict()
    alloc_c = RankAllocator(b, config, 10)
    alloc_c.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(alloc_c.exp_avg_ipt, alloc_a.exp_avg_ipt))
    mask_c, mask_a = alloc_c.mask_to_budget(5), alloc_a.mask_to_budget(5)
    assert mask_c.keys() == mask_a.keys() and all(torch.equal(mask_c[k], mask_a[k]) for k in mask_a)
    assert alloc_c.current_mask == alloc_a.current_mask


def test_final_orth_reg_weight_option_switches_only_after_the_pattern_is_frozen():
    paper = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=3, target_modules=["q_proj"])
    option = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=3, target_modules=["q_proj"], final_orth_reg_weight=0)
    seen = []
    for config in (paper, option):
        model = tiny_llama()
        inject_adapters(model, config)
        train_adalora(
            model, config, 8, **BATCHES, on_step=lambda s, r, alloc, o: seen.append((s, alloc.orth_reg_weight))
        )
    assert [w for _, w in seen[:8]] == [0.5] * 8  # the paper's weight throughout
    assert [w for _, w in seen[8:]] == [0.5] * 4 + [0.0] * 4  # 0 from the final step (5) on
    with pytest.raises(UserError, match="final_orth_reg_weight"):
        AdaLoraConfig(final_orth_reg_weight=-1.0)


def _set_scores(allocator: RankAllocator, scores: list[list[float]]) -> None:
    """Make each layer's triplet scores exactly ``scores`` (E's sensitivity; A and B contribute 0)."""
    for i, layer_scores in enumerate(scores):
        for j in range(3):
            allocator.exp_avg_ipt[3 * i + j].zero_()
            allocator.exp_avg_unc[3 * i + j].fill_(1.0)
        allocator.exp_avg_ipt[3 * i + 1].copy_(torch.tensor(layer_scores).view(-1, 1))


def test_budget_in_parameters_keeps_the_best_triplets_that_fit_and_never_exceeds_lora():
    model = tiny_llama()  # q_proj 64 x 64 (a triplet costs 129), up_proj 64 -> 128 (costs 193)
    config = AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj", "up_proj"], budget_unit="params")
    inject_adapters(model, config)
    allocator = RankAllocator(model, config, total_step=10)
    costs = [layer.in_features + layer.out_features + 1 for _, layer in allocator.layers]
    assert sorted(set(costs)) == [129, 193]
    assert allocator.init_budget == 4 * sum(costs)
    assert allocator.target_budget == 2 * sum(c - 1 for c in costs)  # LoRA r=2's parameters on the same matrices
    # The up_proj triplets outscore every q_proj one: a triplet budget keeps the 8 of up_proj's two
    # layers (1,544 parameters, 21% over LoRA r=2's 1,280); the parameter budget keeps 6 (1,158).
    big = [i for i, c in enumerate(costs) if c == 193]
    scores = [[10.0 + k for k in range(4)] if i in big else [1.0 + k / 10 for k in range(4)] for i in range(len(costs))]
    _set_scores(allocator, scores)
    masks = allocator.mask_to_budget(allocator.target_budget)
    kept_cost = sum(int(m.sum()) * c for m, c in zip(masks.values(), costs))
    assert kept_cost <= allocator.target_budget
    # Kept best first: the next triplet by score would not have fitted.
    flat_scores = torch.tensor([s for layer in scores for s in layer])
    flat_keep = torch.cat(list(masks.values()))
    flat_cost = torch.tensor([c for c, layer in zip(costs, scores) for _ in layer])
    assert flat_scores[flat_keep].min() > flat_scores[~flat_keep].max()
    best_masked = int(torch.argmax(torch.where(flat_keep, -1.0, flat_scores)))
    assert kept_cost + int(flat_cost[best_masked]) > allocator.target_budget
    assert [int(m.sum()) for m in masks.values()] == [0, 3, 0, 3]  # q, up, q, up: ties to the later triplet

    triplets = AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj", "up_proj"])
    model = tiny_llama()
    inject_adapters(model, triplets)
    by_triplet = RankAllocator(model, triplets, total_step=10)
    _set_scores(by_triplet, scores)
    masks = by_triplet.mask_to_budget(by_triplet.target_budget)
    assert sum(int(m.sum()) * c for m, c in zip(masks.values(), costs)) > allocator.target_budget


def test_budget_in_parameters_trains_to_an_adapter_no_larger_than_lora_at_target_r():
    model = tiny_llama()
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=3, target_modules=LLAMA_TARGETS, budget_unit="params")
    inject_adapters(model, config)
    seen = []
    allocator, _, _ = train_adalora(model, config, 10, **BATCHES, on_step=lambda s, r, a, o: seen.append(r.budget))
    assert seen[0] == allocator.init_budget and seen[-1] == allocator.target_budget
    assert all(a >= b for a, b in zip(seen, seen[1:]))  # the cubic schedule, now in parameters
    adapter = CompactAdapter.from_model(model, config)
    lora_r2 = sum(2 * (layer.in_features + layer.out_features) for _, layer in adapted_layers(model))
    assert 0.9 * lora_r2 < adapter.num_parameters() <= lora_r2
    with pytest.raises(UserError, match="budget_unit"):
        AdaLoraConfig(budget_unit="bytes")


def test_a_parameter_budget_is_reported_in_parameters_and_survives_save_and_load(tmp_path):
    from adalora_export.formats.peft import read_adapter_dir, save_adapter
    from adalora_export.report import format_table

    model = tiny_llama()
    adapter = adapter_at_ranks(model, ["q_proj", "up_proj"], [2, 0, 3, 1], init_r=4)
    adapter.config.budget_unit, adapter.config.target_r = "params", 2
    s = adapter.summary()
    lora_r2 = sum(2 * (m.in_features + m.out_features) for m in adapter.modules.values())
    assert s["budget_unit"] == "params" and s["budget"] == lora_r2
    assert sum(m["share"] for m in s["modules"]) == adapter.num_parameters() / lora_r2
    line = f"total rank 6, {adapter.num_parameters():,} parameters against a budget of {lora_r2:,} (LoRA at r=2"
    assert line in format_table(adapter)
    loaded = read_adapter_dir(save_adapter(adapter, tmp_path / "adapter"))
    assert loaded.config.budget_unit == "params" and loaded.summary()["budget"] == lora_r2
