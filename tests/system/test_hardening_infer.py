"""Bad input to `infer`: exit code 2, one line naming the problem, inputs untouched (the matrix and its
checks: tests/bad_input.py); graphs whose external data points outside their directory are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from bad_input import Case, Env, Matrix, check, check_matrix, no_remote_code_ran, with_remote_code
from files import copy_tree

MATRIX = Matrix()


# ------------------------------------------------------------------------------------------- infer
def graph_copy(env: Env, tmp: Path) -> Path:
    return copy_tree(env.graph, tmp / "graph")


def point_outside(graph: Path, location: str) -> None:
    """Make the first external initializer of ``graph``/model.onnx read from ``location``."""
    model = onnx.load(str(graph / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in tensor.external_data if e.key == "location").value = location
    onnx.save(model, str(graph / "model.onnx"))


def infer_argv(graph: Path, *extra) -> list:
    return ["infer", graph, "--prompt", "the cat sat", "--max_new_tokens", "3", "--provider", "cpu", *extra]


@MATRIX.case("infer/missing-dir")
def _(env, tmp):
    return Case(infer_argv(tmp / "nope"), None, [], ["nope"])


@MATRIX.case("infer/file-for-dir")
def _(env, tmp):
    return Case(infer_argv(env.data), None, [env.data], ["train.jsonl"])


@MATRIX.case("infer/truncated-graph")
def _(env, tmp):
    graph = graph_copy(env, tmp)
    raw = (graph / "model.onnx").read_bytes()
    (graph / "model.onnx").write_bytes(raw[: len(raw) // 3])
    return Case(infer_argv(graph), None, [graph], ["model.onnx"])


@MATRIX.case("infer/truncated-external-data")
def _(env, tmp):
    graph = graph_copy(env, tmp)
    raw = (graph / "model.onnx.data").read_bytes()
    (graph / "model.onnx.data").write_bytes(raw[: len(raw) // 2])
    return Case(infer_argv(graph), None, [graph], ["model.onnx"])


@MATRIX.case("infer/external-data-dotdot")
def _(env, tmp):
    graph = graph_copy(env, tmp)
    shutil.copy(graph / "model.onnx.data", tmp / "outside.data")
    point_outside(graph, "../outside.data")
    return Case(infer_argv(graph), None, [graph, tmp / "outside.data"], ["../outside.data", "outside"])


@MATRIX.case("infer/external-data-absolute")
def _(env, tmp):
    graph = graph_copy(env, tmp)
    shutil.copy(graph / "model.onnx.data", tmp / "outside.data")
    point_outside(graph, str(tmp / "outside.data"))
    return Case(infer_argv(graph), None, [graph, tmp / "outside.data"], ["outside.data", "outside"])


@MATRIX.case("infer/external-data-symlink")
def _(env, tmp):
    graph = graph_copy(env, tmp)
    shutil.move(graph / "model.onnx.data", tmp / "outside.data")
    (graph / "model.onnx.data").symlink_to(tmp / "outside.data")
    return Case(infer_argv(graph), None, [graph, tmp / "outside.data"], ["model.onnx.data", "outside"])


@MATRIX.case("infer/external-data-through-symlinked-dir")
def _(env, tmp):
    graph = graph_copy(env, tmp)
    (tmp / "elsewhere").mkdir()
    shutil.move(graph / "model.onnx.data", tmp / "elsewhere" / "model.onnx.data")
    (graph / "sub").symlink_to(tmp / "elsewhere")
    point_outside(graph, "sub/model.onnx.data")
    return Case(infer_argv(graph), None, [graph, tmp / "elsewhere"], ["sub/model.onnx.data", "outside"])


@MATRIX.case("infer/external-data-in-a-constant-node")
def _(env, tmp):
    graph = graph_copy(env, tmp)
    (tmp / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    model = onnx.load(str(graph / "model.onnx"), load_external_data=False)
    value = onnx.numpy_helper.from_array(np.zeros(4, dtype=np.float32), "secret")
    value.ClearField("raw_data")
    value.data_location = onnx.TensorProto.EXTERNAL
    for key, text in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        entry = value.external_data.add()
        entry.key, entry.value = key, text
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["secret_out"], value=value))
    onnx.save(model, str(graph / "model.onnx"))
    return Case(infer_argv(graph), None, [graph, tmp / "secret.bin"], ["../secret.bin", "outside"])


@MATRIX.case("infer/remote-code-config")
def _(env, tmp):
    graph = with_remote_code(graph_copy(env, tmp))
    return Case(infer_argv(graph), None, [graph], ["config.json", "remote code"], after=no_remote_code_ran(graph))


@MATRIX.case("infer/adapter-for-a-graph-without-adapter-inputs")
def _(env, tmp):
    (tmp / "x.onnx_adapter").write_bytes(b"\0" * 64)
    argv = infer_argv(env.graph, "--adapter", tmp / "x.onnx_adapter")
    return Case(argv, None, [env.graph, tmp / "x.onnx_adapter"], ["graph", "--adapter-inputs"])


@MATRIX.case("infer/an-adapter-directory")
def _(env, tmp):
    # Issue 23: "missing file .../config.json" where the user handed an adapter instead of a graph.
    return Case(infer_argv(env.adapter), None, [env.adapter], ["is an adapter directory", "not an exported ONNX"])


@MATRIX.case("infer/prompt-and-text")
def _(env, tmp):
    return Case(infer_argv(env.graph, "--text", "hi"), None, [env.graph], ["--prompt", "--text"])


@MATRIX.case("infer/text-on-a-causal-lm")
def _(env, tmp):
    argv = ["infer", env.graph, "--text", "the cat", "--provider", "cpu"]
    return Case(argv, None, [env.graph], ["causal_lm"])


def test_matrix_covers_infer():
    check_matrix(MATRIX, {"infer"}, at_least=10)


@pytest.mark.parametrize("name", MATRIX.names())
def test_bad_input(name, hardening_env, tmp_path, capsys):
    check(MATRIX.build(name, hardening_env, tmp_path), hardening_env, tmp_path, capsys)
