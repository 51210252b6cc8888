"""Bad input across every command: exit code 2, one line naming the problem, nothing written, inputs untouched.

Each case prepares its inputs (copies of tiny shared fixtures, damaged as the case needs), runs the
real CLI entry ``cli.main`` in-process (the out-of-disk cases in a child process with a small
RLIMIT_FSIZE), and checks: exit code 2; exactly one stderr line (progress bars aside), starting with
``error:``, that names the problem; no output and no hidden ``.NAME.tmp-*`` sibling left; every input
byte-identical; for remote code, that the code never ran.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file
from support import (
    TRAIN_FLAGS,
    WORDS,
    ForkServer,
    adapter_at_ranks,
    copy_tree,
    corrupt_safetensors,
    hidden_temps,
    leftovers,
    make_adapter,
    make_base,
    pickle_weights,
    tree_digest,
    write_data,
)

from adalora_export import cli
from adalora_export.formats.state import list_checkpoints
from adalora_export.training.checkpoint import load_checkpoint

PROGRESS = re.compile(r"\d+%\|.*\|")  # a tqdm bar: "desc:  17%|█▋        | 1/6 [00:00<00:01, ...]"
SAFETENSORS_DAMAGE = ["cut_header", "past_end", "bad_offsets", "wrong_dtype", "cut_data"]
# Imported by transformers only if a config's auto_map were honoured: the marker file proves it never runs.
EVIL_CODE = "import pathlib\npathlib.Path(__file__).with_name('REMOTE_CODE_RAN').touch()\n"


@dataclass
class Env:
    """The shared, never-modified inputs of the matrix."""

    work: Path
    base: Path  # Llama, hidden 32
    gpt2: Path  # another architecture
    wide: Path  # Llama, hidden 64: another size
    adapter: Path  # a compact adapter for ``base`` (ranks 0..3), naming ``base`` as its base
    data: Path
    graph: Path  # export --onnx --merge --with-past of ``adapter``
    server: ForkServer


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    work = tmp_path_factory.mktemp("hardening")
    server = ForkServer(work / "logs")  # starts importing while the fixtures are built
    base = make_base(work / "base")
    adapter = make_adapter(base, work / "adapter")
    graph = work / "graph"
    argv = ["export", adapter, "--onnx", "--merge", "--with-past", "--output", graph]
    assert server.run(argv)["code"] == 0
    yield Env(
        work=work,
        base=base,
        gpt2=make_base(work / "gpt2", arch="gpt2"),
        wide=make_base(work / "wide", hidden=64),
        adapter=adapter,
        data=write_data(work / "train.jsonl"),
        graph=graph,
        server=server,
    )
    server.close()


@dataclass
class Case:
    argv: list
    output: Path | None  # must not exist afterwards (nor any hidden sibling of it)
    inputs: list[Path]  # byte-identical afterwards
    message: list[str]  # fragments of the one error line
    fsize: int | None = None  # run in a child process with this RLIMIT_FSIZE (bytes)
    after: Callable[[], None] | None = None  # further checks


CASES: dict[str, Callable[[Env, Path], Case]] = {}


def case(name: str):
    def register(build):
        CASES[name] = build
        return build

    return register


# ------------------------------------------------------------------------------------ builders
def adapter_copy(env: Env, tmp: Path) -> Path:
    return copy_tree(env.adapter, tmp / "adapter")


def base_copy(env: Env, tmp: Path, name: str = "base") -> Path:
    return copy_tree(env.base, tmp / name)


def with_remote_code(directory: Path) -> Path:
    """Make ``directory``'s config.json ask for remote code, with the code beside it."""
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "evil.py").write_text(EVIL_CODE)
    return directory


def no_remote_code_ran(directory: Path) -> Callable[[], None]:
    def check():
        assert not (directory / "REMOTE_CODE_RAN").exists()

    return check


def pickled_base(env: Env, tmp: Path) -> Path:
    base = base_copy(env, tmp)
    pickle_weights(base / "model.safetensors", base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    return base


def train_argv(env: Env, out: Path, *extra, model: Path | None = None, data: Path | None = None) -> list:
    return ["train", "--model", model or env.base, "--data", data or env.data, "--output", out, *TRAIN_FLAGS, *extra]


# ----------------------------------------------------------------------------------------- prune
@case("prune/missing-source")
def _(env, tmp):
    return Case(["prune", tmp / "nope", "--output", tmp / "out"], tmp / "out", [], ["nope", "does not exist"])


@case("prune/source-is-a-file")
def _(env, tmp):
    argv = ["prune", env.data, "--output", tmp / "out"]
    return Case(argv, tmp / "out", [env.data], ["train.jsonl", "not a directory"])


@case("prune/dir-without-adapter")
def _(env, tmp):
    (tmp / "empty").mkdir()
    return Case(["prune", tmp / "empty", "--output", tmp / "out"], tmp / "out", [tmp / "empty"], ["holds no adapter"])


for _kind in SAFETENSORS_DAMAGE:

    @case(f"prune/adapter-safetensors-{_kind}")
    def _(env, tmp, kind=_kind):
        adapter = adapter_copy(env, tmp)
        corrupt_safetensors(adapter / "adapter_model.safetensors", kind)
        argv = ["prune", adapter, "--output", tmp / "out"]
        return Case(argv, tmp / "out", [adapter], ["adapter_model.safetensors", "not a valid safetensors"])


@case("prune/pickle-adapter-without-allow-pickle")
def _(env, tmp):
    adapter = adapter_copy(env, tmp)
    pickle_weights(adapter / "adapter_model.safetensors", adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    argv = ["prune", adapter, "--output", tmp / "out"]
    return Case(argv, tmp / "out", [adapter], ["adapter_model.bin", "--allow-pickle"])


@case("prune/malformed-adapter-config")
def _(env, tmp):
    adapter = adapter_copy(env, tmp)
    (adapter / "adapter_config.json").write_text('{"peft_type": "ADALORA", ')
    return Case(["prune", adapter, "--output", tmp / "out"], tmp / "out", [adapter], ["adapter_config.json", "JSON"])


@case("prune/nan-in-adapter")
def _(env, tmp):
    adapter = adapter_copy(env, tmp)
    tensors = load_file(adapter / "adapter_model.safetensors")
    name = next(k for k, v in tensors.items() if k.endswith("lora_B") and v.numel())
    tensors[name][0, 0] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    return Case(["prune", adapter, "--output", tmp / "out"], tmp / "out", [adapter], [name, "NaN"])


@case("prune/output-exists")
def _(env, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    argv = ["prune", env.adapter, "--output", tmp / "out"]
    return Case(argv, None, [env.adapter, tmp / "out"], ["out", "already exists", "--overwrite"])


@case("prune/output-under-a-file")
def _(env, tmp):
    shutil.copy(env.data, tmp / "file")
    argv = ["prune", env.adapter, "--output", tmp / "file" / "out"]
    return Case(argv, None, [env.adapter, tmp / "file"], ["cannot write", "file"])


@case("prune/output-parent-missing")
def _(env, tmp):
    argv = ["prune", env.adapter, "--output", tmp / "no" / "such" / "out"]
    return Case(argv, tmp / "no", [env.adapter], ["cannot write", "does not exist"])


@case("prune/out-of-disk")
def _(env, tmp):
    argv = ["prune", env.adapter, "--output", tmp / "out"]
    return Case(argv, tmp / "out", [env.adapter], ["out", "File too large"], fsize=4000)


# --------------------------------------------------------------------------------------- inspect
@case("inspect/missing-dir")
def _(env, tmp):
    return Case(["inspect", tmp / "nope"], None, [], ["nope", "does not exist"])


@case("inspect/file-for-dir")
def _(env, tmp):
    return Case(["inspect", env.data], None, [env.data], ["train.jsonl", "not a directory"])


@case("inspect/manifest-disagrees-with-tensors")
def _(env, tmp):
    adapter = adapter_copy(env, tmp)
    manifest = json.loads((adapter / "adalora_manifest.json").read_text())
    manifest["modules"][0]["rank"] += 1
    (adapter / "adalora_manifest.json").write_text(json.dumps(manifest))
    return Case(["inspect", adapter], None, [adapter], ["adalora_manifest.json", manifest["modules"][0]["module"]])


@case("inspect/plot-not-png")
def _(env, tmp):
    argv = ["inspect", env.adapter, "--plot", tmp / "map.jpg"]
    return Case(argv, tmp / "map.jpg", [env.adapter], ["map.jpg", ".png"])


@case("inspect/plot-exists")
def _(env, tmp):
    (tmp / "map.png").write_bytes(b"not mine to replace")
    argv = ["inspect", env.adapter, "--plot", tmp / "map.png"]
    return Case(argv, None, [env.adapter, tmp / "map.png"], ["map.png", "already exists"])


@case("inspect/plot-under-a-file")
def _(env, tmp):
    shutil.copy(env.data, tmp / "file")
    argv = ["inspect", env.adapter, "--plot", tmp / "file" / "map.png"]
    return Case(argv, None, [env.adapter, tmp / "file"], ["cannot write", "map.png"])


@case("inspect/plot-out-of-disk")
def _(env, tmp):
    argv = ["inspect", env.adapter, "--plot", tmp / "map.png"]
    return Case(argv, tmp / "map.png", [env.adapter], ["map.png", "File too large"], fsize=3000)


# ------------------------------------------------------------------------------- export --to lora
@case("lora/missing-adapter")
def _(env, tmp):
    argv = ["export", tmp / "nope", "--to", "lora", "--output", tmp / "out"]
    return Case(argv, tmp / "out", [], ["nope", "does not exist"])


@case("lora/adapter-safetensors-bad_offsets")
def _(env, tmp):
    adapter = adapter_copy(env, tmp)
    corrupt_safetensors(adapter / "adapter_model.safetensors", "bad_offsets")
    argv = ["export", adapter, "--to", "lora", "--output", tmp / "out"]
    return Case(argv, tmp / "out", [adapter], ["adapter_model.safetensors", "not a valid safetensors"])


@case("lora/every-module-rank-0")
def _(env, tmp):
    out = tmp / "zero"
    make_adapter(env.base, out, ranks=(0,))
    argv = ["export", out, "--to", "lora", "--output", tmp / "out"]
    return Case(argv, tmp / "out", [out], ["rank 0"])


@case("lora/output-exists")
def _(env, tmp):
    (tmp / "out").write_text("a file, not mine to replace")
    argv = ["export", env.adapter, "--to", "lora", "--output", tmp / "out"]
    return Case(argv, None, [env.adapter, tmp / "out"], ["already exists"])


@case("lora/out-of-disk")
def _(env, tmp):
    argv = ["export", env.adapter, "--to", "lora", "--output", tmp / "out"]
    return Case(argv, tmp / "out", [env.adapter], ["out", "File too large"], fsize=3000)


# ---------------------------------------------------------------------------------- export --merge
def merge_argv(adapter: Path, out: Path, *extra) -> list:
    return ["export", adapter, "--merge", "--output", out, *extra]


@case("merge/base-missing")
def _(env, tmp):
    argv = merge_argv(env.adapter, tmp / "out", "--base", tmp / "nope")
    return Case(argv, tmp / "out", [env.adapter], ["nope", "does not exist"])


@case("merge/base-is-a-file")
def _(env, tmp):
    argv = merge_argv(env.adapter, tmp / "out", "--base", env.data)
    return Case(argv, tmp / "out", [env.adapter, env.data], ["train.jsonl", "not a directory"])


@case("merge/adapter-for-another-architecture")
def _(env, tmp):
    argv = merge_argv(env.adapter, tmp / "out", "--base", env.gpt2)
    return Case(argv, tmp / "out", [env.adapter, env.gpt2], ["adapter module model.layers.0", "matches no tensor"])


@case("merge/adapter-for-another-size")
def _(env, tmp):
    argv = merge_argv(env.adapter, tmp / "out", "--base", env.wide)
    return Case(argv, tmp / "out", [env.adapter, env.wide], ["adapter module", "shape"])


for _kind in ("cut_header", "past_end", "bad_offsets", "wrong_dtype"):

    @case(f"merge/base-safetensors-{_kind}")
    def _(env, tmp, kind=_kind):
        base = base_copy(env, tmp)
        corrupt_safetensors(base / "model.safetensors", kind)
        argv = merge_argv(env.adapter, tmp / "out", "--base", base)
        return Case(argv, tmp / "out", [env.adapter, base], ["model.safetensors", "not a valid safetensors"])


@case("merge/pickle-base-without-allow-pickle")
def _(env, tmp):
    base = pickled_base(env, tmp)
    argv = merge_argv(env.adapter, tmp / "out", "--base", base)
    return Case(argv, tmp / "out", [env.adapter, base], ["pytorch_model.bin", "--allow-pickle"])


@case("merge/remote-code-config")
def _(env, tmp):
    base = with_remote_code(base_copy(env, tmp))
    argv = merge_argv(env.adapter, tmp / "out", "--base", base)
    return Case(argv, tmp / "out", [env.adapter, base], ["config.json", "remote code"], after=no_remote_code_ran(base))


@case("merge/base-without-weights")
def _(env, tmp):
    base = base_copy(env, tmp)
    (base / "model.safetensors").unlink()
    argv = merge_argv(env.adapter, tmp / "out", "--base", base)
    return Case(argv, tmp / "out", [env.adapter, base], ["no weights in", "base"])


@case("merge/adapter-names-no-local-base")
def _(env, tmp):
    adapter = adapter_copy(env, tmp)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3-8B"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    argv = merge_argv(adapter, tmp / "out")
    return Case(argv, tmp / "out", [adapter], ["meta-llama/Llama-3-8B", "--base"])


@case("merge/output-is-the-base")
def _(env, tmp):
    base = base_copy(env, tmp)
    argv = merge_argv(env.adapter, base, "--base", base, "--overwrite")
    return Case(argv, None, [env.adapter, base], ["is the base directory"])


@case("merge/output-exists")
def _(env, tmp):
    (tmp / "out").mkdir()
    argv = merge_argv(env.adapter, tmp / "out")
    return Case(argv, None, [env.adapter, tmp / "out"], ["already exists", "--overwrite"])


@case("merge/output-under-a-file")
def _(env, tmp):
    shutil.copy(env.data, tmp / "file")
    argv = merge_argv(env.adapter, tmp / "file" / "merged")
    return Case(argv, None, [env.adapter, tmp / "file"], ["cannot write", "merged"])


@case("merge/out-of-disk")
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


@case("merge/classifier-on-a-head-of-another-size")
def _(env, tmp):
    adapter, two = gpt2_classifier(env, tmp)
    argv = merge_argv(adapter, tmp / "out", "--base", two)
    return Case(argv, tmp / "out", [adapter, two], ["classifier has 3 labels", "has 2"])


@case("onnx/classifier-on-a-head-of-another-size")
def _(env, tmp):
    adapter, two = gpt2_classifier(env, tmp)
    argv = onnx_argv(adapter, tmp / "out", "--base", two)
    return Case(argv, tmp / "out", [adapter, two], ["classifier has 3 labels", "has 2"])


@case("onnx/decoder-classifier-without-a-pad-token")
def _(env, tmp):
    adapter, _ = gpt2_classifier(env, tmp)
    argv = onnx_argv(adapter, tmp / "out", "--base", env.gpt2)
    return Case(argv, tmp / "out", [adapter, env.gpt2], ["gpt2 classifier needs a pad token id"])


def onnx_argv(adapter: Path, out: Path, *extra) -> list:
    return ["export", adapter, "--onnx", "--output", out, *extra]


@case("onnx/adapter-for-another-architecture")
def _(env, tmp):
    argv = onnx_argv(env.adapter, tmp / "out", "--base", env.gpt2)
    return Case(argv, tmp / "out", [env.adapter, env.gpt2], ["adapter module model.layers.0"])


@case("onnx/adapter-for-another-size")
def _(env, tmp):
    argv = onnx_argv(env.adapter, tmp / "out", "--base", env.wide)
    return Case(argv, tmp / "out", [env.adapter, env.wide], ["adapter module"])


@case("onnx/remote-code-config")
def _(env, tmp):
    base = with_remote_code(base_copy(env, tmp))
    argv = onnx_argv(env.adapter, tmp / "out", "--base", base)
    return Case(argv, tmp / "out", [env.adapter, base], ["config.json", "remote code"], after=no_remote_code_ran(base))


@case("onnx/pickle-base-without-allow-pickle")
def _(env, tmp):
    base = pickled_base(env, tmp)
    argv = onnx_argv(env.adapter, tmp / "out", "--base", base)
    return Case(argv, tmp / "out", [env.adapter, base], ["pytorch_model.bin", "--allow-pickle"])


@case("onnx/base-safetensors-cut_data")
def _(env, tmp):
    base = base_copy(env, tmp)
    corrupt_safetensors(base / "model.safetensors", "cut_data")
    argv = onnx_argv(env.adapter, tmp / "out", "--base", base)
    return Case(argv, tmp / "out", [env.adapter, base], ["model.safetensors"])


@case("onnx/bad-opset")
def _(env, tmp):
    argv = onnx_argv(env.adapter, tmp / "out", "--opset", "7")
    return Case(argv, tmp / "out", [env.adapter], ["opset 7"])


@case("onnx/output-exists")
def _(env, tmp):
    (tmp / "out").mkdir()
    argv = onnx_argv(env.adapter, tmp / "out")
    return Case(argv, None, [env.adapter, tmp / "out"], ["already exists"])


@case("onnx/graph-without-adapter-inputs")
def _(env, tmp):
    argv = ["export", env.adapter, "--onnx", "--graph", env.graph, "--output", tmp / "a.onnx_adapter"]
    return Case(argv, tmp / "a.onnx_adapter", [env.adapter, env.graph], ["--adapter-inputs"])


@case("onnx/out-of-disk")
def _(env, tmp):
    argv = onnx_argv(env.adapter, tmp / "out")
    return Case(argv, tmp / "out", [env.adapter, env.base], ["File too large"], fsize=50_000)


# ------------------------------------------------------------------------------------------- train
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

    @case(f"flags/{_name}")
    def _(env, tmp, _flags=_flags, _message=_message):
        return Case(["export", env.adapter, *_flags, "--output", tmp / "out"], tmp / "out", [env.adapter], [_message])


@case("flags/graph-with-dtype")
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


@case("train/model-missing")
def _(env, tmp):
    return Case(train_argv(env, tmp / "run", model=tmp / "nope"), tmp / "run", [env.data], ["nope", "does not exist"])


@case("train/model-is-a-file")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", model=env.data)
    return Case(argv, tmp / "run", [env.data], ["train.jsonl", "not a directory"])


@case("train/data-missing")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", data=tmp / "nope.jsonl")
    return Case(argv, tmp / "run", [env.base], ["nope.jsonl", "does not exist"])


@case("train/data-is-a-directory")
def _(env, tmp):
    (tmp / "data.jsonl").mkdir()
    argv = train_argv(env, tmp / "run", data=tmp / "data.jsonl")
    return Case(argv, tmp / "run", [env.base], ["data.jsonl", "is a directory"])


@case("train/data-empty")
def _(env, tmp):
    (tmp / "empty.jsonl").write_text("\n\n")
    argv = train_argv(env, tmp / "run", data=tmp / "empty.jsonl")
    return Case(argv, tmp / "run", [env.base, tmp / "empty.jsonl"], ["empty.jsonl", "no examples"])


@case("train/data-not-utf8")
def _(env, tmp):
    (tmp / "latin1.jsonl").write_bytes(json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n")
    argv = train_argv(env, tmp / "run", data=tmp / "latin1.jsonl")
    return Case(argv, tmp / "run", [env.base, tmp / "latin1.jsonl"], ["latin1.jsonl:1", "UTF-8"])


@case("train/data-malformed-jsonl")
def _(env, tmp):
    lines = env.data.read_text().splitlines()
    lines[6] = lines[6][:-3]
    (tmp / "bad.jsonl").write_text("\n".join(lines) + "\n")
    argv = train_argv(env, tmp / "run", data=tmp / "bad.jsonl")
    return Case(argv, tmp / "run", [env.base, tmp / "bad.jsonl"], ["bad.jsonl:7", "JSON"])


@case("train/data-record-not-an-object")
def _(env, tmp):
    (tmp / "list.jsonl").write_text('{"text": "the cat"}\n["the", "dog"]\n')
    argv = train_argv(env, tmp / "run", data=tmp / "list.jsonl")
    return Case(argv, tmp / "run", [env.base, tmp / "list.jsonl"], ["list.jsonl:2", "object"])


@case("train/data-record-without-text")
def _(env, tmp):
    (tmp / "keys.jsonl").write_text('{"txt": "the cat"}\n')
    argv = train_argv(env, tmp / "run", data=tmp / "keys.jsonl")
    return Case(argv, tmp / "run", [env.base, tmp / "keys.jsonl"], ["keys.jsonl:1", "text"])


@case("train/target-names-match-nothing")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--target_modules", "qq_proj,vv_proj")
    return Case(argv, tmp / "run", [env.base, env.data], ["qq_proj"])


@case("train/target-regex-matches-nothing")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--target_modules", "re:.*nothing.*")
    return Case(argv, tmp / "run", [env.base, env.data], ["nothing"])


@case("train/target_r-above-init_r")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--adalora_target_r", "6")
    return Case(argv, tmp / "run", [env.base, env.data], ["adalora_target_r (6)", "adalora_init_r (4)"])


@case("train/beta1-is-1")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--adalora_beta1", "1.0")
    return Case(argv, tmp / "run", [env.base, env.data], ["adalora_beta1", "between 0 and 1"])


@case("train/beta2-is-0")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--adalora_beta2", "0")
    return Case(argv, tmp / "run", [env.base, env.data], ["adalora_beta2", "between 0 and 1"])


@case("train/negative-orth-weight")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--adalora_orth_reg_weight", "-0.1")
    return Case(argv, tmp / "run", [env.base, env.data], ["adalora_orth_reg_weight", ">= 0"])


@case("train/tinit-leaves-no-budget-phase")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--adalora_tinit", "8", "--adalora_tfinal", "4")
    return Case(argv, tmp / "run", [env.base, env.data], ["no budget phase"])


@case("train/unknown-train-type")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--train_type", "qlora")
    return Case(
        argv, tmp / "run", [env.base, env.data], ["Invalid value for '--train_type'", "'qlora' is not 'adalora'"]
    )


@case("train/zero-max-length")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--max_length", "0")
    return Case(argv, tmp / "run", [env.base, env.data], ["--max_length"])


@case("train/remote-code-config")
def _(env, tmp):
    base = with_remote_code(base_copy(env, tmp))
    argv = train_argv(env, tmp / "run", model=base)
    return Case(argv, tmp / "run", [base, env.data], ["config.json", "remote code"], after=no_remote_code_ran(base))


@case("train/pickle-base")
def _(env, tmp):
    base = pickled_base(env, tmp)
    argv = train_argv(env, tmp / "run", model=base)
    return Case(argv, tmp / "run", [base, env.data], ["pytorch_model.bin", "pickle"])


@case("train/output-exists")
def _(env, tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "notes.txt").write_text("mine")
    argv = train_argv(env, tmp / "run")
    return Case(argv, None, [env.base, env.data, tmp / "run"], ["already exists", "--overwrite"])


@case("train/output-under-a-file")
def _(env, tmp):
    shutil.copy(env.data, tmp / "file")
    argv = train_argv(env, tmp / "file" / "run")
    return Case(argv, None, [env.base, env.data, tmp / "file"], ["file", "run"])


@case("train/resume-without-a-run")
def _(env, tmp):
    return Case(["train", "--output", tmp / "run", "--resume"], tmp / "run", [], ["holds no run"])


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


@case("infer/missing-dir")
def _(env, tmp):
    return Case(infer_argv(tmp / "nope"), None, [], ["nope"])


@case("infer/file-for-dir")
def _(env, tmp):
    return Case(infer_argv(env.data), None, [env.data], ["train.jsonl"])


@case("infer/truncated-graph")
def _(env, tmp):
    graph = graph_copy(env, tmp)
    raw = (graph / "model.onnx").read_bytes()
    (graph / "model.onnx").write_bytes(raw[: len(raw) // 3])
    return Case(infer_argv(graph), None, [graph], ["model.onnx"])


@case("infer/truncated-external-data")
def _(env, tmp):
    graph = graph_copy(env, tmp)
    raw = (graph / "model.onnx.data").read_bytes()
    (graph / "model.onnx.data").write_bytes(raw[: len(raw) // 2])
    return Case(infer_argv(graph), None, [graph], ["model.onnx"])


@case("infer/external-data-dotdot")
def _(env, tmp):
    graph = graph_copy(env, tmp)
    shutil.copy(graph / "model.onnx.data", tmp / "outside.data")
    point_outside(graph, "../outside.data")
    return Case(infer_argv(graph), None, [graph, tmp / "outside.data"], ["../outside.data", "outside"])


@case("infer/external-data-absolute")
def _(env, tmp):
    graph = graph_copy(env, tmp)
    shutil.copy(graph / "model.onnx.data", tmp / "outside.data")
    point_outside(graph, str(tmp / "outside.data"))
    return Case(infer_argv(graph), None, [graph, tmp / "outside.data"], ["outside.data", "outside"])


@case("infer/external-data-symlink")
def _(env, tmp):
    graph = graph_copy(env, tmp)
    shutil.move(graph / "model.onnx.data", tmp / "outside.data")
    (graph / "model.onnx.data").symlink_to(tmp / "outside.data")
    return Case(infer_argv(graph), None, [graph, tmp / "outside.data"], ["model.onnx.data", "outside"])


@case("infer/external-data-through-symlinked-dir")
def _(env, tmp):
    graph = graph_copy(env, tmp)
    (tmp / "elsewhere").mkdir()
    shutil.move(graph / "model.onnx.data", tmp / "elsewhere" / "model.onnx.data")
    (graph / "sub").symlink_to(tmp / "elsewhere")
    point_outside(graph, "sub/model.onnx.data")
    return Case(infer_argv(graph), None, [graph, tmp / "elsewhere"], ["sub/model.onnx.data", "outside"])


@case("infer/external-data-in-a-constant-node")
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


@case("infer/remote-code-config")
def _(env, tmp):
    graph = with_remote_code(graph_copy(env, tmp))
    return Case(infer_argv(graph), None, [graph], ["config.json", "remote code"], after=no_remote_code_ran(graph))


@case("infer/adapter-for-a-graph-without-adapter-inputs")
def _(env, tmp):
    (tmp / "x.onnx_adapter").write_bytes(b"\0" * 64)
    argv = infer_argv(env.graph, "--adapter", tmp / "x.onnx_adapter")
    return Case(argv, None, [env.graph, tmp / "x.onnx_adapter"], ["graph", "--adapter-inputs"])


@case("infer/prompt-and-text")
def _(env, tmp):
    return Case(infer_argv(env.graph, "--text", "hi"), None, [env.graph], ["--prompt", "--text"])


@case("infer/text-on-a-causal-lm")
def _(env, tmp):
    argv = ["infer", env.graph, "--text", "the cat", "--provider", "cpu"]
    return Case(argv, None, [env.graph], ["causal_lm"])


# ------------------------------------------------------------------------------------- the matrix
def error_lines(stderr: str) -> list[str]:
    """stderr without progress bars (tqdm's, transformers' "Loading weights"): what the user reads as messages."""
    lines = stderr.replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and not PROGRESS.search(line)]


def run_in_process(argv: list, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_matrix_is_large_enough():
    commands = {name.split("/")[0] for name in CASES}
    assert len(CASES) >= 30 and commands == {"prune", "inspect", "lora", "merge", "onnx", "flags", "train", "infer"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, env, tmp_path, capsys):
    spec = CASES[name](env, tmp_path)
    before = tree_digest(*spec.inputs)
    if spec.fsize is None:
        code, err = run_in_process(spec.argv, capsys)
    else:  # a child process whose writes fail past fsize bytes (EFBIG), as on a full disk
        result = env.server.run(spec.argv, fsize=spec.fsize)
        code, err = result["code"], result["log"]
    lines = error_lines(err)
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in spec.message:
        assert fragment in lines[0], (fragment, lines[0])
    if spec.output is not None:
        assert not spec.output.exists(), f"{spec.output} was left behind"
        assert leftovers(spec.output) == []
    assert hidden_temps(tmp_path) == []
    assert tree_digest(*spec.inputs) == before, "an input was modified"
    if spec.after is not None:
        spec.after()


def test_records_longer_than_max_length_are_truncated_not_refused(env, tmp_path):
    """The stated policy (README "Data"): a record over --max_length is cut, counted and trained on."""
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"text": " ".join(WORDS * 3)}) + "\n" for _ in range(8)))
    argv = train_argv(env, tmp_path / "run", "--max_length", "8", "--max_steps", "2", data=long)
    argv += ["--batch_size", "4", "--adalora_tinit", "0", "--adalora_tfinal", "0", "--save_steps", "0"]
    result = env.server.run(argv)
    assert result["code"] == 0, result["log"]
    assert "8 examples (8 truncated)" in result["log"]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_train_out_of_disk_keeps_a_resumable_run(env, tmp_path):
    """A full disk mid-run: exit 2 with one line, no half-written checkpoint, and --resume finishes the run."""
    run = tmp_path / "run"
    result = env.server.run(train_argv(env, run), fsize=6000)
    # Besides the run's own report lines, one error, on its own line (the bar drawn so far is closed first).
    errors = [line for line in error_lines(result["log"]) if "error" in line.lower()]
    assert result["code"] == 2 and len(errors) == 1, result["log"]
    assert errors[0].startswith("error: cannot write") and "File too large" in errors[0]
    assert "Traceback" not in result["log"]
    assert hidden_temps(run) == [] and not (run / "final").exists()
    for checkpoint in list_checkpoints(run):
        load_checkpoint(checkpoint)  # every checkpoint that carries its name is complete
    resumed = env.server.run(["train", "--output", run, "--resume"])
    assert resumed["code"] == 0, resumed["log"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert hidden_temps(run) == []


def test_cli_subprocess_maps_a_full_disk_to_exit_2(env, tmp_path):
    """The same through a fresh ``python cli.py`` with RLIMIT_FSIZE set in preexec_fn (SIGXFSZ ignored)."""
    import resource
    import subprocess
    import sys

    from support import ROOT, SERVER_ENV

    out = tmp_path / "lora"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    proc = subprocess.run(
        [sys.executable, "cli.py", "export", str(env.adapter), "--to", "lora", "--output", str(out)],
        cwd=ROOT,
        env={**os.environ, **SERVER_ENV},
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "File too large" in proc.stderr
    assert not out.exists() and leftovers(out) == []


def test_pickle_is_read_with_allow_pickle(env, tmp_path):
    """The refusals above are about consent: with --allow-pickle the same files are read (weights_only)."""
    base = pickled_base(env, tmp_path)
    argv = merge_argv(env.adapter, tmp_path / "merged", "--base", base, "--allow-pickle", "--verify")
    assert run_cli_code(argv) == 0  # --verify loads the pickled base through transformers as well
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    reference = tmp_path / "reference"
    assert run_cli_code(merge_argv(env.adapter, reference, "--base", env.base)) == 0
    expected = load_file(reference / "model.safetensors")
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def run_cli_code(argv: list) -> int:
    try:
        cli.main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code
    return 0
