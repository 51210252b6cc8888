"""``export``: read an adapter source, check that the options fit what was asked, and call one converter.

This is the library call behind ``adalora-export export``; a Python user gets the same checks and the
same errors. An ``ExportRequest`` holds the command's options; its target is one of ``lora`` (a PEFT
LoRA directory), ``merged`` (a merged HF model), ``onnx`` (an ONNX graph: merged with ``merge``,
hot-swappable with ``adapter_inputs``, rank-compact otherwise), ``optimized`` (onnxruntime-genai's
builder makes the graph) and ``onnx_adapter`` (an ``.onnx_adapter`` file for an existing graph).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .adapter import CompactAdapter
from .converters.lora import export_lora
from .converters.merge import merge_into_base, verify_merge
from .converters.onnx import OnnxKind, export_onnx, export_optimized, write_onnx_adapter
from .errors import UserError
from .formats.lora_dir import LORA_FORMATS, LORA_LAYOUTS
from .io import check_output_path
from .sources import load_adapter, resolve_base_dir

__all__ = ["LORA_FORMATS", "LORA_LAYOUTS", "ExportRequest", "ExportResult", "export_adapter"]

# The options each target takes besides the ones every export takes (output, overwrite, allow_pickle).
_ONNX = {"base", "merge", "adapter_inputs", "dtype", "tolerance"}
# The builder's int4 settings: --optimized only, and there --dtype int4 only (export_optimized says so).
INT4_OPTIONS = ("int4_block_size", "int4_accuracy_level", "int4_head", "int4_sensitive")
TARGET_OPTIONS = {
    "lora": ({"to", "lora_layout"}, "--to lora (a LoRA directory needs no base)"),
    "merged": ({"base", "merge", "workers", "verify"}, "--merge (the merged model keeps the base's dtype)"),
    "onnx_adapter": ({"onnx", "graph"}, "--onnx --graph (the graph fixes base, kind, dtype and opset)"),
    "optimized": (
        _ONNX | {"onnx", "optimized", "target", *INT4_OPTIONS},
        "--onnx --optimized (onnxruntime-genai's builder: its graph has a KV cache)",
    ),
    "onnx": (_ONNX | {"onnx", "opset", "with_past"}, "--onnx"),
}
_READ_BASE = {kind for kind, (allowed, _) in TARGET_OPTIONS.items() if "base" in allowed}  # targets on a base model


@dataclass
class ExportRequest:
    """The ``export`` command's options, one field per flag (None or False: not given)."""

    to: str | None = None
    lora_layout: str | None = None
    merge: bool = False
    onnx: bool = False
    adapter_inputs: bool = False
    optimized: bool = False
    target: str | None = None
    graph: str | os.PathLike | None = None
    base: str | os.PathLike | None = None
    dtype: str | None = None
    opset: int | None = None
    with_past: bool = False
    tolerance: float | None = None
    int4_block_size: int | None = None
    int4_accuracy_level: int | None = None
    int4_head: str | None = None
    int4_sensitive: str | None = None
    workers: int | None = None
    verify: bool = False
    overwrite: bool = False
    allow_pickle: bool = False

    def kind(self) -> str:
        """Which target these options ask for; a UserError when they ask for none or several."""
        if sum([self.to is not None, self.onnx, self.merge and not self.onnx]) != 1:
            raise UserError("choose exactly one of --to lora, --merge, --onnx [--merge | --adapter-inputs]")
        if self.to is not None:
            if self.to not in LORA_FORMATS:
                raise UserError(f"--to {self.to!r}: expected one of {', '.join(LORA_FORMATS)}")
            return "lora"
        if not self.onnx:
            return "merged"
        if self.merge and self.adapter_inputs:
            raise UserError("--merge and --adapter-inputs exclude each other: a merged graph has no adapter inputs")
        if self.optimized and not (self.merge or self.adapter_inputs):
            raise UserError(
                "--optimized builds a merged graph or one with adapter inputs: add --merge or --adapter-inputs"
            )
        if self.graph is not None:
            return "onnx_adapter"
        return "optimized" if self.optimized else "onnx"

    def check(self) -> str:
        """The target, after refusing the first given option that does not apply to it."""
        kind = self.kind()
        allowed, what = TARGET_OPTIONS[kind]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in allowed | {"overwrite", "allow_pickle"} and value not in (None, False):
                raise UserError(f"--{f.name.replace('_', '-')} does not apply to {what}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        return kind


@dataclass
class ExportResult:
    """What an export wrote: its kind, its path, and the lines that tell a person what happened."""

    kind: str
    output: Path
    lines: list[str] = field(default_factory=list)


def export_adapter(
    source: str | os.PathLike, output: str | os.PathLike, request: ExportRequest | None = None, **options
) -> ExportResult:
    """Export the adapter at ``source`` (any source ``sources.load_adapter`` reads) into ``output``.

    The options come as an ``ExportRequest`` or as its fields by keyword. An option that does not
    apply to the target is a UserError naming the flag, before anything is read or written; so is an
    output that is, contains or would replace part of an input (the source, the base, the ``graph``).
    """
    request = request or ExportRequest(**options)
    kind = request.check()
    adapter, base_dir = None, request.base
    if kind in _READ_BASE and base_dir is None:  # the base the adapter names: read the (small) adapter first
        adapter = load_adapter(source, allow_pickle=request.allow_pickle)
        base_dir = resolve_base_dir(adapter, None)
    inputs = {"the adapter source": source, "the base model": base_dir, "the graph directory": request.graph}
    output = check_output_path(output, request.overwrite, inputs=inputs)
    adapter = adapter or load_adapter(source, allow_pickle=request.allow_pickle)
    if kind == "lora":
        layout = request.lora_layout or LORA_LAYOUTS[0]
        export_lora(adapter, output, overwrite=request.overwrite, layout=layout)
        return ExportResult("lora", output, [f"wrote {layout} LoRA adapter {output}"])
    if kind == "onnx_adapter":
        write_onnx_adapter(adapter, request.graph, output, overwrite=request.overwrite)
        return ExportResult("onnx_adapter", output, [f"wrote {output} for the graph in {request.graph}"])
    base_dir = resolve_base_dir(adapter, base_dir)
    if kind == "merged":
        return _merge(adapter, base_dir, output, request)
    return _onnx(adapter, base_dir, output, request, optimized=kind == "optimized")


def _merge(adapter: CompactAdapter, base_dir: Path, output: Path, request: ExportRequest) -> ExportResult:
    workers, pickle = request.workers or 1, request.allow_pickle
    result = merge_into_base(
        adapter, base_dir, output, workers=workers, overwrite=request.overwrite, allow_pickle=pickle
    )
    lines = [f"wrote merged model {output} (base {base_dir} + adapter): {result.describe()}"]
    if request.verify:
        diff = verify_merge(adapter, base_dir, output, allow_pickle=pickle)
        lines.append(f"verify: largest |merged - (base + adapter)| = {diff:.3g} (fp32 forward)")
    return ExportResult("merged", output, lines)


def _onnx(adapter: CompactAdapter, base_dir: Path, output: Path, request: ExportRequest, optimized: bool):
    common = dict(tolerance=request.tolerance, overwrite=request.overwrite, allow_pickle=request.allow_pickle)
    if optimized:
        kind = OnnxKind.OPTIMIZED
        manifest = export_optimized(
            adapter,
            base_dir,
            output,
            dtype=request.dtype or "fp32",
            target=request.target or "cpu",
            adapter_inputs=request.adapter_inputs,
            **{name: getattr(request, name) for name in INT4_OPTIONS},
            **common,
        )
    else:
        kind = (
            OnnxKind.MERGED
            if request.merge
            else OnnxKind.ADAPTER_INPUTS
            if request.adapter_inputs
            else OnnxKind.RANK_COMPACT
        )
        options = dict(dtype=request.dtype or "fp32", opset=request.opset, with_past=request.with_past)
        manifest = export_onnx(adapter, base_dir, output, kind=kind, **options, **common)
    return ExportResult(kind.value, output, [_onnx_line(kind, output, base_dir, manifest)])


def _onnx_line(kind: OnnxKind, output: Path, base_dir: Path, manifest: dict) -> str:
    parity = manifest.get("parity", {})
    line = f"wrote {kind.value} ONNX graph {output} from base {base_dir}"
    if parity.get("checked") is False:
        return f"{line}: {parity['reason']}"
    if "max_relative_error" in parity:
        line += f": onnxruntime vs torch {parity['max_relative_error']:.2g} (relative)"
    if "perplexity" in parity:
        line += (
            f", perplexity {parity['perplexity']:.3g} vs {parity['reference_perplexity']:.3g} on "
            f"{'the check text' if parity['scored_on'] == 'text' else parity['scored_on']}, "
            f"next token equal at {parity['top1_agreement']:.0%}"
        )
    if "greedy_agreement" in parity:
        line += f", greedy tokens {parity['greedy_agreement']:.0%} equal"
    return line
