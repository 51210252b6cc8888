"""Export to a PEFT LoRA directory, for runtimes that know LoRA only (docs/design.md, "LoRA conversion").

Per module: ``lora_A = A * E`` (r x in), ``lora_B = B`` (out x r), ``rank_pattern[module] = r`` and
``alpha_pattern[module] = r * lora_alpha / (init_r + 1e-5)``, so LoRA's scale alpha / r equals AdaLoRA's
lora_alpha / (init_r + 1e-5) and the export computes the same update to float error. Modules at rank 0
carry no update and are left out; extra trained weights go along as ``modules_to_save``.
"""

from __future__ import annotations

import os
from pathlib import Path

from adalora_export.adapter import CompactAdapter
from adalora_export.errors import UserError
from adalora_export.formats import PREFIX, extra_weight_tensors, peft_common_config, write_peft_dir
from adalora_export.io import check_output_path


def export_lora(adapter: CompactAdapter, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``adapter`` as a PEFT LoRA directory."""
    check_output_path(output, overwrite)
    kept = {path: m for path, m in adapter.modules.items() if m.rank > 0}
    if not kept:
        raise UserError("every module of the adapter has rank 0: there is no update to export as LoRA")
    tensors = {}
    for path, m in kept.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = (m.A * m.E).detach().cpu().contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = m.B.detach().cpu().contiguous()
    tensors.update(extra_weight_tensors(adapter))
    ranks = {path: m.rank for path, m in kept.items()}
    alphas = {path: r * adapter.scale for path, r in ranks.items()}
    top = max(ranks.values())
    config = peft_common_config(adapter, sorted(kept))  # exact paths: rank-0 modules must not be wrapped
    config.update(
        peft_type="LORA",
        r=top,
        lora_alpha=top * adapter.scale,
        rank_pattern=ranks,
        alpha_pattern=alphas,
        use_rslora=False,
        use_dora=False,
    )
    return write_peft_dir(output, config, tensors, overwrite=overwrite)
