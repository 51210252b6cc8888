"""The whole path on the real pretrained instruct LLM (SmolLM2-135M-Instruct, ``adalora_export.pretrained``), as a
user runs it from the command line: train a few short steps on chat records -> merge -> optimized int4 graph ->
``infer --chat`` on the int4 graph. Toy models hide what real ones break (a tied head, a chat template,
a 49k vocabulary, 30 layers)."""

from __future__ import annotations

import json

import pytest
from cli_runs import run_cli

from adalora_export.pretrained import smollm2_dir

pytestmark = pytest.mark.slow  # a 135M model on 2 cores: a few short steps only

QUESTIONS = [
    ("What does the Debian package curl do?", "curl transfers data from or to a server, over HTTP, FTP and more."),
    ("What does the Debian package htop do?", "htop is an interactive process viewer for the terminal."),
    ("What does the Debian package gzip do?", "gzip compresses and decompresses files."),
    ("What does the Debian package rsync do?", "rsync copies and synchronizes files, locally or over a network."),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """SmolLM2 trained 4 steps on chat records (attention projections, 48-token records), then pruned."""
    tmp = tmp_path_factory.mktemp("real")
    data = tmp / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QUESTIONS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    out = tmp / "run"
    flags = ["--max_steps", "4", "--batch_size", "2", "--max_length", "48", "--lr", "1e-3", "--save_steps", "0"]
    flags += ["--target_modules", "q_proj,v_proj", "--adalora_init_r", "4", "--adalora_target_r", "2"]
    assert run_cli("train", "--model", smollm2_dir(), "--data", data, "--output", out, *flags) == 0
    return tmp, out


def test_merge_then_optimized_graph_answers_a_chat(run, capsys):
    tmp, out = run
    merged, graph = tmp / "merged", tmp / "graph"
    assert run_cli("export", out / "adapter", "--merge", "--verify", "--output", merged) == 0
    assert (
        run_cli("export", out / "adapter", "--onnx", "--merge", "--optimized", "--dtype", "int4", "--output", graph)
        == 0
    )
    capsys.readouterr()
    argv = ["infer", graph, "--chat", "What is the capital of France?", "--max_new_tokens", "12"]
    assert run_cli(*argv) == 0
    assert "Paris" in capsys.readouterr().out


def test_merged_graph_with_a_cache_passes_its_check_at_the_default_tolerance(run, capsys):
    """The TorchScript export of the real model (30 layers, large activations) is checked on caches the model
    writes itself: random N(0, 1) caches put a correct graph 2.5e-4 off torch, over fp32's 1e-4."""
    tmp, out = run
    graph = tmp / "ts-graph"
    assert run_cli("export", out / "adapter", "--onnx", "--merge", "--with-past", "--output", graph) == 0
    parity = json.loads((graph / "onnx_manifest.json").read_text())["parity"]
    assert parity["tolerance"] == 1e-4 and parity["max_relative_error"] < 2e-5
    assert {c["past"] for c in parity["checks"]} == {0, 3, 9}
    capsys.readouterr()
    argv = ["infer", graph, "--chat", "What is the capital of France?", "--max_new_tokens", "12"]
    assert run_cli(*argv) == 0
    assert "Paris" in capsys.readouterr().out
