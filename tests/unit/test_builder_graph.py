"""``builder_graph``: the rewrites of onnxruntime-genai's built graph, on small graphs made by hand in the
shape the builder writes when it bakes a LoRA in (per module: base MatMul or MatMulNBits, lora_A and
lora_B MatMuls, one Add; the q, k and v Adds feed GroupQueryAttention). Every graph also runs on
onnxruntime's CPU provider, GroupQueryAttention included (no rotary, an empty past), so the rewrites
are checked on numbers as well as on structure."""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from adalora_export.converters.onnx.builder_graph import branches_as_inputs, pack_qkv
from adalora_export.errors import UserError
from adalora_export.formats.onnx_dir import branch_entry, rank_axis

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD = 2, 32, 2, 1, 16
SIZES = {"q": (HIDDEN, HEADS * HEAD), "k": (HIDDEN, KV_HEADS * HEAD), "v": (HIDDEN, KV_HEADS * HEAD)}
SIZES["o"] = (HEADS * HEAD, HIDDEN)
MODULES = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(LAYERS) for p in "qkvo"]  # the adapter's names
BATCH, SEQ = 2, 3
BLOCK = 32


class _Builder:
    """One builder-shaped graph: base weights from one stream (the same for any branch ranks), branch
    weights from another."""

    def __init__(self, quant: bool, quant_branches: bool, seed: int):
        self.quant, self.quant_branches = quant, quant_branches
        self.base_rng, self.branch_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
        self.nodes, self.inits, self.infos = [], [], []

    def linear(self, name: str, weight: str, x: str, k: int, n: int, quant: bool, rng) -> str:
        """A MatMul (or MatMulNBits) named as the builder names it; returns its output."""
        out = f"{name}/MatMul/output_0"
        if not quant:
            w = (rng.standard_normal((k, n)) / math.sqrt(max(k, 1))).astype(np.float32)
            self.inits.append(numpy_helper.from_array(w, f"{weight}.MatMul.weight"))
            self.nodes.append(helper.make_node("MatMul", [x, f"{weight}.MatMul.weight"], [out], name=f"{name}/MatMul"))
            return out
        blocks = -(-k // BLOCK)
        packed = rng.integers(0, 256, (n, blocks, BLOCK // 2), dtype=np.uint8)
        scales = rng.uniform(0.01, 0.05, (n, blocks)).astype(np.float32)
        self.inits += [
            numpy_helper.from_array(packed, f"{weight}.MatMul.weight_Q4"),
            numpy_helper.from_array(scales, f"{weight}.MatMul.weight_scales"),
        ]
        inputs = [x, f"{weight}.MatMul.weight_Q4", f"{weight}.MatMul.weight_scales"]
        attrs = {"K": k, "N": n, "bits": 4, "block_size": BLOCK, "accuracy_level": 4}
        self.nodes.append(
            helper.make_node("MatMulNBits", inputs, [out], name=f"{name}/MatMul_Q4", domain="com.microsoft", **attrs)
        )
        return out

    def projection(self, layer: int, proj: str, x: str, rank: int) -> str:
        """Base + LoRA branch of one module, summed by ``.../lora/Add``; returns the sum."""
        name, weight = f"/model/layers.{layer}/attn/{proj}_proj", f"model.layers.{layer}.attn.{proj}_proj"
        k, n = SIZES[proj]
        base = self.linear(name, weight, x, k, n, self.quant, self.base_rng)
        down = self.linear(f"{name}/lora_A", f"{weight}.lora_A", x, k, rank, self.quant_branches, self.branch_rng)
        up = self.linear(f"{name}/lora_B", f"{weight}.lora_B", down, rank, n, self.quant_branches, self.branch_rng)
        # The builder records the branch outputs' shapes at the rank it built (and the others').
        for value, width in ((base, n), (down, rank), (up, n)):
            self.infos.append(helper.make_tensor_value_info(value, TensorProto.FLOAT, ["batch", "seq", width]))
        self.nodes.append(helper.make_node("Add", [base, up], [f"{name}/lora/Add/output_0"], name=f"{name}/lora/Add"))
        return f"{name}/lora/Add/output_0"

    def layer(self, layer: int, x: str, ranks: dict[str, int]) -> str:
        path = f"model.layers.{layer}.self_attn"
        q, k, v = (self.projection(layer, p, x, ranks[f"{path}.{p}_proj"]) for p in "qkv")
        name = f"/model/layers.{layer}/attn/GroupQueryAttention"
        past = [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
        self.nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [q, k, v, *past, "seqlens_k", "total_seq_len"],
                [f"{name}/output_0", f"present.{layer}.key", f"present.{layer}.value"],
                name=name,
                domain="com.microsoft",
                num_heads=HEADS,
                kv_num_heads=KV_HEADS,
                do_rotary=0,
            )
        )
        return self.projection(layer, "o", f"{name}/output_0", ranks[f"{path}.o_proj"])


def builder_model(
    quant: bool = False, ranks: dict[str, int] | None = None, quant_branches: bool | None = None, seed: int = 0
) -> onnx.ModelProto:
    """A graph as the builder writes it with a LoRA baked in (int4: ``quant``); ``ranks``: module -> rank
    (default 3 each); ``quant_branches`` (default ``quant``): whether the branches are MatMulNBits too."""
    ranks = ranks or dict.fromkeys(MODULES, 3)
    builder = _Builder(quant, quant if quant_branches is None else quant_branches, seed)
    x = "/model/layers.0/input_layernorm/output_0"
    hidden = x
    for layer in range(LAYERS):
        hidden = builder.layer(layer, hidden, ranks)
    builder.nodes.append(helper.make_node("Identity", [hidden], ["logits"], name="/lm_head/Identity"))
    cache = ["batch", KV_HEADS, "past", HEAD]
    pasts = [f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    inputs = [
        helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
        *(helper.make_tensor_value_info(name, TensorProto.FLOAT, cache) for name in pasts),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_seq_len", TensorProto.INT32, []),
    ]
    presents = [f"present.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, cache) for name in presents]
    graph = helper.make_graph(builder.nodes, "builder", inputs, outputs, builder.inits, value_info=builder.infos)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def run(model: onnx.ModelProto, extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Every output of ``model`` on one fixed prompt (an empty past), with ``extra`` feeds."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: adapter inputs are initializers in graph inputs by design
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    feeds = {
        "/model/layers.0/input_layernorm/output_0": rng.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32),
        "seqlens_k": np.full(BATCH, SEQ - 1, np.int32),
        "total_seq_len": np.array(SEQ, np.int32),
    }
    for i in range(LAYERS):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((BATCH, KV_HEADS, 0, HEAD), np.float32)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {**feeds, **(extra or {})})))


def assert_same_outputs(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    other = onnx.ModelProto()
    other.CopyFrom(model)
    return other


def branch_feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """A builder graph's float branch weights, by name: our input names are the builder's."""
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if ".lora_" in t.name}


def dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


# ------------------------------------------------------------------------------- branches_as_inputs


@pytest.mark.parametrize("quant", [False, True], ids=["fp32", "int4"])
def test_branch_weights_become_inputs_with_empty_defaults_and_one_rank_axis_per_layer(quant):
    model = builder_model(quant)
    nbits = [n.name for n in model.graph.node if n.op_type == "MatMulNBits" and "/lora_" not in n.name]
    branches = branches_as_inputs(model.graph, MODULES)
    graph = model.graph
    assert list(branches) == sorted(MODULES)
    inputs = {i.name: dims(i) for i in graph.input}
    defaults = {t.name: tuple(t.dims) for t in graph.initializer}
    for path, entry in branches.items():
        key = path.replace(".self_attn.", ".attn.")  # the builder's name of the module
        in_features, out_features = SIZES[path[-6]]
        down, up = f"{key}.lora_A.MatMul.weight", f"{key}.lora_B.MatMul.weight"
        assert entry == branch_entry(path, down, up, in_features, out_features)
        assert inputs[down] == [in_features, rank_axis(path)] and inputs[up] == [rank_axis(path), out_features]
        assert defaults[down] == (in_features, 0) and defaults[up] == (0, out_features)
    assert len({e["rank_axis"] for e in branches.values()}) == len(MODULES)  # one axis per layer
    lora = [n for n in graph.node if "/lora_" in n.name]
    assert len(lora) == 2 * len(MODULES) and {n.op_type for n in lora} == {"MatMul"}  # int4 branches: float again
    assert not [n for n in lora if n.name.endswith("_Q4")]
    assert not [name for name in defaults if ".lora_" in name and name not in inputs]  # the built weights are gone
    assert [n.name for n in graph.node if n.op_type == "MatMulNBits"] == nbits  # the base stays as built


def test_stale_value_info_of_the_branch_outputs_is_dropped():
    model = builder_model()
    before = {v.name for v in model.graph.value_info}
    stale = {name for name in before if "/lora_A/" in name or "/lora_B/" in name}
    branches_as_inputs(model.graph, MODULES)
    assert len(stale) == 2 * len(MODULES)
    assert {v.name for v in model.graph.value_info} == before - stale  # the base's shapes stay


@pytest.mark.parametrize("quant", [False, True], ids=["fp32", "int4"])
def test_the_rewritten_graph_runs_adapters_of_any_ranks_and_is_the_base_without_one(quant):
    """Fed the branch weights of another build (other ranks in every module), the rewritten graph gives
    what that build gives; fed nothing, what a build with rank-0 branches gives; packed, the same."""
    model = builder_model(quant)
    branches = branches_as_inputs(model.graph, MODULES)
    ranks = {path: 1 + i % 5 for i, path in enumerate(MODULES)}
    other = builder_model(quant, ranks, quant_branches=False)  # the same base weights, float branches
    feeds = branch_feeds(other)
    assert set(feeds) == {e[side] for e in branches.values() for side in ("down", "up")}
    base = builder_model(quant, dict.fromkeys(MODULES, 0), quant_branches=False)
    assert not np.allclose(run(other)["logits"], run(base)["logits"], atol=1e-3)  # the branches count
    assert_same_outputs(run(model, feeds), run(other))
    assert_same_outputs(run(model), run(base))
    assert pack_qkv(model.graph) == LAYERS  # the export's next step
    assert_same_outputs(run(model, feeds), run(other))
    assert_same_outputs(run(model), run(base))


@pytest.mark.parametrize("damage", ["a branch of another module", "half a branch"])
def test_a_branch_that_matches_no_module_of_the_adapter_is_a_user_error(damage):
    model = builder_model()
    modules = MODULES[1:]
    if damage == "half a branch":
        modules = MODULES
        node = next(n for n in model.graph.node if n.name.endswith("/q_proj/lora_B/MatMul"))
        node.name = node.name.replace("lora_B", "lora_up")
    with pytest.raises(UserError, match="LoRA branch model.layers.0.attn.q_proj that matches no module"):
        branches_as_inputs(model.graph, modules)


def test_an_adapter_module_without_a_branch_is_a_user_error():
    with pytest.raises(UserError, match="no LoRA branch for adapter module model.layers.2.mlp.up_proj"):
        branches_as_inputs(builder_model().graph, [*MODULES, "model.layers.2.mlp.up_proj"])


# ----------------------------------------------------------------------------------------- pack_qkv


@pytest.mark.parametrize("quant", [False, True], ids=["fp32", "int4"])
def test_pack_qkv_concatenates_the_three_weights_along_n_and_computes_the_same(quant):
    model = builder_model(quant)
    built = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    packed = copy(model)
    assert pack_qkv(packed.graph) == LAYERS
    graph = packed.graph
    assert len(model.graph.node) - len(graph.node) == 3 * LAYERS  # -2 projections, -2 Adds, +1 Concat per layer
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    suffix = "MatMul_Q4" if quant else "MatMul"
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}.attn"
        for tensor in ("weight_Q4", "weight_scales") if quant else ("weight",):
            parts = [built[f"{prefix}.{p}_proj.MatMul.{tensor}"] for p in "qkv"]
            # MatMulNBits' tensors lead with N; MatMul's W is K x N.
            np.testing.assert_array_equal(
                weights[f"{prefix}.qkv_proj.{tensor}"], np.concatenate(parts, 0 if quant else 1)
            )
            assert not {f"{prefix}.{p}_proj.MatMul.{tensor}" for p in "qkv"} & weights.keys()
        node = next(n for n in graph.node if n.name == f"/model/layers.{layer}/attn/qkv_proj/{suffix}")
        if quant:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert attrs == {
                "K": HIDDEN,
                "N": (HEADS + 2 * KV_HEADS) * HEAD,
                "bits": 4,
                "block_size": BLOCK,
                "accuracy_level": 4,
            }
        attention = next(n for n in graph.node if n.name == f"/model/layers.{layer}/attn/GroupQueryAttention")
        assert list(attention.input[:3]) == [f"/model/layers.{layer}/attn/qkv_proj/lora/Add/output_0", "", ""]
        assert not [n for n in graph.node if re.search(rf"layers\.{layer}/attn/[qkv]_proj/(MatMul|lora/Add)", n.name)]
    assert_same_outputs(run(packed), run(model))


def _with_g_idx(graph: onnx.GraphProto) -> None:
    """Zero points and a g_idx (it runs along K) on every q/k/v projection."""
    for node in graph.node:
        if re.fullmatch(r"/model/layers\.\d/attn/[qkv]_proj/MatMul_Q4", node.name):
            n = next(a.i for a in node.attribute if a.name == "N")
            zeros, g_idx = node.input[1] + "_zp", node.input[1] + "_g_idx"
            graph.initializer.append(numpy_helper.from_array(np.full((n, 1), 0x88, np.uint8), zeros))
            graph.initializer.append(numpy_helper.from_array(np.zeros(HIDDEN, np.int32), g_idx))
            node.input.extend([zeros, g_idx])


def _k_attributes_differ(graph: onnx.GraphProto) -> None:
    for node in graph.node:
        if re.fullmatch(r"/model/layers\.\d/attn/k_proj/MatMul_Q4", node.name):
            next(a for a in node.attribute if a.name == "accuracy_level").i = 0


@pytest.mark.parametrize(
    "change",
    [_with_g_idx, _k_attributes_differ, lambda graph: pack_qkv(graph)],
    ids=["g_idx", "different attributes", "already packed"],
)
def test_pack_qkv_leaves_a_graph_it_cannot_pack_unchanged(change):
    model = builder_model(quant=True)
    change(model.graph)
    before = model.SerializeToString()
    assert pack_qkv(model.graph) == 0
    assert model.SerializeToString() == before
