"""Training in tests: the short schedule (as ``train()`` options and as CLI flags), the sentences it
trains on, one AdaLoRA loop of our core on random tokens, PEFT's own AdaLoRA loop (the oracle), and the
budget check of a finished run."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from models import WORDS

# 12 optimizer steps on 48 records; budget phase 3..8, final shrink at step 8 (tfinal 4), a checkpoint every 2 steps.
SHORT_SCHEDULE = {
    **dict(max_steps=12, batch_size=4, lr=1e-2, max_length=16, seed=3, save_steps=2, keep_checkpoints=0),
    **dict(adalora_init_r=4, adalora_target_r=2, adalora_tinit=2, adalora_tfinal=4, adalora_deltaT=2, lora_alpha=16),
}


def cli_flags(options: Mapping) -> list[str]:
    """``train()`` options as the ``train`` command's flags: {"max_steps": 12} -> ["--max_steps", "12"]."""
    return [text for name, value in options.items() for text in (f"--{name}", str(value))]


TRAIN_FLAGS = cli_flags(SHORT_SCHEDULE)


def sentences(n: int, seed: int) -> list[str]:
    """``n`` short sentences (4 to 9 words of WORDS)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(n)]


def write_data(path: Path, n: int = 48, seed: int = 0, **extra) -> Path:
    """``n`` sentences as {"text": ..., **extra} JSONL records (the ``train_data`` fixture: the defaults)."""
    path.write_text("".join(json.dumps({"text": t, **extra}) + "\n" for t in sentences(n, seed)), encoding="utf-8")
    return path


def train_adalora(
    model,
    config,
    total_step: int | None = None,
    *,
    steps: int | None = None,
    seed: int = 0,
    shape: tuple[int, int] = (4, 16),
    lr: float = 2e-2,
    vocab: int = 128,
    on_step: Callable | None = None,
):
    """Train ``model``, its adapters already injected, with our AdaLoRA core (allocator, orthogonal term)
    on random tokens: batches of ``shape`` drawn with ``seed``.

    Runs ``steps`` optimizer steps (default ``total_step``, itself ``config.total_step`` by default:
    through the final phase, so the layers end pruned to heterogeneous ranks), calling
    ``on_step(step, allocation, allocator, optimizer)`` after each allocation. Returns
    (allocator, optimizer, losses); the model is left in eval mode.
    """
    from adalora_export import RankAllocator, orthogonal_regularizer

    total_step = total_step or config.total_step
    allocator = RankAllocator(model, config, total_step=total_step)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(1, (steps or total_step) + 1):
        ids = torch.randint(0, vocab, shape, generator=g)
        loss = model(input_ids=ids, labels=ids).loss + config.orth_reg_weight * orthogonal_regularizer(model)
        loss.backward()
        optimizer.step()
        allocation = allocator.update_and_allocate(step, optimizer)
        if on_step is not None:
            on_step(step, allocation, allocator, optimizer)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return allocator, optimizer, losses


def train_peft(model, peft_config, batches: Iterable[torch.Tensor], lr: float):
    """PEFT's own AdaLoRA on ``model``: one AdamW step per batch of token ids (the labels too), then
    ``update_and_allocate``. Returns the PeftModel."""
    import peft

    peft_model = peft.get_peft_model(model, peft_config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    for step, ids in enumerate(batches, start=1):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        peft_model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    return peft_model


def assert_within_budget(run_dir: Path) -> None:
    """A finished run's adapter spends its budget: exactly (triplets) or, in parameters, at most LoRA at
    target_r's size and more than 80% of it (the next-best triplet did not fit)."""
    from adalora_export.sources import load_adapter

    pattern = json.loads((Path(run_dir) / "rank_pattern.json").read_text())
    adapter = load_adapter(Path(run_dir) / "adapter")
    if pattern["budget_unit"] == "triplets":
        assert 0 < sum(adapter.rank_pattern.values()) == pattern["budget"]
    else:
        assert 0.8 * pattern["budget"] < adapter.num_parameters() <= pattern["budget"]
