"""Bad input to `prune` and `inspect`: exit code 2, one line naming the problem, nothing written,
inputs untouched (the matrix and its checks: tests/bad_input.py)."""

from __future__ import annotations

import json
import shutil

import pytest
from bad_input import SAFETENSORS_DAMAGE, Case, Matrix, adapter_copy, check, check_matrix
from files import corrupt_safetensors, pickle_weights
from safetensors.torch import load_file, save_file

MATRIX = Matrix()


# ----------------------------------------------------------------------------------------- prune
@MATRIX.case("prune/missing-source")
def _(env, tmp):
    return Case(["prune", tmp / "nope", "--output", tmp / "out"], tmp / "out", [], ["nope", "does not exist"])


@MATRIX.case("prune/source-is-a-file")
def _(env, tmp):
    argv = ["prune", env.data, "--output", tmp / "out"]
    return Case(argv, tmp / "out", [env.data], ["train.jsonl", "not a directory"])


@MATRIX.case("prune/dir-without-adapter")
def _(env, tmp):
    (tmp / "empty").mkdir()
    return Case(["prune", tmp / "empty", "--output", tmp / "out"], tmp / "out", [tmp / "empty"], ["holds no adapter"])


for _kind in SAFETENSORS_DAMAGE:

    @MATRIX.case(f"prune/adapter-safetensors-{_kind}")
    def _(env, tmp, kind=_kind):
        adapter = adapter_copy(env, tmp)
        corrupt_safetensors(adapter / "adapter_model.safetensors", kind)
        argv = ["prune", adapter, "--output", tmp / "out"]
        return Case(argv, tmp / "out", [adapter], ["adapter_model.safetensors", "not a valid safetensors"])


@MATRIX.case("prune/pickle-adapter-without-allow-pickle")
def _(env, tmp):
    adapter = adapter_copy(env, tmp)
    pickle_weights(adapter / "adapter_model.safetensors", adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    argv = ["prune", adapter, "--output", tmp / "out"]
    return Case(argv, tmp / "out", [adapter], ["adapter_model.bin", "--allow-pickle"])


@MATRIX.case("prune/malformed-adapter-config")
def _(env, tmp):
    adapter = adapter_copy(env, tmp)
    (adapter / "adapter_config.json").write_text('{"peft_type": "ADALORA", ')
    return Case(["prune", adapter, "--output", tmp / "out"], tmp / "out", [adapter], ["adapter_config.json", "JSON"])


@MATRIX.case("prune/nan-in-adapter")
def _(env, tmp):
    adapter = adapter_copy(env, tmp)
    tensors = load_file(adapter / "adapter_model.safetensors")
    name = next(k for k, v in tensors.items() if k.endswith("lora_B") and v.numel())
    tensors[name][0, 0] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    return Case(["prune", adapter, "--output", tmp / "out"], tmp / "out", [adapter], [name, "NaN"])


@MATRIX.case("prune/output-exists")
def _(env, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    argv = ["prune", env.adapter, "--output", tmp / "out"]
    return Case(argv, None, [env.adapter, tmp / "out"], ["out", "already exists", "--overwrite"])


@MATRIX.case("prune/output-under-a-file")
def _(env, tmp):
    shutil.copy(env.data, tmp / "file")
    argv = ["prune", env.adapter, "--output", tmp / "file" / "out"]
    return Case(argv, None, [env.adapter, tmp / "file"], ["cannot write", "file"])


@MATRIX.case("prune/refused-with-output-parent-missing")
def _(env, tmp):  # missing parents are created only past every check: a refused prune leaves none
    argv = ["prune", tmp / "nope", "--output", tmp / "no" / "such" / "out"]
    return Case(argv, tmp / "no", [], ["nope", "does not exist"])


@MATRIX.case("prune/out-of-disk")
def _(env, tmp):
    argv = ["prune", env.adapter, "--output", tmp / "out"]
    return Case(argv, tmp / "out", [env.adapter], ["out", "File too large"], fsize=4000)


# --------------------------------------------------------------------------------------- inspect
@MATRIX.case("inspect/missing-dir")
def _(env, tmp):
    return Case(["inspect", tmp / "nope"], None, [], ["nope", "does not exist"])


@MATRIX.case("inspect/file-for-dir")
def _(env, tmp):
    return Case(["inspect", env.data], None, [env.data], ["train.jsonl", "not a directory"])


@MATRIX.case("inspect/manifest-disagrees-with-tensors")
def _(env, tmp):
    adapter = adapter_copy(env, tmp)
    manifest = json.loads((adapter / "adalora_manifest.json").read_text())
    manifest["modules"][0]["rank"] += 1
    (adapter / "adalora_manifest.json").write_text(json.dumps(manifest))
    return Case(["inspect", adapter], None, [adapter], ["adalora_manifest.json", manifest["modules"][0]["module"]])


@MATRIX.case("inspect/plot-not-png")
def _(env, tmp):
    argv = ["inspect", env.adapter, "--plot", tmp / "map.jpg"]
    return Case(argv, tmp / "map.jpg", [env.adapter], ["map.jpg", ".png"])


@MATRIX.case("inspect/plot-exists")
def _(env, tmp):
    (tmp / "map.png").write_bytes(b"not mine to replace")
    argv = ["inspect", env.adapter, "--plot", tmp / "map.png"]
    return Case(argv, None, [env.adapter, tmp / "map.png"], ["map.png", "already exists"])


@MATRIX.case("inspect/plot-under-a-file")
def _(env, tmp):
    shutil.copy(env.data, tmp / "file")
    argv = ["inspect", env.adapter, "--plot", tmp / "file" / "map.png"]
    return Case(argv, None, [env.adapter, tmp / "file"], ["cannot write", "map.png"])


@MATRIX.case("inspect/plot-out-of-disk")
def _(env, tmp):
    argv = ["inspect", env.adapter, "--plot", tmp / "map.png"]
    return Case(argv, tmp / "map.png", [env.adapter], ["map.png", "File too large"], fsize=3000)


def test_matrix_covers_prune_and_inspect():
    check_matrix(MATRIX, {"prune", "inspect"}, at_least=15)


@pytest.mark.parametrize("name", MATRIX.names())
def test_bad_input(name, hardening_env, tmp_path, capsys):
    check(MATRIX.build(name, hardening_env, tmp_path), hardening_env, tmp_path, capsys)
