"""AdaLoRA inside a real transformers.Trainer run: allocator per optimizer step, orthogonal term, final shrink."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from adalora_export import AdaLoraConfig, adapted_layers, inject_adapters, orthogonal_regularizer
from adalora_export.hf import load_pretrained
from adalora_export.sources import load_adapter
from adalora_export.training.hf_trainer import AdaLoraTrainer

WORDS = [str(i) for i in range(40)]  # token ids 4..43: the records below count up from 0..29


class Snapshot(TrainerCallback):
    """Copies the adapters right after the step at which the allocator shrinks them."""

    def __init__(self, step: int):
        self.step, self.params = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.params = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("final_orth", [None, 0.0], ids=["paper", "no-final-orth"])
def test_trainer_run_reaches_the_target_budget(tmp_path, tiny_base, final_orth):
    base = tiny_base(words=WORDS)
    model = load_pretrained(base)
    config = AdaLoraConfig(
        init_r=6, target_r=2, tinit=2, tfinal=4, deltaT=2, lora_alpha=16, final_orth_reg_weight=final_orth
    )
    inject_adapters(model, config)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 30, (64,), generator=g)
    dataset = [{"input_ids": ids, "labels": ids} for ids in (starts[:, None] + torch.arange(8)).unbind(0)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=12,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        max_grad_norm=1.0,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    snapshot = Snapshot(step=8)  # total 12 - tfinal 4: the rank pattern is fixed at step 8
    trainer = AdaLoraTrainer(model=model, args=args, train_dataset=dataset, adalora_config=config, callbacks=[snapshot])

    batch = {k: torch.stack([dataset[i][k] for i in range(4)]) for k in ("input_ids", "labels")}
    model.train()
    with torch.no_grad():
        plain = model(**batch).loss
        assert trainer.compute_loss(model, batch) == pytest.approx(
            float(plain + config.orth_reg_weight * orthogonal_regularizer(model)), rel=1e-6
        )

    trainer.train()
    allocator = trainer.adalora.allocator
    assert trainer.adalora.last.final and allocator.frozen_mask is not None
    ranks = {path: layer.rank for path, layer in adapted_layers(model)}
    assert sum(ranks.values()) == config.target_r * len(ranks)  # the target budget, physically
    assert len(set(ranks.values())) > 1  # heterogeneous ranks
    # Trainer's optimizer holds exactly the shrunk parameters, and they kept training after the shrink.
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert {id(p) for p in lora.values()} <= held and len(held) == len(lora)
    moved = [n for n, p in lora.items() if p.numel() and not torch.equal(p, snapshot.params[n])]
    assert moved and all(snapshot.params[n].shape == lora[n].shape for n in lora)
    assert all(torch.isfinite(p).all() for p in lora.values())

    trainer.save_adapter(tmp_path / "adapter", task_type="causal_lm")
    saved = load_adapter(tmp_path / "adapter")
    assert saved.rank_pattern == ranks
    torch.testing.assert_close(
        saved.modules["model.layers.0.self_attn.q_proj"].E, lora["model.layers.0.self_attn.q_proj.lora_E"]
    )

    # Once the ranks are frozen, the loss carries the final phase's orthogonal weight.
    frozen_weight = config.orth_reg_weight if final_orth is None else final_orth
    with torch.no_grad():
        expected = model(**batch).loss + frozen_weight * orthogonal_regularizer(model)
        assert trainer.compute_loss(model, batch) == pytest.approx(float(expected), rel=1e-6)
