"""ONNX export: merged, rank-compact, adapter-input and optimized graphs, each checked against torch.

``export_onnx`` traces a graph directory (its layout: ``adalora_export.formats.onnx_dir``);
``export_optimized`` has onnxruntime-genai's builder make one (``optimized``, ``builder_graph``);
``write_onnx_adapter`` writes another adapter for an existing adapter-input graph. Serving the graphs
is ``adalora_export.serving``.
"""

from __future__ import annotations

from adalora_export.formats.onnx_dir import (
    ADAPTER_FILE,
    DTYPES,
    MANIFEST,
    MAX_OPSET,
    MIN_OPSET,
    MODEL_FILE,
    OPTIMIZED_DTYPES,
    TARGETS,
    OnnxKind,
)

from .adapter_file import write_onnx_adapter
from .export import DEFAULT_TOLERANCE, export_onnx
from .graph import DEFAULT_OPSET
from .optimized import export_optimized

__all__ = [
    "ADAPTER_FILE",
    "DEFAULT_OPSET",
    "DEFAULT_TOLERANCE",
    "DTYPES",
    "MANIFEST",
    "MAX_OPSET",
    "MIN_OPSET",
    "MODEL_FILE",
    "OPTIMIZED_DTYPES",
    "OnnxKind",
    "TARGETS",
    "export_onnx",
    "export_optimized",
    "write_onnx_adapter",
]
