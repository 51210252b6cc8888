"""Step-for-step parity with PEFT's AdaLoRA through the whole budget phase (docs/design.md, "The algorithm")."""

from __future__ import annotations

import copy

import pytest
import torch
from models import LLAMA_TARGETS, tiny_llama

from adalora_export import AdaLoraConfig, RankAllocator, inject_adapters, orthogonal_regularizer

peft = pytest.importorskip("peft")

TOTAL, TINIT, TFINAL, DELTA_T = 20, 3, 4, 2


def make_pair(init_r=6, target_r=2):
    base = tiny_llama(seed=0)
    peft_cfg = peft.AdaLoraConfig(
        init_r=init_r,
        target_r=target_r,
        tinit=TINIT,
        tfinal=TFINAL,
        deltaT=DELTA_T,
        total_step=TOTAL,
        lora_alpha=8,
        target_modules=LLAMA_TARGETS,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_cfg)
    ours_cfg = AdaLoraConfig(
        init_r=init_r,
        target_r=target_r,
        tinit=TINIT,
        tfinal=TFINAL,
        deltaT=DELTA_T,
        lora_alpha=8,
        target_modules=LLAMA_TARGETS,
    )
    ours = copy.deepcopy(base)
    paths = inject_adapters(ours, ours_cfg)
    assert len(paths) == 2 * 7
    with torch.no_grad():  # start from PEFT's exact initial A, E, B
        for path in paths:
            mine, other = ours.get_submodule(path), theirs.base_model.model.get_submodule(path)
            for name in ("lora_A", "lora_E", "lora_B"):
                getattr(mine, name).copy_(getattr(other, name)["default"])
    return ours, ours_cfg, theirs


def batches(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (4, 16), generator=g) for _ in range(n)]


def test_budget_masks_and_losses_match_peft_through_budget_phase():
    ours, cfg, theirs = make_pair()
    allocator = RankAllocator(ours, cfg, total_step=TOTAL)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    peft_alloc = theirs.base_model.rankallocator
    assert allocator.init_budget == peft_alloc.init_bgt and allocator.target_budget == peft_alloc.target_bgt
    mask_steps = 0
    for step, ids in enumerate(batches(TOTAL - TFINAL), start=1):
        loss_theirs = theirs(input_ids=ids, labels=ids).loss
        out = ours(input_ids=ids, labels=ids)
        loss_ours = out.loss + cfg.orth_reg_weight * orthogonal_regularizer(ours)
        assert abs(loss_ours.item() - loss_theirs.item()) <= 1e-5, f"step {step}"
        loss_theirs.backward()
        loss_ours.backward()
        opt_theirs.step()
        opt_ours.step()
        theirs.base_model.update_and_allocate(step)
        result = allocator.update_and_allocate(step, opt_ours)
        assert result.budget == peft_alloc.budget_schedule(step)[0], f"budget differs at step {step}"
        if result.masked:
            mask_steps += 1
            pattern = theirs.peft_config["default"].rank_pattern
            for path, keep in allocator.current_mask.items():
                peft_keep = pattern[f"{path}.lora_E.default"] if f"{path}.lora_E.default" in pattern else None
                peft_keep = peft_keep if peft_keep is not None else pattern[f"{path}.lora_E"]
                assert keep == list(peft_keep), f"mask of {path} differs at step {step}"
            assert result.kept == result.budget
        opt_theirs.zero_grad()
        opt_ours.zero_grad()
    assert mask_steps >= 6  # the budget phase really masked, several times
    # At the final step PEFT zeroes the masked triplets; ours removed them. Same function:
    ids = batches(1, seed=9)[0]
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5
    ranks = [len([k for k in keep if k]) for keep in allocator.frozen_mask.values()]
    assert sum(ranks) == cfg.target_r * 14 and len(set(ranks)) > 1  # heterogeneous final ranks
