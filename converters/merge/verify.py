"""Checking a merged model against base + adapter unmerged, by running both."""

from __future__ import annotations

import os

import torch

from adalora_export.adapter import CompactAdapter
from adalora_export.hf import TASKS, load_pretrained


@torch.no_grad()
def verify_merge(
    adapter: CompactAdapter,
    base_dir: str | os.PathLike,
    merged_dir: str | os.PathLike,
    *,
    batches: int = 3,
    allow_pickle: bool = False,
) -> float:
    """Largest absolute difference of outputs (logits or hidden states) between base + adapter unmerged and
    the merged model, both run in fp32 on ``batches`` random sequences. One model in memory at a time."""
    base = adapter.apply_to(adapter.load_base(base_dir, allow_pickle=allow_pickle), base=str(base_dir))
    text = base.config.get_text_config()
    length = min(16, getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 16)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, text.vocab_size, (1, length), generator=g) for _ in range(batches)]
    expected = [_output(base(input_ids=ids)) for ids in inputs]
    del base
    task = adapter.task_type if adapter.task_type in TASKS else None  # else the merged config's architecture
    merged = load_pretrained(merged_dir, task, dtype=torch.float32).eval()
    return max((_output(merged(input_ids=ids)) - want).abs().max().item() for ids, want in zip(inputs, expected))


def _output(result) -> torch.Tensor:
    logits = getattr(result, "logits", None)
    return logits if logits is not None else result.last_hidden_state
