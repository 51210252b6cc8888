"""SIGKILL at random points of `train`, `export --merge` and `export --onnx`.

Each command first runs once uninterrupted (the reference, and the measured run length); then every
trial kills a fresh run of it with SIGKILL at a random moment (one per tenth of the run length, and a
little past it). A kill runs no cleanup, so this is the test of the atomic outputs themselves: after
each kill the output is either absent or complete, loadable and byte-identical to the reference; a
rerun is never blocked or confused by what the kill left; the next successful write removes the
killed process's temporary siblings. `train --resume` after kills (some resumes killed again) ends
with exactly the reference adapter's bytes.

The commands run in children of a fork server (tests/forkserver.py) that imported everything
once, so a trial costs the command's own work.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import onnxruntime as ort
import pytest
from files import hidden_temps, leftovers, tree_digest
from forkserver import ForkServer
from safetensors.torch import load_file

from adalora_export.formats.state import list_checkpoints, read_state_dir
from adalora_export.io import atomic_output_dir, remove_stale_siblings
from adalora_export.sources import load_adapter
from adalora_export.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # a system test: subprocesses, kills or torchrun

TRIALS = 10


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("interrupts")


@pytest.fixture(scope="module")
def started(work):
    server = ForkServer(work / "logs")  # imports while the inputs are built
    yield server
    server.close()


@pytest.fixture(scope="module")
def inputs(llama_base, llama_adapter, train_data):
    return llama_base, llama_adapter, train_data


@pytest.fixture(scope="module")
def server(work, started, inputs, short_schedule_flags):
    base, _, data = inputs
    # One short run inside the server: model loading, the training step and the plot are then warm in every child.
    warm = ["train", "--model", base, "--data", data, "--output", work / "warm", *short_schedule_flags]
    warm += ["--max_steps", "2", "--adalora_tinit", "0", "--adalora_tfinal", "0"]
    assert started.warm_up(warm) == 1  # still safe to fork
    return started


def kill_times(length: float, seed: int, reach: float = 1.1) -> list[float]:
    """One random moment in each tenth of [0, reach x length]: early, middle, late (and just after the end)."""
    rng = random.Random(seed)
    span = reach * length / TRIALS
    return [(i + rng.random()) * span for i in range(TRIALS)]


def relative_digest(root: Path) -> dict[str, str]:
    return {str(Path(k).relative_to(root)): v for k, v in tree_digest(root).items()}


def reference_run(server: ForkServer, argv: list) -> float:
    result = server.run(argv)
    assert result["code"] == 0, result["log"]
    return result["seconds"]


def check_killed_export(out: Path, reference: Path, killed: bool) -> str:
    """After a kill: no output, or the complete one (every file, byte for byte). Returns which."""
    if not out.exists():
        assert killed, "a run that finished left no output"
        return "absent"
    assert relative_digest(out) == relative_digest(reference), f"{out} is incomplete or differs"
    return "complete"


def kill_trials(server: ForkServer, argv_for, out: Path, reference: Path, seed: int, length: float) -> dict:
    """Run TRIALS killed runs writing ``out`` (with --overwrite: a finished trial leaves an output)."""
    seen = {"absent": 0, "complete": 0, "stale": 0}
    for kill_after in kill_times(length, seed):
        result = server.run(argv_for(out, "--overwrite"), kill_after=kill_after)
        assert result["killed"] or result["code"] == 0, result["log"]
        seen[check_killed_export(out, reference, result["killed"])] += 1
        seen["stale"] += bool(leftovers(out))
    return seen


def test_merge_killed_at_random_points(server, inputs, work):
    base, adapter, _ = inputs

    def argv(out, *extra):
        return ["export", adapter, "--merge", "--base", base, "--output", out, *extra]

    reference = work / "merge-reference"
    length = reference_run(server, argv(reference))
    out = work / "merge-out"
    seen = kill_trials(server, argv, out, reference, seed=1, length=length)
    print(f"merge: run {length:.2f} s; after the kills: {seen}")
    assert seen["absent"] >= 1, f"no kill landed mid-write, so no trial tested atomicity: {seen}"
    # A rerun after the kills: never blocked, same bytes, and the killed writers' temporaries are gone.
    if out.exists():
        os.rename(out, work / "merge-moved")
    rerun = server.run(argv(out))
    assert rerun["code"] == 0, rerun["log"]
    assert relative_digest(out) == relative_digest(reference)
    assert leftovers(out) == []
    assert load_file(out / "model.safetensors").keys() == load_file(reference / "model.safetensors").keys()


def test_onnx_export_killed_at_random_points(server, inputs, work):
    base, adapter, _ = inputs

    def argv(out, *extra):
        return ["export", adapter, "--onnx", "--base", base, "--output", out, *extra]

    reference = work / "onnx-reference"
    length = reference_run(server, argv(reference))
    out = work / "onnx-out"
    seen = kill_trials(server, argv, out, reference, seed=2, length=length)
    print(f"onnx: run {length:.2f} s; after the kills: {seen}")
    assert seen["absent"] >= 1, f"no kill landed mid-write, so no trial tested atomicity: {seen}"
    if out.exists():  # complete: onnxruntime loads it, external data and all
        ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        os.rename(out, work / "onnx-moved")
    rerun = server.run(argv(out))
    assert rerun["code"] == 0, rerun["log"]
    assert relative_digest(out) == relative_digest(reference)
    assert leftovers(out) == []


def check_killed_run(run: Path) -> None:
    """What a killed training run holds is consistent: every named checkpoint, final/ and adapter/ loads."""
    assert not run.exists() or (run / "run_args.json").is_file(), "a run directory that cannot be resumed"
    for checkpoint in list_checkpoints(run):
        load_checkpoint(checkpoint)
    if (run / "final").exists():
        read_state_dir(run / "final")
    if (run / "adapter").exists():
        load_adapter(run / "adapter")
    for name in ("run_args.json", "rank_pattern.json"):
        if (run / name).exists():
            json.loads((run / name).read_text())


def test_train_killed_then_resumed_ends_byte_identical(server, inputs, work, short_schedule_flags):
    base, _, data = inputs
    fresh = ["train", "--model", base, "--data", data, *short_schedule_flags, "--output"]
    reference = work / "train-reference"
    length = reference_run(server, [*fresh, reference])
    expected = relative_digest(reference / "adapter")
    rng = random.Random(3)
    kills = stale = 0
    started = time.monotonic()
    # Runs vary in length on a busy machine: aim inside the run, so that (nearly) every trial is a kill.
    for trial, kill_after in enumerate(kill_times(length, seed=3, reach=0.9)):
        run = work / f"train-{trial}"
        result = server.run([*fresh, run], kill_after=kill_after)
        kills += result["killed"]
        stale += bool(hidden_temps(run))
        check_killed_run(run)
        if trial % 3 == 1:  # kill the resume as well, somewhere in what is left of the run
            if run.exists():
                again = server.run(["train", "--output", run, "--resume"], kill_after=rng.uniform(0, 0.6 * length))
                kills += again["killed"]
                check_killed_run(run)
        argv = ["train", "--output", run, "--resume"] if run.exists() else [*fresh, run]
        finished = server.run(argv)
        assert finished["code"] == 0, finished["log"]
        assert relative_digest(run / "adapter") == expected, f"trial {trial} (kill at {kill_after:.2f} s) differs"
        assert hidden_temps(run) == [], hidden_temps(run)
    print(f"train: run {length:.2f} s; {kills} kills, {stale} left a temporary behind")
    assert kills >= TRIALS // 2, "most trials must really be killed mid-run"
    assert time.monotonic() - started < 600


def test_next_write_removes_siblings_of_killed_writers(tmp_path):
    """Temporaries of dead pids are removed on the next successful write; a live writer's are kept."""
    out = tmp_path / "out"
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)  # reaped: the pid is gone
    stale = [tmp_path / f".out.tmp-{dead}-abc123", tmp_path / f".out.old-{dead}"]
    for path in stale:
        path.mkdir()
        (path / "half.bin").write_bytes(b"\0" * 10)
    live = tmp_path / f".out.tmp-{os.getppid()}-xyz"
    live.mkdir()
    other = tmp_path / f".out.b.tmp-{dead}-abc"  # the sibling of another output ("out.b")
    other.mkdir()
    with atomic_output_dir(out) as tmp:
        assert f".out.tmp-{os.getpid()}-" in tmp.name
        (tmp / "done.txt").write_text("ok")
    assert (out / "done.txt").read_text() == "ok"
    assert not any(path.exists() for path in stale)
    assert live.exists() and other.exists()
    assert remove_stale_siblings(out) == []


def test_a_child_killed_mid_bar_does_not_block_the_next_one():
    """The fork server's children share tqdm's semaphore unless fresh_tqdm_locks runs: a child killed
    while drawing a progress bar (transformers' "Loading weights" included) must not hang the next."""
    import signal

    import tqdm.auto
    from forkserver import fresh_tqdm_locks
    from transformers.utils import logging as hf_logging

    with open(os.devnull, "w") as null:
        for make in (tqdm.auto.tqdm, hf_logging.tqdm):  # build the locks in the parent, as the warm-up does
            make(total=1, file=null).close()
    holder = os.fork()
    if holder == 0:
        fresh_tqdm_locks()
        tqdm.auto.tqdm.get_lock().acquire()
        time.sleep(60)
        os._exit(0)
    time.sleep(0.3)
    os.kill(holder, signal.SIGKILL)
    os.waitpid(holder, 0)
    child = os.fork()
    if child == 0:
        fresh_tqdm_locks()
        with open(os.devnull, "w") as null:
            hf_logging.tqdm(total=1, file=null).close()
            tqdm.auto.tqdm(total=1, file=null).close()
        os._exit(0)
    deadline = time.monotonic() + 20  # a deadlock never ends: a bound far above the ~1 s it takes is the test
    while time.monotonic() < deadline and os.waitpid(child, os.WNOHANG)[0] == 0:
        time.sleep(0.02)
    finished = time.monotonic() < deadline
    if not finished:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    assert finished, "the next child hung on tqdm's lock"
