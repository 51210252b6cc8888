"""Run a saved ONNX graph part by part, so that a check holds one part's weights at a time.

Why: an onnxruntime session maps every weight of its graph for as long as it lives, and the CPU
provider runs fp16 MatMuls through casts to fp32. A whole-graph session of the 748M Llama's fp16
graph (1.39 GiB) therefore holds all of it plus the output head's fp32 cast (0.24 GiB) on top of
the exporting process, over the issue's memory bound. Cut in topological order into parts of
about ``part_bytes`` of weights, each part is a session of its own over the *same* data file
(nothing is copied; a part's file holds only the graph structure and points into
``model.onnx.data``), and the values live across a cut are the sample's activations, kept in
numpy between parts. Every node of the graph runs once, in its order, on the same bytes, so the
outputs are the whole session's up to fusions onnxruntime would have made across a cut.
onnxruntime has no such mode (its sessions are whole graphs), hence this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

DEFAULT_PART_BYTES = 2**28  # 256 MiB of weights per part


@dataclass
class GraphPart:
    """A run of consecutive nodes with the values it takes from before and gives to after it."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    weight_bytes: int = 0
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    types: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)  # of inputs and outputs, once cut


def split_graph(model: onnx.ModelProto, part_bytes: int = DEFAULT_PART_BYTES) -> list[GraphPart]:
    """Cut ``model`` (loaded without its external data) into parts of at most ``part_bytes`` of
    weights each (a single larger weight gets a part of its own size). One part when it all fits,
    or when a value that would cross a cut has no inferable type (nothing to declare it with).
    Types are inferred only when there is a cut to declare."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    graph_inputs = {v.name for v in graph.input}
    parts = [GraphPart()]
    for node in graph.node:
        weights = {n: initializers[n] for n in _node_inputs(node) if n in initializers}
        new = {n: t for n, t in weights.items() if n not in parts[-1].initializers}
        nbytes = sum(_tensor_bytes(t) for t in new.values())
        if parts[-1].nodes and parts[-1].weight_bytes + nbytes > part_bytes:
            parts.append(GraphPart())
            new, nbytes = weights, sum(_tensor_bytes(t) for t in weights.values())
        parts[-1].nodes.append(node)
        parts[-1].initializers.update(new)
        parts[-1].weight_bytes += nbytes
    if len(parts) == 1:
        parts[0].inputs = [v.name for v in graph.input]
        parts[0].outputs = [v.name for v in graph.output]
        return parts

    # Liveness: a part takes what its nodes read and no earlier node of its own made (graph inputs,
    # including those with an initializer default, stay inputs); it gives what later parts or the
    # graph's outputs read.
    needed_after: set[str] = {v.name for v in graph.output}
    for part in reversed(parts):
        made = {o for node in part.nodes for o in node.output if o}
        part.outputs = [o for node in part.nodes for o in node.output if o in needed_after]
        read = [n for node in part.nodes for n in _node_inputs(node)]
        part.inputs = list(
            dict.fromkeys(n for n in read if n not in made and (n in graph_inputs or n not in initializers))
        )
        needed_after = (needed_after - made) | set(part.inputs)
    # Inputs with an initializer default (an adapter's branch weights) are declared by every part:
    # onnxruntime refuses an active LoraAdapter naming an input its session lacks.
    overridable = [v.name for v in graph.input if v.name in initializers]
    for part in parts:
        part.inputs += [n for n in overridable if n not in part.inputs]
        part.initializers.update({n: initializers[n] for n in overridable})
    types = _value_types(model)
    if any(name not in types for part in parts for name in part.inputs + part.outputs):
        whole = GraphPart(list(graph.node), initializers, sum(p.weight_bytes for p in parts))
        whole.inputs, whole.outputs = [v.name for v in graph.input], [v.name for v in graph.output]
        return [whole]
    for part in parts:
        part.types = {name: types[name] for name in part.inputs + part.outputs}
    return parts


def part_model(model: onnx.ModelProto, part: GraphPart) -> onnx.ModelProto:
    """A model of one part: its nodes, its initializers (still pointing into the data file), its
    inputs and outputs declared with the whole graph's types."""
    graph = onnx.helper.make_graph(
        part.nodes,
        model.graph.name,
        [part.types[n] for n in part.inputs],
        [part.types[n] for n in part.outputs],
        list(part.initializers.values()),
    )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.CopyFrom(graph)
    return out


def run_in_parts(
    model_path: Path,
    jobs: list[tuple[dict[str, np.ndarray], object]],
    output_names: list[str],
    make_session: Callable[[Path], object],
    part_bytes: int = DEFAULT_PART_BYTES,
) -> list[list[np.ndarray]]:
    """Run the graph at ``model_path`` on every job (feeds, onnxruntime RunOptions or None), one part
    at a time: each part's session runs all jobs and is closed before the next part's opens. Part
    files are written beside the graph (so the data file resolves) and removed after. The whole
    graph is loaded once first, so a graph that onnxruntime refuses whole is never passed in parts."""
    model = onnx.load(str(model_path), load_external_data=False)
    parts = split_graph(model, part_bytes)
    if len(parts) == 1:
        session = make_session(model_path)
        return [session.run(output_names, feeds, options) for feeds, options in jobs]
    make_session(model_path)  # the graph as shipped loads whole (a load maps its weights, reads none)
    values = [dict(feeds) for feeds, _ in jobs]
    for index, part in enumerate(parts):
        with _part_file(model_path, index, part_model(model, part)) as path:
            session = make_session(path)
            for (_, options), known in zip(jobs, values):
                outputs = session.run(part.outputs, {n: known[n] for n in part.inputs if n in known}, options)
                known.update(zip(part.outputs, outputs))
            del session
        later = {n for p in parts[index + 1 :] for n in p.inputs} | set(output_names)
        for known in values:  # drop what no later part reads
            for name in [n for n in known if n not in later]:
                del known[name]
    return [[known[n] for n in output_names] for known in values]


@contextlib.contextmanager
def _part_file(model_path: Path, index: int, model: onnx.ModelProto) -> Iterator[Path]:
    path = model_path.with_name(f".part-{index}-{model_path.name}")
    path.write_bytes(model.SerializeToString())
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """What a node reads, including what its subgraphs (If, Loop) read from the outer scope."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for sub in list(attr.g.node if attr.HasField("g") else []) + [n for g in attr.graphs for n in g.node]:
            names += _node_inputs(sub)
    return names


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every value's declared or inferred type (inference reads shapes only, never the data)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 -- an uninferable graph is checked whole
        inferred = model
    graph = inferred.graph
    types = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    return {n: v for n, v in types.items() if v.type.tensor_type.elem_type}
