"""``export``: read an adapter source, check that the flags fit what was asked, and call one converter.

This is the library call behind ``adalora-export export``; a Python user gets the same checks and the
same errors. Targets: ``to="lora"`` (a PEFT LoRA directory), ``merge`` (a merged HF model), ``onnx``
(an ONNX graph, merged with ``merge``, hot-swappable with ``adapter_inputs``, rank-compact otherwise),
and ``onnx`` with ``graph`` (an ``.onnx_adapter`` file for an existing adapter-input graph).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .converters.lora import LORA_LAYOUTS, export_lora
from .converters.merge import merge_into_base, verify_merge
from .converters.onnx import OnnxKind, export_onnx, export_optimized, write_onnx_adapter
from .errors import UserError
from .io import check_output_path
from .sources import load_adapter, resolve_base_dir

LORA_FORMATS = ("lora",)
__all__ = ["LORA_FORMATS", "LORA_LAYOUTS", "ExportResult", "export_adapter"]


@dataclass
class ExportResult:
    """What an export wrote: its kind, its path, and the lines that tell a person what happened."""

    kind: str
    output: Path
    lines: list[str] = field(default_factory=list)


def _refuse(given: dict[str, object], allowed: set[str], what: str) -> None:
    """UserError naming the first given flag that does not apply to ``what``."""
    for flag, value in given.items():
        if value not in (None, False) and flag not in allowed:
            raise UserError(f"{flag} does not apply to {what}")


def _check_flags(given: dict[str, object], *, to: str | None, onnx: bool, graph: object, optimized: bool) -> None:
    """UserError for a flag that does not apply to the chosen target (``given``: flag -> value)."""
    if to is not None:
        if to not in LORA_FORMATS:
            raise UserError(f"--to {to!r}: expected one of {', '.join(LORA_FORMATS)}")
        _refuse(given, {"--lora-layout"}, "--to lora (a LoRA directory needs no base)")
    elif not onnx:
        _refuse(
            given, {"--base", "--merge", "--workers", "--verify"}, "--merge (the merged model keeps the base's dtype)"
        )
    elif graph is not None:
        _refuse(given, {"--graph"}, "--onnx --graph (the graph fixes base, kind, dtype and opset)")
    elif optimized:
        allowed = {"--base", "--merge", "--adapter-inputs", "--optimized", "--dtype", "--target", "--tolerance"}
        _refuse(given, allowed, "--onnx --optimized (onnxruntime-genai's builder: its graph has a KV cache)")
    else:
        _refuse(
            given,
            {"--base", "--merge", "--adapter-inputs", "--dtype", "--opset", "--with-past", "--tolerance"},
            "--onnx",
        )


def export_adapter(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    to: str | None = None,
    lora_layout: str | None = None,
    merge: bool = False,
    onnx: bool = False,
    adapter_inputs: bool = False,
    optimized: bool = False,
    target: str | None = None,
    graph: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    dtype: str | None = None,
    opset: int | None = None,
    with_past: bool = False,
    tolerance: float | None = None,
    workers: int | None = None,
    verify: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> ExportResult:
    """Export the adapter at ``source`` (any source ``sources.load_adapter`` reads) into ``output``.

    Exactly one of ``to``, ``merge`` (alone) or ``onnx`` chooses the target; a flag that does not apply
    to it is a UserError naming the flag, before anything is read or written.
    """
    if sum([to is not None, onnx, merge and not onnx]) != 1:
        raise UserError("choose exactly one of --to lora, --merge, --onnx [--merge | --adapter-inputs]")
    if onnx and merge and adapter_inputs:
        raise UserError("--merge and --adapter-inputs exclude each other: a merged graph has no adapter inputs")
    if optimized and onnx and not (merge or adapter_inputs):
        raise UserError("--optimized builds a merged graph or one with adapter inputs: add --merge or --adapter-inputs")
    given = {
        "--lora-layout": lora_layout,
        "--base": base,
        "--merge": merge,
        "--adapter-inputs": adapter_inputs,
        "--optimized": optimized,
        "--target": target,
        "--graph": graph,
        "--dtype": dtype,
        "--opset": opset,
        "--with-past": with_past,
        "--tolerance": tolerance,
        "--workers": workers,
        "--verify": verify,
    }
    _check_flags(given, to=to, onnx=onnx, graph=graph, optimized=optimized)
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")

    output = check_output_path(output, overwrite)
    if output.absolute().resolve() == Path(source).absolute().resolve():
        raise UserError(f"the output {output} is the adapter directory; choose another")
    adapter = load_adapter(source, allow_pickle=allow_pickle)
    if to is not None:
        layout = lora_layout or LORA_LAYOUTS[0]
        export_lora(adapter, output, overwrite=overwrite, layout=layout)
        return ExportResult("lora", output, [f"wrote {layout} LoRA adapter {output}"])
    if graph is not None:
        write_onnx_adapter(adapter, graph, output, overwrite=overwrite)
        return ExportResult("onnx_adapter", output, [f"wrote {output} for the graph in {graph}"])
    base_dir = resolve_base_dir(adapter, base)
    if not onnx:
        return _merge(adapter, base_dir, output, workers or 1, verify, overwrite, allow_pickle)
    if optimized:
        options = dict(
            dtype=dtype or "fp32", target=target or "cpu", tolerance=tolerance, adapter_inputs=adapter_inputs
        )
        manifest = export_optimized(
            adapter, base_dir, output, overwrite=overwrite, allow_pickle=allow_pickle, **options
        )
        return ExportResult("optimized", output, [_onnx_line(OnnxKind.OPTIMIZED, output, base_dir, manifest)])
    kind = OnnxKind.MERGED if merge else OnnxKind.ADAPTER_INPUTS if adapter_inputs else OnnxKind.RANK_COMPACT
    manifest = export_onnx(
        adapter,
        base_dir,
        output,
        kind=kind,
        dtype=dtype or "fp32",
        opset=opset,
        with_past=with_past,
        tolerance=tolerance,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
    )
    return ExportResult(kind.value, output, [_onnx_line(kind, output, base_dir, manifest)])


def _merge(adapter, base_dir: Path, output: Path, workers: int, verify: bool, overwrite: bool, allow_pickle: bool):
    result = merge_into_base(adapter, base_dir, output, workers=workers, overwrite=overwrite, allow_pickle=allow_pickle)
    lines = [f"wrote merged model {output} (base {base_dir} + adapter): {result.describe()}"]
    if verify:
        diff = verify_merge(adapter, base_dir, output, allow_pickle=allow_pickle)
        lines.append(f"verify: largest |merged - (base + adapter)| = {diff:.3g} (fp32 forward)")
    return ExportResult("merged", output, lines)


def _onnx_line(kind: OnnxKind, output: Path, base_dir: Path, manifest: dict) -> str:
    parity = manifest.get("parity", {})
    line = f"wrote {kind.value} ONNX graph {output} from base {base_dir}"
    if "max_relative_error" in parity:
        line += f": onnxruntime vs torch {parity['max_relative_error']:.2g} (relative)"
    if "greedy_agreement" in parity:
        line += f", greedy tokens {parity['greedy_agreement']:.0%} equal"
    return line
