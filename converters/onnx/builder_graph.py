"""Rewrites of onnxruntime-genai's built graph for adapter inputs: LoRA weights as inputs, q/k/v packed.

Why we write these by hand: the builder only *bakes* a LoRA in (``--extra_options adapter_path=``):
each branch's weights become initializers at the ranks of the LoRA it was given (and int4 builds
quantize them, ``MatMulNBits``), so an adapter could not be swapped per request. ``branches_as_inputs``
turns them into graph inputs with empty (rank 0) defaults and one rank axis per layer, as our own
adapter-input graphs have them. And when given a LoRA the builder unpacks q, k and v into three
projections, each plus its branch's Add, feeding GroupQueryAttention apart, where its merged graph has
one packed projection; ``pack_qkv`` packs them back.

What the builder writes, per adapted module (``/model/layers.0/attn/q_proj`` here), which both rely on:
the branch ``/model/layers.0/attn/q_proj/lora_A/MatMul`` -> ``.../lora_B/MatMul`` (``MatMul_Q4``,
a ``MatMulNBits``, in int4 builds), the base ``.../q_proj/MatMul`` (or ``MatMul_Q4``) and
``.../q_proj/lora/Add`` of the two, whose outputs are GroupQueryAttention's q, k and v inputs.
Weights are initializers named ``model.layers.0.attn.q_proj.lora_A.MatMul.weight`` (int4:
``..._Q4``, ``..._scales``). Both functions change the graph in place; the caller loads and saves it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from adalora_export.errors import UserError
from adalora_export.formats.onnx_dir import branch_entry

_LORA_NODE = re.compile(r"^/(.+)/lora_([AB])/MatMul(?:_Q4)?$")
_Side = tuple[str, int, int]  # a branch weight's new input name, K (rows), N (columns)


# ---------------------------------------------------------------------------- branches as inputs


def branches_as_inputs(graph: onnx.GraphProto, modules: Iterable[str]) -> dict[str, dict]:
    """Turn the builder's LoRA branch weights into graph inputs with empty defaults, one rank axis per
    layer; returns the manifest's ``branches`` (module path -> ``branch_entry``).

    ``modules``: the adapter's module paths (transformers' names: ``...self_attn.q_proj``). A branch
    that matches none of them, or a module without a branch, is a UserError.
    """
    elem = graph.output[0].type.tensor_type.elem_type  # logits: the graph's float type
    found = _float_branches(graph)
    ours = {path.replace(".self_attn.", ".attn."): path for path in modules}  # the builder's names -> ours
    branches = {}
    for key, sides in sorted(found.items()):
        path = ours.get(key)
        if path is None or set(sides) != {"A", "B"}:
            raise UserError(f"the builder made a LoRA branch {key} that matches no module of the adapter")
        branches[path] = _add_branch_inputs(graph, path, sides["A"], sides["B"], elem)
    missing = sorted(set(ours.values()) - set(branches))
    if missing:
        raise UserError(f"the builder made no LoRA branch for adapter module {missing[0]}")
    return branches


def _float_branches(graph: onnx.GraphProto) -> dict[str, dict[str, _Side]]:
    """Replace every LoRA node by a float MatMul reading its weight from an input of our name (int4
    branches go back to float: an adapter's weights come from its file at run time); drop the built
    weights and the recorded shapes of the branch outputs. Returns builder key -> side -> weight."""
    dims = {i.name: list(i.dims) for i in graph.initializer}
    found: dict[str, dict[str, _Side]] = {}
    dropped: set[str] = set()
    outputs: set[str] = set()  # the branches' intermediate values, whose recorded shapes fix the old rank
    for index, node in enumerate(graph.node):
        match = _LORA_NODE.match(node.name)
        if not match:
            continue
        key, side = match.group(1).replace("/", "."), match.group(2)
        if node.op_type == "MatMulNBits":
            attrs = _attributes(node)
            k, n = attrs["K"], attrs["N"]
        else:
            k, n = dims[node.input[1]]
        name = f"{key}.lora_{side}.MatMul.weight"
        dropped.update(node.input[1:])
        outputs.update(node.output)
        plain = helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name.removesuffix("_Q4"))
        graph.node[index].CopyFrom(plain)
        found.setdefault(key, {})[side] = (name, k, n)
    _keep(graph.initializer, lambda t: t.name not in dropped)
    # onnxruntime would plan buffers by the built rank these shapes name.
    _keep(graph.value_info, lambda v: v.name not in outputs)
    return found


def _add_branch_inputs(graph: onnx.GraphProto, path: str, a: _Side, b: _Side, elem: int) -> dict:
    """Declare one branch's two weights as inputs (in x rank, rank x out) with empty defaults."""
    (down, in_features, _), (up, _, out_features) = a, b
    entry = branch_entry(path, down, up, in_features, out_features)
    axis, dtype = entry["rank_axis"], helper.tensor_dtype_to_np_dtype(elem)
    graph.input.extend(
        [
            helper.make_tensor_value_info(down, elem, [in_features, axis]),
            helper.make_tensor_value_info(up, elem, [axis, out_features]),
        ]
    )
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.zeros((in_features, 0), dtype), down),
            numpy_helper.from_array(np.zeros((0, out_features), dtype), up),
        ]
    )
    return entry


# ---------------------------------------------------------------------------------- q/k/v packing


def pack_qkv(graph: onnx.GraphProto) -> int:
    """Pack each layer's q, k and v projections back into one, as the builder's merged graph has them;
    returns how many layers were packed (0: the graph is left as it was).

    Why: given an adapter the builder unpacks them (three MatMul(NBits), each plus its branch's Add,
    feeding GroupQueryAttention separately); at batch 1 the time goes per node. Packed: one MatMul(NBits)
    over the three weights concatenated along N (the same quantized blocks, so the same numbers), the
    three branch outputs Concat'ed and added once, and GroupQueryAttention reading packed QKV. The
    branches themselves stay one per module, each with its own rank axis. A layer that is not in the
    builder's unpacked pattern (already packed, a ``g_idx`` input, projections that differ in their
    attributes) is left alone.
    """
    producers = {out: node for node in graph.node for out in node.output}
    inits = {t.name: t for t in graph.initializer}
    replaced, removed_inits, additions = set(), set(), {}
    for attention in (n for n in graph.node if n.op_type == "GroupQueryAttention"):
        unpacked = _unpacked_qkv(attention, producers, inits)
        if unpacked is None:
            continue
        adds, bases = unpacked
        nodes, weights = _packed_projection(adds, bases, inits)
        additions[attention.name] = nodes
        graph.initializer.extend(weights)
        replaced.update(n.name for n in bases + adds)
        removed_inits.update(w for b in bases for w in b.input[1:] if w)
        attention.input[0], attention.input[1], attention.input[2] = nodes[-1].output[0], "", ""
    if additions:
        _splice(graph, replaced, additions)
        _keep(graph.initializer, lambda t: t.name not in removed_inits)
    return len(additions)


def _unpacked_qkv(attention: onnx.NodeProto, producers: dict, inits: dict) -> tuple[list, list] | None:
    """(the three Adds, the three base projections) feeding ``attention``, or None when they are not
    the builder's unpacked LoRA pattern or cannot be concatenated along N."""
    adds = [producers.get(name) for name in attention.input[:3]]
    if any(a is None or a.op_type != "Add" for a in adds):
        return None  # already packed, or not the builder's LoRA pattern
    bases = [producers.get(a.input[0]) for a in adds]
    if any(b is None or b.op_type not in ("MatMul", "MatMulNBits") for b in bases):
        return None
    if len({b.op_type for b in bases}) != 1 or len({b.input[0] for b in bases}) != 1:
        return None
    if any(w not in inits for b in bases for w in b.input[1:] if w):
        return None
    # Only tensors that lead with N concatenate along it: MatMul's W, MatMulNBits' B, scales and zero
    # points (its g_idx runs along K, so a graph with one is left alone), with the same attributes.
    if len({len(b.input) for b in bases}) != 1 or len(bases[0].input) > (2 if bases[0].op_type == "MatMul" else 4):
        return None
    if len({tuple((a.name, a.i) for a in b.attribute if a.name != "N") for b in bases}) != 1:
        return None
    return adds, bases


def _packed_projection(adds: list, bases: list, inits: dict) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The packed projection, the Concat of the three branch outputs and their Add (its output is the
    packed QKV), and the concatenated weights."""
    first = bases[0]
    prefix = first.name.rsplit("/q_proj/", 1)[0]
    packed_out = f"{prefix}/qkv_proj/MatMul/output_0"
    delta, summed = f"{prefix}/qkv_proj/lora/Concat/output_0", f"{prefix}/qkv_proj/lora/Add/output_0"
    axis = 1 if first.op_type == "MatMul" else 0  # MatMul's W is K x N; MatMulNBits' tensors lead with N
    weights = []
    for index in range(1, len(first.input)):  # B, scales (and zero points) of MatMulNBits; W of MatMul
        arrays = [numpy_helper.to_array(inits[b.input[index]]) for b in bases]
        name = f"{prefix.lstrip('/').replace('/', '.')}.qkv_proj.{first.input[index].rsplit('.', 1)[-1]}"
        weights.append(numpy_helper.from_array(np.concatenate(arrays, axis=axis), name))
    attrs = _attributes(first)
    if first.op_type == "MatMulNBits":
        attrs["N"] = sum(_attributes(b)["N"] for b in bases)
    suffix = "MatMul_Q4" if first.op_type == "MatMulNBits" else "MatMul"
    inputs = [first.input[0]] + [w.name for w in weights]
    nodes = [
        helper.make_node(
            first.op_type, inputs, [packed_out], name=f"{prefix}/qkv_proj/{suffix}", domain=first.domain, **attrs
        ),
        helper.make_node("Concat", [a.input[1] for a in adds], [delta], name=f"{prefix}/qkv_proj/lora/Concat", axis=-1),
        helper.make_node("Add", [packed_out, delta], [summed], name=f"{prefix}/qkv_proj/lora/Add"),
    ]
    return nodes, weights


def _splice(graph: onnx.GraphProto, replaced: set[str], additions: dict[str, list[onnx.NodeProto]]) -> None:
    """Drop the ``replaced`` nodes and put each attention's new nodes right before it (order stays topological)."""
    kept = []  # copies: the graph's own node messages go when the field is cleared
    for node in graph.node:
        if node.name in replaced:
            continue
        kept.extend(additions.get(node.name, []) if node.op_type == "GroupQueryAttention" else [])
        kept.append(onnx.NodeProto())
        kept[-1].CopyFrom(node)
    del graph.node[:]
    graph.node.extend(kept)


# ---------------------------------------------------------------------------------------- helpers


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _keep(field, keep) -> None:
    """Keep the entries of a repeated protobuf field for which ``keep`` is true, in order."""
    kept = [entry for entry in field if keep(entry)]
    del field[:]
    field.extend(kept)
