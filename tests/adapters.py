"""Random compact adapters at chosen ranks: in memory (``adapter_at_ranks``) or saved as a PEFT AdaLoRA
directory over a base directory (``make_adapter``)."""

from __future__ import annotations

from pathlib import Path

import torch


def adapter_at_ranks(
    model: torch.nn.Module,
    targets: list[str],
    ranks: list[int],
    init_r: int = 6,
    lora_alpha: float = 12.0,
    seed: int = 0,
    *,
    std: float = 0.2,
    e_std: float = 0.5,
    target_r: int | None = None,
    **meta,
):
    """An in-memory CompactAdapter of random A, E, B at heterogeneous ranks (cycling through ``ranks``,
    zeros included) on ``model``'s ``targets``: A and B drawn with ``std``, E with ``e_std``; ``meta``
    (task_type, extra_weights, base_model_name_or_path...) goes to CompactAdapter."""
    from transformers.pytorch_utils import Conv1D

    from adalora_export import AdaLoraConfig, CompactAdapter, ModuleAdapter
    from adalora_export.model import find_target_paths

    g = torch.Generator().manual_seed(seed)
    target_r = min(init_r, 2) if target_r is None else target_r
    config = AdaLoraConfig(init_r=init_r, target_r=target_r, lora_alpha=lora_alpha, target_modules=targets)
    modules = {}
    for i, path in enumerate(find_target_paths(model, targets)):
        layer = model.get_submodule(path)
        conv = isinstance(layer, Conv1D)
        in_f, out_f = layer.weight.shape if conv else layer.weight.shape[::-1]
        r = ranks[i % len(ranks)]
        modules[path] = ModuleAdapter(
            torch.randn(r, in_f, generator=g) * std,
            torch.randn(r, 1, generator=g) * e_std,
            torch.randn(out_f, r, generator=g) * std,
            fan_in_fan_out=conv,
        )
    return CompactAdapter(config, modules, **meta)


def make_adapter(base_dir: Path, out: Path, seed: int = 0, ranks: tuple[int, ...] = (2, 0, 3, 1)) -> Path:
    """A compact adapter over the family's default targets of ``base_dir`` (random A, E, B at varied
    ranks, rank 0 included), naming ``base_dir`` as its base, saved as a PEFT AdaLoRA directory.

    Tests take theirs from the ``tiny_adapter`` fixture (built once per session); call this for an
    adapter the test is going to change."""
    from transformers import AutoModelForCausalLM

    from adalora_export.formats.peft import save_adapter
    from adalora_export.model import default_target_modules

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    meta = dict(base_model_name_or_path=str(base_dir), task_type="causal_lm")
    adapter = adapter_at_ranks(model, default_target_modules(model), list(ranks), 4, 8.0, seed, **meta)
    return save_adapter(adapter, out)
