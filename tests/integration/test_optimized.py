"""``export --onnx --merge --optimized``: onnxruntime-genai's builder makes the graph, our check holds it
to torch, and ``OnnxServer`` / ``infer`` drive it through onnxruntime-genai."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support import make_adapter, make_base, run_cli

from adalora_export.errors import UserError
from adalora_export.serving import OnnxServer
from adalora_export.sources import load_adapter

pytest.importorskip("onnxruntime_genai")

PROMPTS = ["the cat sat on the mat", "a dog", "big red bird flew over the house fast"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("optimized")
    base = make_base(tmp / "base", "llama", hidden=64)  # the builder's CPU attention wants head_size % 16 == 0
    adapter = make_adapter(base, tmp / "adapter", ranks=(2, 0, 3, 1))
    graphs = {"fp32": tmp / "fp32"}
    assert run_cli("export", str(adapter), "--onnx", "--merge", "--optimized", "-o", str(graphs["fp32"])) == 0
    return base, adapter, graphs, tmp


@torch.no_grad()
def greedy(model, ids: list[int], new: int) -> list[int]:
    sequence = list(ids)
    for _ in range(new):
        sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(ids) :]


def test_fp32_graph_matches_torch_and_serves_batches_and_streams(built, capsys):
    base, adapter_dir, graphs, _ = built
    manifest = json.loads((graphs["fp32"] / "onnx_manifest.json").read_text())
    assert manifest["kind"] == "optimized" and manifest["exporter"] == "onnxruntime-genai model builder"
    parity = manifest["parity"]
    assert parity["max_relative_error"] <= 1e-4 and parity["greedy_agreement"] == 1.0
    # The toy tokenizer knows 20 words, so the check reads random ids, and says so; fp32 keeps the logit bound.
    assert parity["checked"] and parity["scored_on"] == "random ids" and parity["scored_tokens"] > 200
    assert parity["bounds"] == {"max_relative_error": 1e-4} and parity["top1_agreement"] == 1.0
    assert parity["perplexity"] == pytest.approx(parity["reference_perplexity"], rel=1e-4)
    assert manifest["quantization"] is None
    assert (graphs["fp32"] / "genai_config.json").is_file()

    adapter = load_adapter(adapter_dir)
    model = adapter.apply_to(adapter.load_base(base))
    server = OnnxServer(graphs["fp32"])
    assert server.session is None and type(server.genai_model).__name__ == "Model"  # onnxruntime-genai drives it
    tokenizer = server.tokenizer
    eos = set(manifest.get("eos_token_ids") or [tokenizer.eos_token_id])
    chosen = PROMPTS + [PROMPTS[1].replace("dog", "cat")]  # two of one length share a generator
    wanted = {p: greedy(model, tokenizer(p)["input_ids"], 6) for p in chosen}
    texts = server.generate(chosen, 6)
    for prompt, text in zip(chosen, texts):
        want = wanted[prompt]
        if any(t in eos for t in want):
            want = want[: next(i for i, t in enumerate(want) if t in eos) + 1]
        assert text == tokenizer.decode(want, skip_special_tokens=True), prompt
    assert "".join(server.stream(chosen[0], 6)) == texts[0]
    capsys.readouterr()
    assert run_cli("infer", str(graphs["fp32"]), "--prompt", chosen[0], "--max_new_tokens", "6") == 0
    assert capsys.readouterr().out.strip() == texts[0].strip()


def test_a_row_that_onnxruntime_genai_ends_itself_ends_the_stream(built, tmp_path):
    """When onnxruntime-genai ends a row on an end token only its own config names (it then pads the row
    with token 0 to max_length), OnnxServer's stream ends there too."""
    import shutil

    _, _, graphs, _ = built
    prompt = OnnxServer(graphs["fp32"]).tokenizer(PROMPTS[0])["input_ids"]
    first = OnnxServer(graphs["fp32"]).generate_ids(prompt, 6)
    graph = tmp_path / "own-eos"
    shutil.copytree(graphs["fp32"], graph)
    config = json.loads((graph / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = [first[1]]  # onnxruntime-genai alone stops at the second token
    (graph / "genai_config.json").write_text(json.dumps(config))
    manifest = json.loads((graph / "onnx_manifest.json").read_text())
    assert first[1] not in (manifest.get("eos_token_ids") or [])
    assert OnnxServer(graph).generate_ids(prompt, 6) == first[:2]


@pytest.fixture(scope="module")
def int4_graph(built):
    """The merged int4 graph at the default settings."""
    _, adapter_dir, _, tmp = built
    out = tmp / "int4"
    assert run_cli("export", str(adapter_dir), "--onnx", "--merge", "--optimized", "--dtype", "int4", "-o", out) == 0
    return out


def node_attributes(graph_dir, op_type: str) -> dict[str, dict]:
    import onnx
    from onnx import helper

    graph = onnx.load(str(graph_dir / "model.onnx"), load_external_data=False).graph
    return {
        n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in graph.node if n.op_type == op_type
    }


def test_int4_is_held_to_perplexity_and_top1_and_records_its_settings(built, int4_graph, monkeypatch, capsys):
    from adalora_export.converters.onnx import quality

    _, adapter_dir, _, tmp = built
    manifest = json.loads((int4_graph / "onnx_manifest.json").read_text())
    parity, quantization = manifest["parity"], manifest["quantization"]
    assert manifest["dtype"] == "int4" and parity["checked"] and parity["scored_on"] == "random ids"
    assert parity["bounds"] == {"perplexity_increase": 0.2, "top1_agreement": 0.6}
    assert parity["perplexity_increase"] <= 0.2 and parity["top1_agreement"] >= 0.6
    assert 0 < parity["max_relative_error"] and 0 <= parity["greedy_agreement"] <= 1  # recorded, not bounded
    assert quantization == {
        "block_size": 64,
        "accuracy_level": 4,
        "head": "int8",
        "sensitive": "int8",
        "builder_options": [
            "block_size=64",
            "accuracy_level=4",
            "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8",
        ],
    }
    nbits = node_attributes(int4_graph, "MatMulNBits")
    assert {a["block_size"] for a in nbits.values()} == {64} and {a["accuracy_level"] for a in nbits.values()} == {4}
    assert nbits["/lm_head/MatMul_Q8"]["bits"] == 8 and {a["bits"] for a in nbits.values()} == {4, 8}
    assert len(OnnxServer(int4_graph).generate(PROMPTS[0], 4)) > 0

    # Out of bounds nothing is written, with one line saying why; an explicit --tolerance is the user's bound.
    argv = ["export", str(adapter_dir), "--onnx", "--merge", "--optimized", "--dtype", "int4"]
    monkeypatch.setattr(quality, "INT4_MIN_TOP1", 0.999)
    capsys.readouterr()
    assert run_cli(*argv, "-o", tmp / "int4_refused") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # past the bars
    assert len(errors) == 1 and "the int4 graph's perplexity on random ids is" in errors[0], errors
    assert "(at least 100%); nothing written" in errors[0] and not (tmp / "int4_refused").exists()
    assert run_cli(*argv, "--tolerance", "2", "-o", tmp / "int4_tolerant") == 0
    parity = json.loads((tmp / "int4_tolerant" / "onnx_manifest.json").read_text())["parity"]
    assert parity["tolerance"] == 2.0 and parity["bounds"] == {"perplexity_increase": 2.0}


def test_the_int4_flags_reach_the_builders_graph(built, tmp_path):
    _, adapter_dir, _, _ = built
    flags = ["--int4-block-size", "32", "--int4-accuracy-level", "0", "--int4-head", "float"]
    flags += ["--int4-sensitive", "int4"]
    out = tmp_path / "int4"
    argv = ["export", str(adapter_dir), "--onnx", "--merge", "--optimized", "--dtype", "int4", *flags]
    assert run_cli(*argv, "--tolerance", "10", "-o", out) == 0
    quantization = json.loads((out / "onnx_manifest.json").read_text())["quantization"]
    assert {k: quantization[k] for k in ("block_size", "accuracy_level", "head", "sensitive")} == {
        "block_size": 32,
        "accuracy_level": 0,
        "head": "float",
        "sensitive": "int4",
    }
    nbits = node_attributes(out, "MatMulNBits")
    assert nbits and all((a["block_size"], a.get("accuracy_level", 0), a["bits"]) == (32, 0, 4) for a in nbits.values())
    assert "/lm_head/MatMul" in node_attributes(out, "MatMul")  # the head left in float


def test_a_cuda_graph_without_a_usable_gpu_is_written_unchecked(built, tmp_path, monkeypatch, capsys):
    """--target cuda where no CUDA GPU is usable: the graph is built, the manifest says it was not checked."""
    from adalora_export.converters.onnx import optimized

    _, adapter_dir, _, _ = built
    monkeypatch.setattr(optimized, "cuda_usable", lambda: False)
    monkeypatch.setattr(optimized, "_reference", None)  # no torch model is loaded for a check that cannot run
    out = tmp_path / "cuda"
    capsys.readouterr()
    argv = ["export", str(adapter_dir), "--onnx", "--merge", "--optimized", "--dtype", "int4", "--target", "cuda"]
    assert run_cli(*argv, "-o", out) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith(": not checked on this machine: no usable CUDA GPU"), line
    manifest = json.loads((out / "onnx_manifest.json").read_text())
    assert manifest["parity"] == {"checked": False, "reason": "not checked on this machine: no usable CUDA GPU"}
    assert (
        manifest["target"] == "cuda" and manifest["quantization"]["accuracy_level"] == 0
    )  # the builder's CUDA default
    assert manifest["eos_token_ids"] and (out / "model.onnx").is_file() and (out / "genai_config.json").is_file()
    genai = json.loads((out / "genai_config.json").read_text())
    assert "cuda" in json.dumps(genai["model"]["decoder"]["session_options"]["provider_options"])


def test_int4_adapter_inputs_repack_qkv_without_changing_a_number(built, monkeypatch):
    """Given an adapter the builder unpacks q, k and v; we pack them back into one MatMulNBits (their
    quantized blocks concatenated) with one Add of the three branches: fewer nodes, the same figures."""
    import onnx

    from adalora_export.converters.onnx import export_optimized, optimized

    base, adapter_dir, _, tmp = built
    adapter = load_adapter(adapter_dir)
    # All int4: with the default int8 sensitive layers, a layer whose v projection is int8 stays unpacked.
    options = dict(dtype="int4", tolerance=10.0, adapter_inputs=True, int4_sensitive="int4")
    packed = export_optimized(adapter, base, tmp / "int4_packed", **options)
    monkeypatch.setattr(optimized, "pack_qkv", lambda graph: 0)
    unpacked = export_optimized(adapter, base, tmp / "int4_unpacked", **options)
    nodes = {
        name: [n.op_type for n in onnx.load(str(tmp / name / "model.onnx"), load_external_data=False).graph.node]
        for name in ("int4_packed", "int4_unpacked")
    }
    layers = nodes["int4_packed"].count("GroupQueryAttention")
    assert nodes["int4_unpacked"].count("MatMulNBits") - nodes["int4_packed"].count("MatMulNBits") == 2 * layers
    assert len(nodes["int4_unpacked"]) - len(nodes["int4_packed"]) == 3 * layers  # -2 MatMulNBits, -2 Add, +1 Concat
    for key in ("max_relative_error", "greedy_agreement"):
        assert packed["parity"][key] == pytest.approx(unpacked["parity"][key], abs=1e-6), key


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--onnx", "--optimized"], "add --merge or --adapter-inputs"),
        (["--onnx", "--merge", "--optimized", "--dtype", "fp16"], "fp16 graphs for --target cuda only"),
        (["--onnx", "--merge", "--target", "cuda"], "--target does not apply to --onnx"),
        (["--onnx", "--merge", "--optimized", "--tolerance", "-1"], "tolerance must be a positive number, got -1"),
        (
            ["--onnx", "--merge", "--optimized", "--with-past"],
            "--with-past does not apply to --onnx --optimized",
        ),
        (["--onnx", "--merge", "--int4-head", "int8"], "--int4-head does not apply to --onnx"),
        (["--to", "lora", "--int4-sensitive", "int4"], "--int4-sensitive does not apply to --to lora"),
        (["--merge", "--int4-block-size", "64"], "--int4-block-size does not apply to --merge"),
        (
            ["--onnx", "--merge", "--optimized", "--int4-accuracy-level", "0"],
            "--int4-accuracy-level does not apply to --dtype fp32 (int4 settings)",
        ),
        (
            [
                "--onnx",
                "--optimized",
                "--adapter-inputs",
                "--dtype",
                "fp16",
                "--target",
                "cuda",
                "--int4-head",
                "float",
            ],
            "--int4-head does not apply to --dtype fp16",
        ),
        (
            ["--onnx", "--merge", "--optimized", "--dtype", "int4", "--int4-block-size", "48"],
            "'48' is not one of '16', '32', '64', '128', '256'",
        ),
    ],
)
def test_bad_flags_exit_2(built, tmp_path, capsys, flags, message):
    _, adapter_dir, _, _ = built
    capsys.readouterr()
    assert run_cli("export", str(adapter_dir), *flags, "-o", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_an_architecture_the_builder_does_not_take_is_refused(tmp_path, capsys):
    base = make_base(tmp_path / "gpt2", "gpt2")
    adapter = make_adapter(base, tmp_path / "adapter")
    capsys.readouterr()
    assert run_cli("export", str(adapter), "--onnx", "--merge", "--optimized", "-o", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "does not take GPT2LMHeadModel" in err and "--onnx --merge instead" in err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def adapter_graph(built):
    """The builder's graph with adapter inputs (the first adapter exported with it) and a second adapter
    of other ranks per layer: (graph, second adapter's directory)."""
    base, first, _, tmp = built
    second = make_adapter(base, tmp / "second", seed=1, ranks=(1, 4, 0, 2))  # other ranks per layer
    out = tmp / "adapter_graph"
    assert run_cli("export", str(first), "--onnx", "--optimized", "--adapter-inputs", "-o", str(out)) == 0
    return out, second


def test_adapter_inputs_on_the_builders_graph_hot_swap_adapters_of_any_ranks(built, adapter_graph, tmp_path):
    from transformers import AutoModelForCausalLM

    base, first, _, _ = built
    out, second = adapter_graph
    manifest = json.loads((out / "onnx_manifest.json").read_text())
    assert manifest["adapter_inputs"] and manifest["parity"]["greedy_agreement"] == 1.0
    assert len({b["rank_axis"] for b in manifest["branches"].values()}) == len(manifest["branches"])  # one axis each
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    packed = [n for n in graph.node if n.name.endswith(("qkv_proj/MatMul", "qkv_proj/MatMul_Q4"))]
    assert len(packed) == len(attention) > 0 and all(list(n.input[1:3]) == ["", ""] for n in attention)
    assert not [n for n in graph.node if n.name.endswith(("q_proj/MatMul", "q_proj/MatMul_Q4"))]  # repacked
    assert (
        run_cli("export", str(second), "--onnx", "--graph", str(out), "-o", str(tmp_path / "second.onnx_adapter")) == 0
    )

    server = OnnxServer(out)
    ids = server.tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        plain = greedy(AutoModelForCausalLM.from_pretrained(base).eval(), ids, 6)
    wants = {}
    for name, directory in (("first", first), ("second", second)):
        adapter = load_adapter(directory)
        wants[name] = greedy(adapter.apply_to(adapter.load_base(base)), ids, 6)
    assert len({tuple(plain), tuple(wants["first"]), tuple(wants["second"])}) == 3  # the three differ
    decode = server.tokenizer.decode
    assert server.generate(PROMPTS[0], 6) == decode(plain, skip_special_tokens=True)  # no adapter: the base
    server.set_adapter(out / "adapter.onnx_adapter")
    assert server.generate(PROMPTS[0], 6) == decode(wants["first"], skip_special_tokens=True)
    server.set_adapter(tmp_path / "second.onnx_adapter")  # swapped on the same loaded graph
    assert server.generate(PROMPTS[0], 6) == decode(wants["second"], skip_special_tokens=True)
    server.set_adapter(None)
    assert server.generate(PROMPTS[0], 6) == decode(plain, skip_special_tokens=True)


def test_set_adapter_none_releases_the_adapters_and_serves_the_base(adapter_graph, monkeypatch):
    """set_adapter(None) drops the loaded og.Adapters (nothing holds them any more) and generates exactly
    what the base graph generates."""
    import gc
    import weakref

    og = pytest.importorskip("onnxruntime_genai")
    made = []

    class Tracked(og.Adapters):  # each og.Adapters the server makes, watched through a weak reference
        def __init__(self, *args):
            super().__init__(*args)
            made.append(weakref.ref(self))

    monkeypatch.setattr(og, "Adapters", Tracked)
    out, _ = adapter_graph
    base_text = OnnxServer(out).generate(PROMPTS[0], 6)
    server = OnnxServer(out, adapter=out / "adapter.onnx_adapter")
    assert server.generate(PROMPTS[0], 6) != base_text  # the adapter was active
    server.set_adapter(None)
    gc.collect()
    assert made and all(ref() is None for ref in made)  # released, not merely inactive
    assert server.generate(PROMPTS[0], 6) == base_text


def test_run_on_an_optimized_graph_is_a_user_error(built):
    """onnxruntime-genai runs the builder's graphs (no plain session): ``run`` says so instead of failing."""
    _, _, graphs, _ = built
    server = OnnxServer(graphs["fp32"])
    ids = np.asarray([server.tokenizer(PROMPTS[0])["input_ids"]], np.int64)
    with pytest.raises(UserError, match="onnxruntime-genai.*generate or stream.*genai_model"):
        server.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate-data", "is truncated"),
        ("genai-config-not-json", "genai_config.json is not valid JSON"),
        ("genai-config-without-decoder", "not an onnxruntime-genai config"),
    ],
)
def test_a_damaged_optimized_directory_is_exit_2(built, tmp_path, capsys, damage, message):
    """Issue 23: a truncated model.onnx.data or a damaged genai_config.json was a traceback from onnxruntime-genai."""
    import shutil

    graph = shutil.copytree(built[2]["fp32"], tmp_path / "graph")
    if damage == "truncate-data":
        data = (graph / "model.onnx.data").read_bytes()
        (graph / "model.onnx.data").write_bytes(data[: len(data) // 2])
    elif damage == "genai-config-not-json":
        (graph / "genai_config.json").write_text('{"model": {')
    else:
        (graph / "genai_config.json").write_text(json.dumps({"model": {"type": "llama"}}))
    capsys.readouterr()
    assert run_cli("infer", str(graph), "--prompt", "the cat", "--max_new_tokens", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_an_adapter_file_for_another_graph_is_refused_when_set(adapter_graph, tmp_path):
    """Issue 23: set_adapter accepted an .onnx_adapter of another model and the first request raised."""
    import onnxruntime as ort

    graph, _ = adapter_graph
    server = OnnxServer(graph)
    branch = next(iter(server.manifest["branches"].values()))
    cases = {
        "head.onnx_adapter": ({"classifier.weight": np.zeros((3, 64), np.float32)}, "does not take"),
        "wide.onnx_adapter": ({branch["down"]: np.zeros((branch["in"] * 2, 2), np.float32)}, "the graph takes"),
        "ranks.onnx_adapter": (
            {
                branch["down"]: np.zeros((branch["in"], 2), np.float32),
                branch["up"]: np.zeros((3, branch["out"]), np.float32),
            },
            "differ in rank",
        ),
    }
    for name, (params, message) in cases.items():
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
        fmt.export_adapter(str(tmp_path / name))
        with pytest.raises(UserError, match=message):
            server.set_adapter(tmp_path / name)
    assert server.adapter is None  # a refused file leaves the server as it was
