"""Bad input to `export` (--to lora, --merge, --onnx, and flags that do not apply): exit code 2, one
line naming the problem, nothing written, inputs untouched (the matrix and its checks: tests/bad_input.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from adapters import adapter_at_ranks, make_adapter
from bad_input import (
    Case,
    Env,
    Matrix,
    adapter_copy,
    base_copy,
    check,
    check_matrix,
    merge_argv,
    no_remote_code_ran,
    pickled_base,
    with_remote_code,
)
from cli_runs import ROOT, SUBPROCESS_ENV, run_cli
from files import corrupt_safetensors, leftovers
from safetensors.torch import load_file

MATRIX = Matrix()


# ------------------------------------------------------------------------------- export --to lora
@MATRIX.case("lora/missing-adapter")
def _(env, tmp):
    argv = ["export", tmp / "nope", "--to", "lora", "--output", tmp / "out"]
    return Case(argv, tmp / "out", [], ["nope", "does not exist"])


@MATRIX.case("lora/adapter-safetensors-bad_offsets")
def _(env, tmp):
    adapter = adapter_copy(env, tmp)
    corrupt_safetensors(adapter / "adapter_model.safetensors", "bad_offsets")
    argv = ["export", adapter, "--to", "lora", "--output", tmp / "out"]
    return Case(argv, tmp / "out", [adapter], ["adapter_model.safetensors", "not a valid safetensors"])


@MATRIX.case("lora/every-module-rank-0")
def _(env, tmp):
    out = tmp / "zero"
    make_adapter(env.base, out, ranks=(0,))
    argv = ["export", out, "--to", "lora", "--output", tmp / "out"]
    return Case(argv, tmp / "out", [out], ["rank 0"])


@MATRIX.case("lora/output-exists")
def _(env, tmp):
    (tmp / "out").write_text("a file, not mine to replace")
    argv = ["export", env.adapter, "--to", "lora", "--output", tmp / "out"]
    return Case(argv, None, [env.adapter, tmp / "out"], ["already exists"])


@MATRIX.case("lora/out-of-disk")
def _(env, tmp):
    argv = ["export", env.adapter, "--to", "lora", "--output", tmp / "out"]
    return Case(argv, tmp / "out", [env.adapter], ["out", "File too large"], fsize=3000)


# ---------------------------------------------------------------------------------- export --merge
@MATRIX.case("merge/base-missing")
def _(env, tmp):
    argv = merge_argv(env.adapter, tmp / "out", "--base", tmp / "nope")
    return Case(argv, tmp / "out", [env.adapter], ["nope", "does not exist"])


@MATRIX.case("merge/base-is-a-file")
def _(env, tmp):
    argv = merge_argv(env.adapter, tmp / "out", "--base", env.data)
    return Case(argv, tmp / "out", [env.adapter, env.data], ["train.jsonl", "not a directory"])


@MATRIX.case("merge/adapter-for-another-architecture")
def _(env, tmp):
    argv = merge_argv(env.adapter, tmp / "out", "--base", env.gpt2)
    return Case(argv, tmp / "out", [env.adapter, env.gpt2], ["adapter module model.layers.0", "matches no nn.Linear"])


@MATRIX.case("merge/adapter-for-another-size")
def _(env, tmp):
    argv = merge_argv(env.adapter, tmp / "out", "--base", env.wide)
    return Case(argv, tmp / "out", [env.adapter, env.wide], ["adapter module", "shape"])


for _kind in ("cut_header", "past_end", "bad_offsets", "wrong_dtype"):

    @MATRIX.case(f"merge/base-safetensors-{_kind}")
    def _(env, tmp, kind=_kind):
        base = base_copy(env, tmp)
        corrupt_safetensors(base / "model.safetensors", kind)
        argv = merge_argv(env.adapter, tmp / "out", "--base", base)
        return Case(argv, tmp / "out", [env.adapter, base], ["model.safetensors", "not a valid safetensors"])


@MATRIX.case("merge/pickle-base-without-allow-pickle")
def _(env, tmp):
    base = pickled_base(env, tmp)
    argv = merge_argv(env.adapter, tmp / "out", "--base", base)
    return Case(argv, tmp / "out", [env.adapter, base], ["pytorch_model.bin", "--allow-pickle"])


@MATRIX.case("merge/remote-code-config")
def _(env, tmp):
    base = with_remote_code(base_copy(env, tmp))
    argv = merge_argv(env.adapter, tmp / "out", "--base", base)
    return Case(argv, tmp / "out", [env.adapter, base], ["config.json", "remote code"], after=no_remote_code_ran(base))


@MATRIX.case("merge/base-without-weights")
def _(env, tmp):
    base = base_copy(env, tmp)
    (base / "model.safetensors").unlink()
    argv = merge_argv(env.adapter, tmp / "out", "--base", base)
    return Case(argv, tmp / "out", [env.adapter, base], ["no weights in", "base"])


@MATRIX.case("merge/adapter-names-no-local-base")
def _(env, tmp):
    adapter = adapter_copy(env, tmp)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3-8B"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    argv = merge_argv(adapter, tmp / "out")
    return Case(argv, tmp / "out", [adapter], ["meta-llama/Llama-3-8B", "--base"])


@MATRIX.case("merge/output-is-the-base")
def _(env, tmp):
    base = base_copy(env, tmp)
    argv = merge_argv(env.adapter, base, "--base", base, "--overwrite")
    return Case(argv, None, [env.adapter, base], [f"output {base} would replace the input {base} (the base model)"])


@MATRIX.case("merge/output-exists")
def _(env, tmp):
    (tmp / "out").mkdir()
    argv = merge_argv(env.adapter, tmp / "out")
    return Case(argv, None, [env.adapter, tmp / "out"], ["already exists", "--overwrite"])


@MATRIX.case("merge/output-under-a-file")
def _(env, tmp):
    shutil.copy(env.data, tmp / "file")
    argv = merge_argv(env.adapter, tmp / "file" / "merged")
    return Case(argv, None, [env.adapter, tmp / "file"], ["cannot write", "merged"])


@MATRIX.case("merge/out-of-disk")
def _(env, tmp):
    argv = merge_argv(env.adapter, tmp / "out")
    return Case(argv, tmp / "out", [env.adapter, env.base], ["out", "File too large"], fsize=20_000)


# ----------------------------------------------------------------------------------- export --onnx
def gpt2_classifier(env: Env, tmp: Path) -> tuple[Path, Path]:
    """(a 3-label GPT-2 classifier adapter that records no pad token, a GPT-2 base whose head has 2 labels)."""
    from transformers import AutoModelForSequenceClassification

    from adalora_export.adapter import TaskInfo
    from adalora_export.formats.peft import save_adapter

    model = AutoModelForSequenceClassification.from_pretrained(env.gpt2, num_labels=3)
    adapter = adapter_at_ranks(model, ["c_attn"], [2, 1], base_model_name_or_path=str(env.gpt2), task_type="seq_cls")
    adapter.extra_weights = {"score.weight": torch.randn(3, 32) * 0.1}
    adapter.task_info = TaskInfo(id2label={0: "a", 1: "b", 2: "c"}, head_modules=["score"])
    two = tmp / "two_label_base"
    AutoModelForSequenceClassification.from_pretrained(env.gpt2, num_labels=2).save_pretrained(two)
    return save_adapter(adapter, tmp / "classifier"), two


@MATRIX.case("merge/classifier-on-a-head-of-another-size")
def _(env, tmp):
    adapter, two = gpt2_classifier(env, tmp)
    argv = merge_argv(adapter, tmp / "out", "--base", two)
    return Case(argv, tmp / "out", [adapter, two], ["classifier has 3 labels", "has 2"])


@MATRIX.case("onnx/classifier-on-a-head-of-another-size")
def _(env, tmp):
    adapter, two = gpt2_classifier(env, tmp)
    argv = onnx_argv(adapter, tmp / "out", "--base", two)
    return Case(argv, tmp / "out", [adapter, two], ["classifier has 3 labels", "has 2"])


@MATRIX.case("onnx/decoder-classifier-without-a-pad-token")
def _(env, tmp):
    adapter, _ = gpt2_classifier(env, tmp)
    argv = onnx_argv(adapter, tmp / "out", "--base", env.gpt2)
    return Case(argv, tmp / "out", [adapter, env.gpt2], ["gpt2 classifier needs a pad token id"])


def onnx_argv(adapter: Path, out: Path, *extra) -> list:
    return ["export", adapter, "--onnx", "--output", out, *extra]


@MATRIX.case("onnx/adapter-for-another-architecture")
def _(env, tmp):
    argv = onnx_argv(env.adapter, tmp / "out", "--base", env.gpt2)
    return Case(argv, tmp / "out", [env.adapter, env.gpt2], ["adapter module model.layers.0"])


@MATRIX.case("onnx/adapter-for-another-size")
def _(env, tmp):
    argv = onnx_argv(env.adapter, tmp / "out", "--base", env.wide)
    return Case(argv, tmp / "out", [env.adapter, env.wide], ["adapter module"])


@MATRIX.case("onnx/remote-code-config")
def _(env, tmp):
    base = with_remote_code(base_copy(env, tmp))
    argv = onnx_argv(env.adapter, tmp / "out", "--base", base)
    return Case(argv, tmp / "out", [env.adapter, base], ["config.json", "remote code"], after=no_remote_code_ran(base))


@MATRIX.case("onnx/pickle-base-without-allow-pickle")
def _(env, tmp):
    base = pickled_base(env, tmp)
    argv = onnx_argv(env.adapter, tmp / "out", "--base", base)
    return Case(argv, tmp / "out", [env.adapter, base], ["pytorch_model.bin", "--allow-pickle"])


@MATRIX.case("onnx/base-safetensors-cut_data")
def _(env, tmp):
    base = base_copy(env, tmp)
    corrupt_safetensors(base / "model.safetensors", "cut_data")
    argv = onnx_argv(env.adapter, tmp / "out", "--base", base)
    return Case(argv, tmp / "out", [env.adapter, base], ["model.safetensors"])


@MATRIX.case("onnx/bad-opset")
def _(env, tmp):
    argv = onnx_argv(env.adapter, tmp / "out", "--opset", "7")
    return Case(argv, tmp / "out", [env.adapter], ["opset 7"])


@MATRIX.case("onnx/output-exists")
def _(env, tmp):
    (tmp / "out").mkdir()
    argv = onnx_argv(env.adapter, tmp / "out")
    return Case(argv, None, [env.adapter, tmp / "out"], ["already exists"])


@MATRIX.case("onnx/graph-without-adapter-inputs")
def _(env, tmp):
    argv = ["export", env.adapter, "--onnx", "--graph", env.graph, "--output", tmp / "a.onnx_adapter"]
    return Case(argv, tmp / "a.onnx_adapter", [env.adapter, env.graph], ["--adapter-inputs"])


@MATRIX.case("onnx/out-of-disk")
def _(env, tmp):
    argv = onnx_argv(env.adapter, tmp / "out")
    return Case(argv, tmp / "out", [env.adapter, env.base], ["File too large"], fsize=50_000)


# ------------------------------------------------------------------------------------------ flags
# Flags that do not apply to what was asked: exit 2 naming the flag, before anything is read.
_FOREIGN_FLAGS = {
    "merge-with-dtype": (["--merge", "--dtype", "fp16"], "--dtype does not apply to --merge"),
    "merge-with-with-past": (["--merge", "--with-past"], "--with-past does not apply to --merge"),
    "merge-with-opset": (["--merge", "--opset", "17"], "--opset does not apply to --merge"),
    "onnx-with-workers": (["--onnx", "--workers", "2"], "--workers does not apply to --onnx"),
    "onnx-with-verify": (["--onnx", "--verify"], "--verify does not apply to --onnx"),
    "onnx-merge-and-adapter-inputs": (["--onnx", "--merge", "--adapter-inputs"], "exclude each other"),
    "lora-with-base": (["--to", "lora", "--base", "."], "--base does not apply to --to lora"),
    "lora-with-verify": (["--to", "lora", "--verify"], "--verify does not apply to --to lora"),
    "adapter-inputs-without-onnx": (["--merge", "--adapter-inputs"], "--adapter-inputs does not apply to --merge"),
    "no-target": ([], "choose exactly one of"),
}
for _name, (_flags, _message) in _FOREIGN_FLAGS.items():

    @MATRIX.case(f"flags/{_name}")
    def _(env, tmp, _flags=_flags, _message=_message):
        return Case(["export", env.adapter, *_flags, "--output", tmp / "out"], tmp / "out", [env.adapter], [_message])


@MATRIX.case("flags/graph-with-dtype")
def _(env, tmp):
    argv = [
        "export",
        env.adapter,
        "--onnx",
        "--graph",
        env.graph,
        "--dtype",
        "fp16",
        "--output",
        tmp / "a.onnx_adapter",
    ]
    return Case(argv, tmp / "a.onnx_adapter", [env.adapter, env.graph], ["--dtype does not apply to --onnx --graph"])


def test_matrix_covers_export():
    check_matrix(MATRIX, {"lora", "merge", "onnx", "flags"}, at_least=30)


@pytest.mark.parametrize("name", MATRIX.names())
def test_bad_input(name, hardening_env, tmp_path, capsys):
    check(MATRIX.build(name, hardening_env, tmp_path), hardening_env, tmp_path, capsys)


def test_cli_subprocess_maps_a_full_disk_to_exit_2(hardening_env, tmp_path):
    """The same through a fresh ``python cli.py`` with RLIMIT_FSIZE set in preexec_fn (SIGXFSZ ignored)."""
    import resource
    import subprocess
    import sys

    out = tmp_path / "lora"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    proc = subprocess.run(
        [sys.executable, "cli.py", "export", str(hardening_env.adapter), "--to", "lora", "--output", str(out)],
        cwd=ROOT,
        env={**os.environ, **SUBPROCESS_ENV},
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "File too large" in proc.stderr
    assert not out.exists() and leftovers(out) == []


def test_pickle_is_read_with_allow_pickle(hardening_env, tmp_path):
    """The refusals above are about consent: with --allow-pickle the same files are read (weights_only)."""
    base = pickled_base(hardening_env, tmp_path)
    argv = merge_argv(hardening_env.adapter, tmp_path / "merged", "--base", base, "--allow-pickle", "--verify")
    assert run_cli(*argv) == 0  # --verify loads the pickled base through transformers as well
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    reference = tmp_path / "reference"
    assert run_cli(*merge_argv(hardening_env.adapter, reference, "--base", hardening_env.base)) == 0
    expected = load_file(reference / "model.safetensors")
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
