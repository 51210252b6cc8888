"""The bad-input matrix that tests/system/test_hardening_*.py run, one file per command group.

A case is a builder ``(env, tmp) -> Case``: it prepares its inputs (copies of the shared, never-modified
inputs in ``Env``, damaged as the case needs) and says what must happen. ``check`` runs the real CLI
entry ``cli.main`` in-process (the out-of-disk cases in a fork-server child with a small RLIMIT_FSIZE)
and checks: exit code 2; exactly one stderr line (progress bars aside), starting with ``error:``, that
names the problem; no output and no hidden ``.NAME.tmp-*`` sibling left; every input byte-identical;
for remote code, that the code never ran.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from cli_runs import run_cli
from files import copy_tree, hidden_temps, leftovers, pickle_weights, tree_digest
from forkserver import ForkServer

PROGRESS = re.compile(r"\d+%\|.*\|")  # a tqdm bar: "desc:  17%|█▋        | 1/6 [00:00<00:01, ...]"
SAFETENSORS_DAMAGE = ["cut_header", "past_end", "bad_offsets", "wrong_dtype", "cut_data"]
# Imported by transformers only if a config's auto_map were honoured: the marker file proves it never runs.
EVIL_CODE = "import pathlib\npathlib.Path(__file__).with_name('REMOTE_CODE_RAN').touch()\n"


@dataclass
class Env:
    """The shared, never-modified inputs of the matrix (the ``hardening_env`` fixture)."""

    work: Path
    base: Path  # Llama, hidden 32
    gpt2: Path  # another architecture
    wide: Path  # Llama, hidden 64: another size
    adapter: Path  # a compact adapter for ``base`` (ranks 0..3), naming ``base`` as its base
    data: Path  # train.jsonl
    server: ForkServer
    train_flags: list[str] = field(default_factory=list)  # the short schedule as flags of ``train``

    @cached_property
    def graph(self) -> Path:
        """export --onnx --merge --with-past of ``adapter``, made (by the server) when a case first needs it."""
        graph = self.work / "graph"
        result = self.server.run(["export", self.adapter, "--onnx", "--merge", "--with-past", "--output", graph])
        assert result["code"] == 0, result["log"]
        return graph


@dataclass
class Case:
    argv: list
    output: Path | None  # must not exist afterwards (nor any hidden sibling of it)
    inputs: list[Path]  # byte-identical afterwards
    message: list[str]  # fragments of the one error line
    fsize: int | None = None  # run in a child process with this RLIMIT_FSIZE (bytes)
    after: Callable[[], None] | None = None  # further checks


class Matrix:
    """One file's cases by name ("command/what is wrong"): ``@MATRIX.case(name)`` registers a builder."""

    def __init__(self):
        self.builders: dict[str, Callable[[Env, Path], Case]] = {}

    def case(self, name: str):
        def register(build):
            assert name not in self.builders, f"two cases named {name}"
            self.builders[name] = build
            return build

        return register

    def names(self) -> list[str]:
        return sorted(self.builders)

    def commands(self) -> set[str]:
        return {name.split("/")[0] for name in self.builders}

    def build(self, name: str, env: Env, tmp: Path) -> Case:
        return self.builders[name](env, tmp)


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


def merge_argv(adapter: Path, out: Path, *extra) -> list:
    return ["export", adapter, "--merge", "--output", out, *extra]


# ------------------------------------------------------------------------------------- the check
def error_lines(stderr: str) -> list[str]:
    """stderr without progress bars (tqdm's, transformers' "Loading weights"): what the user reads as messages."""
    lines = stderr.replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and not PROGRESS.search(line)]


def run_in_process(argv: list, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = run_cli(*argv)
    return code, capsys.readouterr().err


def check_matrix(matrix: Matrix, commands: set[str], at_least: int) -> None:
    """The file's cases cover exactly ``commands``, at least ``at_least`` of them."""
    assert matrix.commands() == commands and len(matrix.builders) >= at_least, (matrix.commands(), len(matrix.builders))


def check(spec: Case, env: Env, tmp_path: Path, capsys) -> None:
    """Run ``spec`` and check what every bad input must give (the module doc)."""
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
