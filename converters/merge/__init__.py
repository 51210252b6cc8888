"""Merge a compact adapter into a base model's weights, one shard at a time (docs/design.md, "Merge").

Why hand-written streaming: PEFT's ``merge_and_unload`` and transformers' ``save_pretrained`` need
the whole model in memory; here the model itself is never loaded, and memory stays at a few small
blocks per worker plus the adapter whatever the model's size.

- ``base_weights``: reading the base from its headers (index, shards, safetensors/pickle), tensor-name
  resolution, tied weights;
- ``plan``: what each output tensor is (copied, merged, put), built and checked before any write;
- ``write``: streaming the output shards (kernel copies, merged row blocks, workers, fsync), the
  index and the small files;
- ``verify``: running merged and base + adapter side by side.

Output shards are safetensors with the base's tensor order, dtypes and shapes (a pickled base
becomes safetensors). Tied weights: when an adapted (or replaced) weight is tied to another in the
base (``lm_head`` to the input embedding with ``tie_word_embeddings``), the merged weight is written
under its own name next to its source, the source stays as it was, and the output config says
``tie_word_embeddings: false``: the merged model then computes exactly what base + adapter did.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from adalora_export.adapter import CompactAdapter
from adalora_export.errors import UserError
from adalora_export.hf import check_model_dir
from adalora_export.io import atomic_output_dir, check_output_path

from .base_weights import ST_INDEX, open_base_weights, resolve_tensor_name, tied_weights
from .plan import Copy, make_plan
from .verify import verify_merge
from .write import copy_small_files, write_index, write_shards

__all__ = ["ST_INDEX", "MergeResult", "merge_into_base", "resolve_tensor_name", "verify_merge"]


@dataclass
class MergeResult:
    """What ``merge_into_base`` wrote."""

    output: Path
    shards: int  # output weight files
    merged: int  # weights that took a non-zero update
    replaced: int  # base tensors replaced by the adapter's extra weights
    added: list[str] = field(default_factory=list)  # tensors the base lacks (a new head, an untied copy)
    untied: list[str] = field(default_factory=list)  # weights written apart from their tie source
    copied: int = 0  # base tensors copied unchanged
    bytes: int = 0  # bytes of weight files written
    seconds: float = 0.0

    def describe(self) -> str:
        """One line for a summary: what was merged, untied and added, size and time."""
        size = f"{self.bytes / 2**30:.2f} GiB in {self.seconds:.1f} s"
        text = f"merged {self.merged} weights, {self.shards} shard(s), {size}"
        if self.untied:
            text += f"; untied {', '.join(self.untied)} from its tied source (config: tie_word_embeddings=false)"
        if self.added:
            text += f"; added tensors the base lacks: {', '.join(self.added)}"
        return text


def merge_into_base(
    adapter: CompactAdapter,
    base_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    workers: int = 1,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> MergeResult:
    """Write base + adapter as a plain HF model directory at ``output``, streaming shard by shard.

    The output keeps the base's dtype, shard layout and tensor order (safetensors), with its config,
    generation config and tokenizer files. Every problem with the input is a UserError raised before
    anything is written; the output appears whole or not at all. Prints nothing but progress bars.
    """
    start = time.perf_counter()
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    base_dir, output = Path(base_dir), Path(output)
    config = check_model_dir(base_dir)
    check_output_path(output, overwrite, inputs={"the base model": base_dir})
    adapter.check_head(config, str(base_dir))
    base_weights = open_base_weights(base_dir, allow_pickle)
    plan = make_plan(adapter, base_weights, tied_weights(base_dir, config))
    out_config = adapter.merged_config(config)  # a classifier's config says what it is
    if plan.untied:
        out_config = {**out_config, "tie_word_embeddings": False}
    with atomic_output_dir(output, overwrite) as tmp:
        written = write_shards(base_weights, plan, tmp, workers)
        if base_weights.index is not None:
            write_index(base_weights, plan, tmp)
        copy_small_files(base_dir, tmp, out_config)
    return MergeResult(
        output=output,
        shards=len(base_weights.files),
        merged=plan.merged,
        replaced=plan.replaced,
        added=plan.added,
        untied=plan.untied,
        copied=sum(isinstance(item, Copy) for items in plan.shards for item in items),
        bytes=written,
        seconds=time.perf_counter() - start,
    )
