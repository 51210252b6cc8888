"""Serving exported graphs: generation against transformers, the KV cache, classifiers, providers, safety."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from support import LLAMA_TARGETS, adapter_at_ranks, run_cli, save_base, tiny_llama, torch_forward

from adalora_export.converters.onnx import ADAPTER_FILE, OnnxKind, export_onnx
from adalora_export.errors import UserError
from adalora_export.formats.peft import save_adapter
from adalora_export.hf import load_pretrained
from adalora_export.model import unwrap_adapters
from adalora_export.serving import OnnxServer, cuda_usable, infer

PROMPT = "w5 w17 w42 w9"


@pytest.fixture(scope="module")
def llama_graph(tmp_path_factory):
    """A merged Llama graph with a KV cache, exported through the CLI, and its base and adapter."""
    work = tmp_path_factory.mktemp("serving")
    model = tiny_llama(seed=3)
    base_dir = save_base(model, work / "base")
    adapter = adapter_at_ranks(model, LLAMA_TARGETS, [3, 0, 5, 1], seed=4)
    adapter_dir = save_adapter(adapter, work / "adapter")
    out = work / "onnx"
    assert run_cli("export", adapter_dir, "--base", base_dir, "--onnx", "--merge", "--with-past", "--output", out) == 0
    return work, base_dir, adapter, out


def test_infer_greedy_matches_transformers_generate(llama_graph, capsys):
    _, base_dir, adapter, out = llama_graph
    merged = unwrap_adapters(adapter.apply_to(load_pretrained(base_dir, dtype=torch.float32).eval()))
    server = OnnxServer(out, provider="cpu")
    ids = server.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        expected = merged.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
    assert len(expected) >= 3
    assert server.generate_ids(ids, 12) == expected  # token for token, through the KV cache

    capsys.readouterr()
    assert run_cli("infer", out, "--prompt", PROMPT, "--max_new_tokens", 12, "--provider", "cpu") == 0
    assert capsys.readouterr().out.strip() == server.tokenizer.decode(expected, skip_special_tokens=True)
    assert infer(out, prompt=PROMPT, max_new_tokens=12, provider="cpu") == server.tokenizer.decode(
        expected, skip_special_tokens=True
    )


def test_a_batch_of_prompts_gives_each_what_it_gets_alone(llama_graph):
    _, base_dir, adapter, out = llama_graph
    merged = unwrap_adapters(adapter.apply_to(load_pretrained(base_dir, dtype=torch.float32).eval()))
    server = OnnxServer(out, provider="cpu")
    prompts = [PROMPT, "w3", "w8 w1 w60 w2 w2 w7 w31"]  # different lengths: left padding in one batch
    for use_cache in (True, False):
        texts = server.generate(prompts, 10, use_cache=use_cache)
        for prompt, text in zip(prompts, texts):
            ids = server.tokenizer(prompt)["input_ids"]
            with torch.no_grad():
                want = merged.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids) :]
            assert text == server.tokenizer.decode(want.tolist(), skip_special_tokens=True), (prompt, use_cache)


def test_streaming_gives_the_text_piece_by_piece(llama_graph, capsys):
    _, _, _, out = llama_graph
    server = OnnxServer(out, provider="cpu")
    whole = server.generate(PROMPT, 12)
    pieces = list(server.stream(PROMPT, 12))
    assert len(pieces) > 1 and "".join(pieces) == whole  # one piece per decoded token, in order
    seen = []
    assert infer(out, prompt=PROMPT, max_new_tokens=12, provider="cpu", on_text=seen.append) == whole
    assert seen == pieces


def test_kv_cache_path_equals_no_cache_path(llama_graph):
    _, _, _, out = llama_graph
    server = OnnxServer(out, provider="cpu")
    assert server.with_past
    ids = server.tokenizer(PROMPT)["input_ids"]
    cached = server.generate_ids(ids, 10, use_cache=True)
    assert cached == server.generate_ids(ids, 10, use_cache=False)
    # and the logits themselves: one decode step through the cache against the full sequence
    full = ids + cached[:1]
    prompt_run = server.run({**server_feeds(ids, 0), **empty_past(server, 1)})
    cache = server.manifest["cache"]
    past = {name: prompt_run[present] for name, present in zip(cache["inputs"], cache["outputs"])}
    step = server.run({**server_feeds(full[-1:], len(ids)), **past})["logits"][0, -1]
    whole = server.run({**server_feeds(full, 0), **empty_past(server, 1)})["logits"][0, -1]
    assert np.abs(step - whole).max() <= 1e-4 * np.abs(whole).max()


def server_feeds(ids: list[int], past: int) -> dict[str, np.ndarray]:
    total = past + len(ids)
    return {
        "input_ids": np.asarray([ids], np.int64),
        "attention_mask": np.ones((1, total), np.int64),
        "position_ids": np.arange(past, total, dtype=np.int64)[None],
    }


def empty_past(server: OnnxServer, batch: int) -> dict[str, np.ndarray]:
    cache = server.manifest["cache"]
    shape = (batch, cache["num_kv_heads"], 0, cache["head_dim"])
    return {name: np.zeros(shape, np.float32) for name in cache["inputs"]}


def test_sampling_is_seeded_and_top_k_1_is_greedy(llama_graph):
    _, _, _, out = llama_graph
    server = OnnxServer(out, provider="cpu")
    ids = server.tokenizer(PROMPT)["input_ids"]
    draw = dict(do_sample=True, temperature=1.5, seed=123)
    first = server.generate_ids(ids, 10, **draw)
    assert first == server.generate_ids(ids, 10, **draw)
    assert server.generate_ids(ids, 10, do_sample=True, top_k=1, seed=5) == server.generate_ids(ids, 10)
    draws = {tuple(server.generate_ids(ids, 10, do_sample=True, temperature=5.0, seed=s)) for s in range(4)}
    assert len(draws) > 1
    with pytest.raises(UserError, match="temperature"):
        server.generate_ids(ids, 3, do_sample=True, temperature=0)


def test_auto_provider_falls_back_to_cpu_quietly(llama_graph, capfd):
    _, _, _, out = llama_graph
    capfd.readouterr()
    server = OnnxServer(out, provider="auto")
    captured = capfd.readouterr()
    if cuda_usable():
        assert server.provider == "CUDAExecutionProvider"
    else:
        assert server.provider == "CPUExecutionProvider"
        assert captured.err == "" and captured.out == ""  # no onnxruntime-gpu error noise
        with pytest.raises(UserError, match="CUDA"):
            OnnxServer(out, provider="cuda")


def test_classifier_adapter_with_trained_head(tmp_path):
    """A seq_cls adapter whose fresh head is trained: the head is a swappable input too."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    model = BertForSequenceClassification(config).eval()
    base_dir = save_base(model, tmp_path / "bert")
    adapter = adapter_at_ranks(model, ["query", "value"], [2, 0, 3], task_type="seq_cls")
    g = torch.Generator().manual_seed(9)
    adapter.extra_weights = {
        "classifier.weight": torch.randn(3, 32, generator=g),
        "classifier.bias": torch.randn(3, generator=g),
    }
    out = tmp_path / "onnx"
    manifest = export_onnx(adapter, base_dir, out, kind=OnnxKind.ADAPTER_INPUTS)
    assert set(manifest["extra_inputs"]) == {"classifier.weight", "classifier.bias"}
    assert manifest["parity"]["max_relative_error"] <= 1e-4

    server = OnnxServer(out, provider="cpu", adapter=out / ADAPTER_FILE)
    text = "w7 w8 w9 w100"
    feeds = {"input_ids": np.asarray(server.tokenizer([text])["input_ids"], np.int64)}
    feeds.update(attention_mask=np.ones_like(feeds["input_ids"]), token_type_ids=np.zeros_like(feeds["input_ids"]))
    for active in (adapter, None):
        server.set_adapter(out / ADAPTER_FILE if active else None)
        logits = torch_forward(base_dir, active, feeds)[0]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        result = server.classify(text)[0]
        assert result["label"] == model.config.id2label[int(probs.argmax())]
        assert abs(result["score"] - probs.max()) < 1e-4


def test_a_head_trained_by_the_adapter_answers_only_with_it_and_long_texts_are_cut(tmp_path):
    """Issue 23: an adapter-input classifier on a bare encoder answered from its random default head when
    run without --adapter; and a text past the position embeddings (no max_length recorded, as in a PEFT
    save) failed inside onnxruntime."""
    from transformers import BertConfig, BertForSequenceClassification

    from adalora_export.adapter import TaskInfo

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        max_position_embeddings=32,
    )
    model = BertForSequenceClassification(config).eval()
    base_dir = save_base(model.bert, tmp_path / "encoder")  # a bare encoder: no head of its own
    labels = {0: "a", 1: "b", 2: "c"}
    adapter = adapter_at_ranks(model, ["query", "value"], [2, 1], task_type="seq_cls", task_info=TaskInfo(labels))
    adapter.extra_weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("classifier")}
    out = tmp_path / "onnx"
    manifest = export_onnx(adapter, base_dir, out, kind=OnnxKind.ADAPTER_INPUTS)
    assert manifest["head_in_base"] is False and manifest["max_length"] is None

    server = OnnxServer(out, provider="cpu")
    with pytest.raises(UserError, match="trained by its adapter"):
        server.classify("w7 w8")
    server.set_adapter(out / ADAPTER_FILE)
    long_text = " ".join(f"w{5 + i % 100}" for i in range(200))  # 200 tokens, 32 positions
    result = server.classify([long_text, "w7 w8"])
    assert result[0]["truncated"] and not result[1]["truncated"]
    assert result[0]["label"] in labels.values()


def test_external_data_outside_the_directory_is_refused(llama_graph, tmp_path):
    _, _, _, out = llama_graph
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    model = onnx.load(str(bad / "model.onnx"), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for location in ["../stolen.data", "/etc/passwd"]:
        for entry in external[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save(model, str(bad / "model.onnx"))
        with pytest.raises(UserError, match="outside"):
            OnnxServer(bad, provider="cpu")
    # a symlink inside the directory that leads out of it
    (tmp_path / "elsewhere.data").write_bytes((out / "model.onnx.data").read_bytes())
    (bad / "model.onnx.data").unlink()
    (bad / "model.onnx.data").symlink_to(tmp_path / "elsewhere.data")
    shutil.copyfile(out / "model.onnx", bad / "model.onnx")
    with pytest.raises(UserError, match="outside"):
        OnnxServer(bad, provider="cpu")


def test_infer_bad_input_exits_2(llama_graph, tmp_path, capsys):
    _, _, _, out = llama_graph
    assert run_cli("infer", tmp_path / "missing", "--prompt", PROMPT) == 2
    assert run_cli("infer", out, "--text", "w5") == 2  # a causal LM cannot embed
    assert run_cli("infer", out) == 2  # neither --prompt nor --text
    assert run_cli("infer", out, "--prompt", PROMPT, "--adapter", tmp_path / "none.onnx_adapter") == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "causal_lm" in err and "exported without --adapter-inputs" in err
    for both_or_neither in [{}, {"prompt": PROMPT, "text": "w5"}]:
        with pytest.raises(UserError, match="exactly one of --prompt"):
            infer(out, **both_or_neither)
