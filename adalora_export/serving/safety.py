"""The runtime's own check of an exported directory before onnxruntime reads it: every tensor's
external data must be a file inside the directory (onnxruntime would read whatever file a graph names)
and hold the bytes the graph says it does; onnxruntime-genai's config must be readable."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..formats.onnx_dir import GENAI_CONFIG, OnnxKind, open_onnx_dir
from ..io import read_json


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
    root, sizes = onnx_dir.resolve(), {}
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
        info = {e.key: e.value for e in tensor.external_data}
        end = int(info.get("offset") or 0) + int(info.get("length") or 0)
        size = sizes.setdefault(target, target.stat().st_size)
        if end > size:  # onnxruntime would fail on it later, with a log line of its own first
            raise UserError(f"{target} is truncated: tensor {tensor.name} ends at byte {end:,}, the file has {size:,}")
    _check_genai_config(onnx_dir, manifest)
    return model_path, manifest


def _check_genai_config(onnx_dir: Path, manifest: dict) -> None:
    """An optimized graph's onnxruntime-genai config (the engine that runs it reads it) must name the graph."""
    if manifest.get("kind") != OnnxKind.OPTIMIZED.value:
        return  # our own graphs run on onnxruntime; their genai_config.json is for onnxruntime-genai users
    name = manifest.get("genai_config") or GENAI_CONFIG
    config = read_json(onnx_dir / name)  # a UserError naming the file when missing or not JSON
    decoder = config.get("model", {}).get("decoder") if isinstance(config, dict) else None
    if not isinstance(decoder, dict) or not isinstance(decoder.get("filename"), str):
        raise UserError(f"{onnx_dir / name} is not an onnxruntime-genai config (no model.decoder.filename)")


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


def check_adapter_file(path: str | os.PathLike, manifest: dict, onnx_dir: Path) -> None:
    """Refuse an ``.onnx_adapter`` that does not fit the graph ``manifest`` describes, before any request:
    every parameter must be one of its branch or head inputs, of the graph's float type, each branch's
    two factors of one rank and the layer's sizes (onnxruntime would fail at the first request)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}")
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as exc:  # onnxruntime raises several types for a damaged file
        raise UserError(f"{path} is not a valid onnxruntime adapter file ({str(exc).splitlines()[0]})") from None
    wanted = {}  # input name -> (expected shape with None for the rank, the branch it belongs to)
    for module, b in manifest.get("branches", {}).items():
        wanted[b["down"]] = ([b["in"], None], module)
        wanted[b["up"]] = ([None, b["out"]], module)
    for name, shape in manifest.get("extra_inputs", {}).items():
        wanted[name] = (list(shape), name)
    float_type = "tensor(float16)" if manifest.get("dtype") == "fp16" else "tensor(float)"
    ranks: dict[str, int] = {}
    for name, value in params.items():
        if name not in wanted:
            raise UserError(
                f"{path} does not fit the graph in {onnx_dir}: it sets {name!r}, which the graph does not take"
            )
        shape, owner = wanted[name]
        got = list(value.shape())
        if len(got) != len(shape) or any(w is not None and w != g for w, g in zip(shape, got)):
            raise UserError(f"{path} does not fit the graph in {onnx_dir}: {name} is {got}, the graph takes {shape}")
        if value.data_type() != float_type:
            raise UserError(
                f"{path} does not fit the graph in {onnx_dir}: {name} is {value.data_type()}, not {float_type}"
            )
        rank = next((g for w, g in zip(shape, got) if w is None), None)  # branches: the free axis
        if rank is not None and ranks.setdefault(owner, rank) != rank:
            raise UserError(f"{path} does not fit the graph in {onnx_dir}: the two factors of {owner} differ in rank")
