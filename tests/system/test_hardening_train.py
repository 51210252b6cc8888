"""Bad input to `train`: exit code 2, one line naming the problem, nothing written, inputs untouched
(the matrix and its checks: tests/bad_input.py); a long record is cut, not refused; a full disk mid-run
leaves a run that resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from bad_input import (
    Case,
    Env,
    Matrix,
    base_copy,
    check,
    check_matrix,
    error_lines,
    no_remote_code_ran,
    pickled_base,
    with_remote_code,
)
from files import hidden_temps
from models import WORDS

from adalora_export.formats.state import list_checkpoints
from adalora_export.training.checkpoint import load_checkpoint

MATRIX = Matrix()


def train_argv(env: Env, out: Path, *extra, model: Path | None = None, data: Path | None = None) -> list:
    return [
        "train",
        "--model",
        model or env.base,
        "--data",
        data or env.data,
        "--output",
        out,
        *env.train_flags,
        *extra,
    ]


# ------------------------------------------------------------------------------------------- train
@MATRIX.case("train/model-missing")
def _(env, tmp):
    return Case(train_argv(env, tmp / "run", model=tmp / "nope"), tmp / "run", [env.data], ["nope", "does not exist"])


@MATRIX.case("train/model-is-a-file")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", model=env.data)
    return Case(argv, tmp / "run", [env.data], ["train.jsonl", "not a directory"])


@MATRIX.case("train/data-missing")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", data=tmp / "nope.jsonl")
    return Case(argv, tmp / "run", [env.base], ["nope.jsonl", "does not exist"])


@MATRIX.case("train/data-is-a-directory")
def _(env, tmp):
    (tmp / "data.jsonl").mkdir()
    argv = train_argv(env, tmp / "run", data=tmp / "data.jsonl")
    return Case(argv, tmp / "run", [env.base], ["data.jsonl", "is a directory"])


@MATRIX.case("train/data-empty")
def _(env, tmp):
    (tmp / "empty.jsonl").write_text("\n\n")
    argv = train_argv(env, tmp / "run", data=tmp / "empty.jsonl")
    return Case(argv, tmp / "run", [env.base, tmp / "empty.jsonl"], ["empty.jsonl", "no examples"])


@MATRIX.case("train/data-not-utf8")
def _(env, tmp):
    (tmp / "latin1.jsonl").write_bytes(json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n")
    argv = train_argv(env, tmp / "run", data=tmp / "latin1.jsonl")
    return Case(argv, tmp / "run", [env.base, tmp / "latin1.jsonl"], ["latin1.jsonl:1", "UTF-8"])


@MATRIX.case("train/data-malformed-jsonl")
def _(env, tmp):
    lines = env.data.read_text().splitlines()
    lines[6] = lines[6][:-3]
    (tmp / "bad.jsonl").write_text("\n".join(lines) + "\n")
    argv = train_argv(env, tmp / "run", data=tmp / "bad.jsonl")
    return Case(argv, tmp / "run", [env.base, tmp / "bad.jsonl"], ["bad.jsonl:7", "JSON"])


@MATRIX.case("train/data-record-not-an-object")
def _(env, tmp):
    (tmp / "list.jsonl").write_text('{"text": "the cat"}\n["the", "dog"]\n')
    argv = train_argv(env, tmp / "run", data=tmp / "list.jsonl")
    return Case(argv, tmp / "run", [env.base, tmp / "list.jsonl"], ["list.jsonl:2", "object"])


@MATRIX.case("train/data-record-without-text")
def _(env, tmp):
    (tmp / "keys.jsonl").write_text('{"txt": "the cat"}\n')
    argv = train_argv(env, tmp / "run", data=tmp / "keys.jsonl")
    return Case(argv, tmp / "run", [env.base, tmp / "keys.jsonl"], ["keys.jsonl:1", "text"])


@MATRIX.case("train/data-mixes-labelled-and-unlabelled-records")
def _(env, tmp):
    # Issue 23: the task came from the first record alone, and a causal LM trained on the rest silently.
    (tmp / "mixed.jsonl").write_text('{"text": "the cat"}\n{"text": "a dog", "label": "b"}\n{"text": "sat"}\n')
    argv = train_argv(env, tmp / "run", data=tmp / "mixed.jsonl")
    return Case(argv, tmp / "run", [env.base, tmp / "mixed.jsonl"], ["mixed.jsonl", "line 2", "line 1"])


@MATRIX.case("train/data-chat-record-with-only-the-answer")
def _(env, tmp):
    # Issue 23: "Cannot apply chat template to an empty conversation" came out as a traceback.
    rows = [{"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]}]
    rows.append({"messages": [{"role": "assistant", "content": "the dog ran"}]})
    (tmp / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = train_argv(env, tmp / "run", data=tmp / "chat.jsonl")
    return Case(argv, tmp / "run", [env.base, tmp / "chat.jsonl"], ["chat.jsonl:2", "only the assistant"])


@MATRIX.case("train/model-without-tokenizer-files")
def _(env, tmp):
    # Issue 23: transformers built an empty 5-token tokenizer and training ran on [UNK]s, exit 0.
    base = base_copy(env, tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / name).unlink(missing_ok=True)
    argv = train_argv(env, tmp / "run", model=base)
    return Case(argv, tmp / "run", [base, env.data], ["has no tokenizer"])


@MATRIX.case("train/model-with-another-models-tokenizer")
def _(env, tmp):
    base = base_copy(env, tmp)
    config = json.loads((base / "config.json").read_text())
    config["vocab_size"] = 30522  # a BERT-size vocabulary beside a 20-word tokenizer
    (base / "config.json").write_text(json.dumps(config))
    argv = train_argv(env, tmp / "run", model=base)
    return Case(argv, tmp / "run", [base, env.data], ["tokens", "30522", "not this model's tokenizer"])


@MATRIX.case("train/target-names-match-nothing")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--target_modules", "qq_proj,vv_proj")
    return Case(argv, tmp / "run", [env.base, env.data], ["qq_proj"])


@MATRIX.case("train/target-regex-matches-nothing")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--target_modules", "re:.*nothing.*")
    return Case(argv, tmp / "run", [env.base, env.data], ["nothing"])


@MATRIX.case("train/target_r-above-init_r")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--adalora_target_r", "6")
    return Case(argv, tmp / "run", [env.base, env.data], ["adalora_target_r (6)", "adalora_init_r (4)"])


@MATRIX.case("train/beta1-is-1")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--adalora_beta1", "1.0")
    return Case(argv, tmp / "run", [env.base, env.data], ["adalora_beta1", "between 0 and 1"])


@MATRIX.case("train/beta2-is-0")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--adalora_beta2", "0")
    return Case(argv, tmp / "run", [env.base, env.data], ["adalora_beta2", "between 0 and 1"])


@MATRIX.case("train/negative-orth-weight")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--adalora_orth_reg_weight", "-0.1")
    return Case(argv, tmp / "run", [env.base, env.data], ["adalora_orth_reg_weight", ">= 0"])


@MATRIX.case("train/tinit-leaves-no-budget-phase")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--adalora_tinit", "8", "--adalora_tfinal", "4")
    return Case(argv, tmp / "run", [env.base, env.data], ["no budget phase"])


@MATRIX.case("train/unknown-train-type")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--train_type", "qlora")
    return Case(
        argv,
        tmp / "run",
        [env.base, env.data],
        ["Invalid value for '--train_type'", "'qlora' is not one of 'adalora', 'lora'"],
    )


@MATRIX.case("train/zero-max-length")
def _(env, tmp):
    argv = train_argv(env, tmp / "run", "--max_length", "0")
    return Case(argv, tmp / "run", [env.base, env.data], ["--max_length"])


@MATRIX.case("train/remote-code-config")
def _(env, tmp):
    base = with_remote_code(base_copy(env, tmp))
    argv = train_argv(env, tmp / "run", model=base)
    return Case(argv, tmp / "run", [base, env.data], ["config.json", "remote code"], after=no_remote_code_ran(base))


@MATRIX.case("train/pickle-base")
def _(env, tmp):
    base = pickled_base(env, tmp)
    argv = train_argv(env, tmp / "run", model=base)
    return Case(argv, tmp / "run", [base, env.data], ["pytorch_model.bin", "pickle"])


@MATRIX.case("train/output-exists")
def _(env, tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "notes.txt").write_text("mine")
    argv = train_argv(env, tmp / "run")
    return Case(argv, None, [env.base, env.data, tmp / "run"], ["already exists", "--overwrite"])


@MATRIX.case("train/output-under-a-file")
def _(env, tmp):
    shutil.copy(env.data, tmp / "file")
    argv = train_argv(env, tmp / "file" / "run")
    return Case(argv, None, [env.base, env.data, tmp / "file"], ["file", "run"])


@MATRIX.case("train/resume-without-a-run")
def _(env, tmp):
    return Case(["train", "--output", tmp / "run", "--resume"], tmp / "run", [], ["holds no run"])


def test_matrix_covers_train():
    check_matrix(MATRIX, {"train"}, at_least=20)


@pytest.mark.parametrize("name", MATRIX.names())
def test_bad_input(name, hardening_env, tmp_path, capsys):
    check(MATRIX.build(name, hardening_env, tmp_path), hardening_env, tmp_path, capsys)


def test_records_longer_than_max_length_are_truncated_not_refused(hardening_env, tmp_path):
    """The stated policy (README "Data"): a record over --max_length is cut, counted and trained on."""
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"text": " ".join(WORDS * 3)}) + "\n" for _ in range(8)))
    argv = train_argv(hardening_env, tmp_path / "run", "--max_length", "8", "--max_steps", "2", data=long)
    argv += ["--batch_size", "4", "--adalora_tinit", "0", "--adalora_tfinal", "0", "--save_steps", "0"]
    result = hardening_env.server.run(argv)
    assert result["code"] == 0, result["log"]
    assert "8 examples (8 truncated)" in result["log"]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_train_out_of_disk_keeps_a_resumable_run(hardening_env, tmp_path):
    """A full disk mid-run: exit 2 with one line, no half-written checkpoint, and --resume finishes the run."""
    run = tmp_path / "run"
    result = hardening_env.server.run(train_argv(hardening_env, run), fsize=6000)
    # Besides the run's own report lines, one error, on its own line (the bar drawn so far is closed first).
    errors = [line for line in error_lines(result["log"]) if "error" in line.lower()]
    assert result["code"] == 2 and len(errors) == 1, result["log"]
    assert errors[0].startswith("error: cannot write") and "File too large" in errors[0]
    assert "Traceback" not in result["log"]
    assert hidden_temps(run) == [] and not (run / "final").exists()
    for checkpoint in list_checkpoints(run):
        load_checkpoint(checkpoint)  # every checkpoint that carries its name is complete
    resumed = hardening_env.server.run(["train", "--output", run, "--resume"])
    assert resumed["code"] == 0, resumed["log"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert hidden_temps(run) == []
