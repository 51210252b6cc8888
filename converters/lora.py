"""Export to a PEFT LoRA directory, for runtimes that know LoRA only (docs/design.md, "LoRA conversion").

Every layout bakes AdaLoRA's scale into the weights, ``lora_A = A * E`` (r x in) and
``lora_B = B * scale`` (out x r), and sets ``lora_alpha`` equal to ``r``, so that the LoRA scale
``alpha / r`` is 1 for every module whatever rule a runtime applies to the config (PEFT's own
``convert_to_lora`` does the same). Two layouts:

- ``compact``: each module at its own rank, no padding; ``rank_pattern`` and ``alpha_pattern`` give
  each module's rank (alpha equal to rank); modules at rank 0 carry no update and are left out.
  Smallest on disk; PEFT, transformers, onnxruntime-genai and vLLM apply it exactly.
- ``uniform``: every adapted module at the adapter's largest rank R, zero-padded (the padded
  triplets add exactly zero), rank-0 modules present as zeros, ``r == lora_alpha == R`` and no
  patterns: for runtimes that read ``r`` and ``lora_alpha`` only, refuse patterns (SGLang), stack a
  module type across layers (TGI, LoRAX) or divide one global alpha by each tensor's rank (llama.cpp).

Extra trained weights go along as ``modules_to_save``. README's "Serving a LoRA export" has the table.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from adalora_export.adapter import CompactAdapter
from adalora_export.errors import UserError
from adalora_export.formats.lora_dir import LORA_LAYOUTS
from adalora_export.formats.peft import PREFIX, extra_weight_tensors, peft_common_config, write_peft_dir
from adalora_export.io import check_output_path


def lora_factors(adapter: CompactAdapter, path: str, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) of module ``path`` with the scale baked in, zero-padded to ``rank`` when given."""
    m = adapter.modules[path]
    down, up = m.factors()
    up = up * adapter.scale
    if rank is not None and rank > m.rank:
        down = torch.cat([down, down.new_zeros(rank - m.rank, m.in_features)])
        up = torch.cat([up, up.new_zeros(m.out_features, rank - m.rank)], dim=1)
    return down.contiguous(), up.contiguous()


def export_lora(
    adapter: CompactAdapter, output: str | os.PathLike, overwrite: bool = False, layout: str = "compact"
) -> Path:
    """Write ``adapter`` as a PEFT LoRA directory in ``layout`` (``compact`` or ``uniform``)."""
    if layout not in LORA_LAYOUTS:
        raise UserError(f"unknown LoRA layout {layout!r}: expected one of {', '.join(LORA_LAYOUTS)}")
    check_output_path(output, overwrite)
    kept = {path: m.rank for path, m in adapter.modules.items() if m.rank > 0}
    if not kept:
        raise UserError("every module of the adapter has rank 0: there is no update to export as LoRA")
    top = max(kept.values())
    paths = sorted(kept) if layout == "compact" else list(adapter.modules)
    tensors = {}
    for path in paths:
        down, up = lora_factors(adapter, path, None if layout == "compact" else top)
        tensors[f"{PREFIX}{path}.lora_A.weight"] = down
        tensors[f"{PREFIX}{path}.lora_B.weight"] = up
    tensors.update(extra_weight_tensors(adapter))
    # Exact paths: PEFT wraps every module the names match, and a compact export has no rank-0 ones.
    config = peft_common_config(adapter, sorted(paths))
    config.update(peft_type="LORA", r=top, lora_alpha=top, use_rslora=False, use_dora=False)
    if layout == "compact":
        config.update(rank_pattern=dict(kept), alpha_pattern=dict(kept))
    return write_peft_dir(output, config, tensors, overwrite=overwrite)
