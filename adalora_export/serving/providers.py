"""Where a session runs: the providers a caller may ask for, whether CUDA really loads (``devices``), and opening a
session (quietly: onnxruntime's warnings about initializers among graph inputs are noise here)."""

from __future__ import annotations

import os
from pathlib import Path

from ..devices import cuda_usable  # re-exported: the runtime's callers ask here
from ..errors import UserError

PROVIDERS = ("auto", "cuda", "cpu")
_QUIET = 3  # onnxruntime log severity: errors only (no "initializer in graph inputs" warnings)


def create_session(model_path: str | os.PathLike, provider: str = "auto", threads: int | None = None):
    """An InferenceSession on ``provider`` (auto: CUDA when it really loads, else the CPU, silently)."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise UserError(f"unknown provider {provider!r}: expected one of {', '.join(PROVIDERS)}")
    use_cuda = provider != "cpu" and cuda_usable()
    if provider == "cuda" and not use_cuda:
        raise UserError("--provider cuda: no usable CUDA GPU (driver, CUDA libraries or onnxruntime-gpu missing)")
    options = ort.SessionOptions()
    options.log_severity_level = _QUIET
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    if provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise UserError("--provider cuda: onnxruntime could not start its CUDA provider")
    return session


def open_session(model_path: Path, provider: str, threads: int | None):
    """``create_session`` for a graph handed to us: onnxruntime's refusal to load it (damaged or truncated
    graph or weights) is bad input. (At export time the same failure would be our bug.)"""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    refused = (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidProtobuf, ort_errors.NoSuchFile)
    try:
        return create_session(model_path, provider, threads)
    except refused as exc:
        raise UserError(f"onnxruntime cannot load {model_path}: {str(exc).splitlines()[0]}") from None
