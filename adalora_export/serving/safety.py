"""The runtime's own check of an exported directory before onnxruntime reads it: every tensor's
external data must be a file inside the directory (onnxruntime would read whatever file a graph names)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..formats.onnx_dir import open_onnx_dir


def check_onnx_dir(onnx_dir: str | os.PathLike) -> tuple[Path, dict]:
    """Validate an exported directory and return (model path, manifest).

    Refuses a config that asks for remote code, and external-data locations that leave the directory
    (``..``, absolute paths, symlinks) in any tensor of the graph (initializers, constants, subgraphs):
    onnxruntime would otherwise read whatever file such a graph names.
    """
    import onnx

    onnx_dir = Path(onnx_dir)
    model_path, manifest = open_onnx_dir(onnx_dir)
    try:
        graph = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors have several types
        raise UserError(f"{model_path} is not a valid ONNX file ({str(exc).splitlines()[0]})") from None
    root = onnx_dir.resolve()
    for tensor in _all_tensors(graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = onnx_dir / location
        if (
            not location
            or os.path.isabs(location)
            or ".." in Path(location).parts
            or target.is_symlink()
            or root not in target.resolve().parents
        ):
            raise UserError(
                f"{model_path}: tensor {tensor.name} points at external data {location!r} outside {onnx_dir}"
            )
        if not target.is_file():
            raise UserError(f"missing file {target} (external data of {model_path})")
    return model_path, manifest


def _all_tensors(model):
    """Every TensorProto of a model: initializers, sparse ones, node attributes, subgraphs, functions."""

    def of_nodes(nodes):
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for sparse in [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []:
                    yield from (sparse.values, sparse.indices)
                for sub in [attr.g] if attr.HasField("g") else []:
                    yield from of_graph(sub)
                for sub in attr.graphs:
                    yield from of_graph(sub)

    def of_graph(graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from of_nodes(graph.node)

    yield from of_graph(model.graph)
    for function in model.functions:
        yield from of_nodes(function.node)
