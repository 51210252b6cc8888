"""An output never destroys its command's input (issue 23, README "Exit codes").

The matrix: every command x every input it reads, with ``--output`` (``--plot`` for inspect) set to
that input, to the directory holding it, to an existing part of it and to a link to it, each with and
without ``--overwrite``: exit code 2, one line naming the output, the input and what the input is, and
the whole workspace byte-identical afterwards (inputs untouched, nothing new: no output, no temporary,
no parent directory). Beside it: a new folder inside a run is still a fine output, ``train --resume``
still writes into its own run, and outputs get their missing parent directories (and lose them again
when the write fails).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from bad_input import error_lines, run_in_process
from cli_runs import run_cli
from files import copy_tree, tree_digest
from training import TRAIN_FLAGS

pytestmark = pytest.mark.slow  # a system test: every command through the CLI, a training run, ONNX exports


@dataclass(frozen=True)
class Input:
    """One input as a case lays it out: ``WORK/<home>/<leaf>``, alone in ``home``."""

    role: str  # how the error line names it
    home: str
    leaf: str
    part: str | None  # an existing path inside it (None: a file)
    shared: str  # the key of the shared path it is a copy of


INPUTS = {
    "base": Input("the base model", "models", "base", "config.json", "base"),
    "data": Input("the training data", "data", "train.jsonl", None, "data"),
    "validation": Input("the validation data", "validation", "valid.jsonl", None, "data"),
    "run": Input("the adapter source", "runs", "run", "checkpoint-4", "run"),
    "adapter": Input("the adapter source", "adapters", "adapter", "adapter_config.json", "adapter"),
    "run.png": Input("the adapter source", "runs.png", "run.png", "rank_heatmap.png", "run"),  # inspect: --plot X.png
    "graph": Input("the graph directory", "graphs", "graph", "adapter.onnx_adapter", "graph"),
}


@dataclass(frozen=True)
class Command:
    argv: Callable[[dict[str, Path], Path], list]  # (the inputs' paths, the output) -> the command line
    reads: tuple[str, ...]  # every input it reads (keys of INPUTS)
    names_base: bool = False  # the adapter names the base copy as its base (no --base given)


def _export(*flags: str, base: bool = True) -> Callable[[dict[str, Path], Path], list]:
    def argv(p: dict[str, Path], out: Path) -> list:
        return ["export", p["adapter"], *flags, *(["--base", p["base"]] if base else []), "--output", out]

    return argv


COMMANDS = {
    "train": Command(
        lambda p, out: [
            *("train", "--model", p["base"], "--data", p["data"], "--validation", p["validation"]),
            *("--output", out, *TRAIN_FLAGS),
        ],
        ("base", "data", "validation"),
    ),
    "prune-run": Command(lambda p, out: ["prune", p["run"], "--output", out], ("run",)),
    "prune-adapter": Command(lambda p, out: ["prune", p["adapter"], "--output", out], ("adapter",)),
    "inspect-plot": Command(lambda p, out: ["inspect", p["run.png"], "--plot", out], ("run.png",)),
    "export-lora": Command(_export("--to", "lora", base=False), ("adapter",)),
    "export-merge": Command(_export("--merge"), ("adapter", "base")),
    "export-merge-named-base": Command(_export("--merge", base=False), ("adapter", "base"), names_base=True),
    "export-onnx": Command(_export("--onnx"), ("adapter", "base")),
    "export-onnx-merge": Command(_export("--onnx", "--merge"), ("adapter", "base")),
    "export-onnx-adapter-inputs": Command(_export("--onnx", "--adapter-inputs"), ("adapter", "base")),
    "export-optimized": Command(_export("--onnx", "--merge", "--optimized"), ("adapter", "base")),
    "export-onnx-graph": Command(
        lambda p, out: ["export", p["adapter"], "--onnx", "--graph", p["graph"], "--output", out],
        ("adapter", "graph"),
    ),
}

# Where --output points, relative to the input at ``path`` (None: not for this input).
RELATIONS: dict[str, Callable[[Path, Input], Path | None]] = {
    "is": lambda path, spec: path,
    "parent": lambda path, spec: path.parent,
    "part": lambda path, spec: path / spec.part if spec.part else None,
    "link": lambda path, spec: path.parent.parent / f"link-{spec.leaf}",  # a symlink to the input, made by the case
}

CASES = [
    pytest.param(command, name, relation, overwrite, id=f"{command}/{name}/{relation}/{flag}")
    for command, spec in COMMANDS.items()
    for name in spec.reads
    for relation in RELATIONS
    if RELATIONS[relation](Path("x"), INPUTS[name]) is not None
    for overwrite, flag in ((False, "plain"), (True, "overwrite"))
]


# -------------------------------------------------------------------------------------- shared inputs
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, llama_base, train_data):
    """One short training run on the tiny Llama (checkpoints every 2 steps, adapter/, rank_heatmap.png),
    into a directory whose parents ``train`` creates."""
    run = tmp_path_factory.mktemp("trained") / "new" / "deep" / "run"
    assert run_cli("train", "--model", llama_base, "--data", train_data, "--output", run, *TRAIN_FLAGS) == 0
    assert (run / "checkpoint-4").is_dir() and (run / "rank_heatmap.png").is_file()
    return run


@pytest.fixture(scope="module")
def graph_in_run(tmp_path_factory, trained_run):
    """``export RUN/adapter --onnx --adapter-inputs --output RUN/onnx`` on a copy of the run: (exit code, the
    run's digest before, after, the run). Its graph is the matrix's ``--graph`` input."""
    run = copy_tree(trained_run, tmp_path_factory.mktemp("graph") / "run")
    before = tree_digest(run)
    code = run_cli("export", run / "adapter", "--onnx", "--adapter-inputs", "--output", run / "onnx")
    return code, before, tree_digest(run), run


@pytest.fixture(scope="module")
def shared(llama_base, llama_adapter, train_data, trained_run, graph_in_run):
    """The shared path each input of a case is a copy of."""
    return {"base": llama_base, "adapter": llama_adapter, "data": train_data, "run": trained_run}, graph_in_run[3]


def lay_out(work: Path, command: Command, shared: tuple[dict[str, Path], Path]) -> dict[str, Path]:
    """Copies of the command's inputs under ``work``, each alone in its home directory."""
    sources, graph_run = shared
    sources = {**sources, "graph": graph_run / "onnx"}
    paths = {}
    for name in command.reads:
        spec = INPUTS[name]
        path = work / spec.home / spec.leaf
        path.parent.mkdir(parents=True)
        source = sources[spec.shared]
        if source.is_dir():
            copy_tree(source, path)
        else:
            shutil.copyfile(source, path)
        paths[name] = path
    if command.names_base:
        config = paths["adapter"] / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": str(paths["base"])}))
    return paths


# ------------------------------------------------------------------------------------------- matrix
def test_the_matrix_covers_every_command_and_input():
    assert {c.split("-")[0] for c in COMMANDS} == {"train", "prune", "inspect", "export"}
    assert {name for c in COMMANDS.values() for name in c.reads} == set(INPUTS)
    assert len(CASES) == 2 * sum(3 + bool(INPUTS[n].part) for c in COMMANDS.values() for n in c.reads)


@pytest.mark.parametrize("command, name, relation, overwrite", CASES)
def test_an_output_that_would_replace_an_input_is_refused(command, name, relation, overwrite, shared, tmp_path, capsys):
    spec, work = COMMANDS[command], tmp_path / "work"
    paths = lay_out(work, spec, shared)
    target = paths[name]
    out = RELATIONS[relation](target, INPUTS[name])
    if relation == "link":
        out.symlink_to(target)
    before = tree_digest(work)

    code, err = run_in_process([*spec.argv(paths, out), *(["--overwrite"] if overwrite else [])], capsys)

    lines = error_lines(err)
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    line = lines[0]
    assert f"output {out} " in line and f" {target} ({INPUTS[name].role})" in line, line
    assert "choose another output" in line, line
    assert tree_digest(work) == before, "the workspace changed: an input was modified or something was written"


# ------------------------------------------------------------------------------- what stays allowed
def test_a_new_folder_inside_the_run_is_a_fine_output(graph_in_run):
    code, before, after, run = graph_in_run
    assert code == 0
    assert {k: v for k, v in after.items() if k in before} == before, "a file of the run changed"
    new = set(after) - set(before)
    assert str(run / "onnx" / "model.onnx") in new and all(k.startswith(str(run / "onnx")) for k in new)


def test_resume_still_writes_into_its_own_run(trained_run, tmp_path, capsys):
    run = copy_tree(trained_run, tmp_path / "run")
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    code, err = run_in_process(["train", "--output", run, "--resume"], capsys)
    assert code == 0, err
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


# --------------------------------------------------------------------------------- missing parents
def test_every_command_creates_the_parents_of_its_output(trained_run, graph_in_run, llama_adapter, tmp_path, capsys):
    assert trained_run.parent.name == "deep"  # train: the fixture's run
    graph = graph_in_run[3] / "onnx"
    runs = {
        "prune": ["prune", trained_run, "--output", tmp_path / "p" / "deep" / "adapter"],
        "inspect": ["inspect", llama_adapter, "--plot", tmp_path / "i" / "deep" / "ranks.png"],
        "lora": ["export", llama_adapter, "--to", "lora", "--output", tmp_path / "l" / "deep" / "lora"],
        "merge": ["export", llama_adapter, "--merge", "--output", tmp_path / "m" / "deep" / "merged"],
        "graph": [
            "export",
            llama_adapter,
            "--onnx",
            "--graph",
            graph,
            "--output",
            tmp_path / "g" / "deep" / "a.onnx_adapter",
        ],
    }
    for what, argv in runs.items():
        code, err = run_in_process(argv, capsys)
        assert code == 0 and Path(argv[-1]).exists(), (what, err)


def test_a_refused_or_failed_write_leaves_no_new_directory(llama_adapter, llama_base, tmp_path, capsys):
    # refused by a check before any work
    code, err = run_in_process(["prune", tmp_path / "nope", "--output", tmp_path / "new" / "deep" / "out"], capsys)
    assert code == 2 and "does not exist" in err, err
    # failed inside the writer, past every check (the parity check): the parents it made are removed again
    argv = ["export", llama_adapter, "--onnx", "--base", llama_base, "--tolerance", "1e-30"]
    code, err = run_in_process([*argv, "--output", tmp_path / "new" / "deep" / "onnx"], capsys)
    assert code == 2 and "tolerance" in err, err
    assert list(tmp_path.iterdir()) == []


def test_demo_overwrite_replaces_only_an_earlier_demo(tmp_path, capsys):
    """`demo --output X --overwrite` removed X whatever it held (the home directory, say): now only a demo's own."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    capsys.readouterr()
    assert run_cli("demo", "--output", mine, "--overwrite", "--steps", "2") == 2
    assert "not an earlier demo's output" in capsys.readouterr().err
    assert (mine / "thesis.txt").read_text() == "years of work"
