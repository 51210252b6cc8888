"""Test-wide settings (offline hub, one thread), the shared fixtures, and the CI rule on missing test dependencies.

Fixtures built once per session (per xdist worker) are shared inputs: a test must not change them
(``files.copy_tree`` first), and the session ends with an error if one did. Helpers live in models,
adapters, training, files, cli_runs and forkserver.
"""

from __future__ import annotations

import os
from types import MappingProxyType

import pytest
import torch
from adapters import make_adapter
from files import tree_digest
from models import make_base
from training import SHORT_SCHEDULE, cli_flags, write_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite runs as two xdist workers on two cores: one thread each avoids oversubscription.
torch.set_num_threads(1)


# ------------------------------------------------------------------------------ shared inputs
def _unchanged(built: dict) -> None:
    """Fail the session's last test if a shared input differs from what its fixture built."""
    changed = [str(path) for path, digest in built.values() if tree_digest(path) != digest]
    assert not changed, f"a test modified shared fixture inputs (copy them first): {changed}"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """``tiny_base(arch="llama", hidden=32, layers=2, seed=0, words=None, num_labels=None)``: the path of a
    random-weight base directory (``models.make_base``), built on first request and shared afterwards."""
    built = {}

    def get(arch="llama", hidden=32, layers=2, seed=0, words=None, num_labels=None):
        key = (arch, hidden, layers, seed, None if words is None else tuple(words), num_labels)
        if key not in built:
            parent = tmp_path_factory.mktemp(f"{arch}-h{hidden}-l{layers}-s{seed}")
            path = make_base(parent / "base", arch, hidden, layers, seed, words=words, num_labels=num_labels)
            built[key] = path, tree_digest(path)
        return built[key][0]

    yield get
    _unchanged(built)


@pytest.fixture(scope="session")
def llama_base(tiny_base):
    """A Llama causal LM directory, hidden 32, 2 layers, a tokenizer over models.WORDS."""
    return tiny_base("llama")


@pytest.fixture(scope="session")
def gpt2_base(tiny_base):
    """A GPT-2 causal LM directory (Conv1D layers), hidden 32, 2 layers."""
    return tiny_base("gpt2")


@pytest.fixture(scope="session")
def bert_base(tiny_base):
    """A BERT encoder with a 2-label classification head, hidden 32, 2 layers."""
    return tiny_base("bert")


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory):
    """``tiny_adapter(base, ranks=(2, 0, 3, 1), seed=0)``: the path of a random compact adapter saved over the
    base directory ``base`` and naming it as its base (``adapters.make_adapter``), built once, shared."""
    built = {}

    def get(base, ranks=(2, 0, 3, 1), seed=0):
        key = (str(base), tuple(ranks), seed)
        if key not in built:
            path = make_adapter(base, tmp_path_factory.mktemp("adapter") / "adapter", seed, tuple(ranks))
            built[key] = path, tree_digest(path)
        return built[key][0]

    yield get
    _unchanged(built)


@pytest.fixture(scope="session")
def llama_adapter(tiny_adapter, llama_base):
    """A compact adapter over ``llama_base`` at ranks 2, 0, 3, 1 (cycling over its 14 modules)."""
    return tiny_adapter(llama_base)


@pytest.fixture(scope="session")
def short_schedule():
    """The short run as ``train()`` options (read-only; ``{**short_schedule, ...}`` to change some):
    12 optimizer steps of 4 records, budget phase 3..8, final shrink at step 8, a checkpoint every 2 steps."""
    return MappingProxyType(SHORT_SCHEDULE)


@pytest.fixture(scope="session")
def short_schedule_flags(short_schedule):
    """The short run as flags of the ``train`` command."""
    return tuple(cli_flags(short_schedule))


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    """train.jsonl: the 48 sentences the short schedule trains on (``training.write_data``)."""
    path = write_data(tmp_path_factory.mktemp("data") / "train.jsonl")
    built = {"train_data": (path, tree_digest(path))}
    yield path
    _unchanged(built)


# ------------------------------------------------------------------------ missing test dependencies
# A tier whose dependency is missing skips itself (pytest.importorskip): fine on a laptop, but under CI
# (CI set, as CI services do and .ci/run does) such a skip would leave the tier silently empty, so it fails.
MISSING_MODULE = "could not import "  # how pytest.importorskip words its skip
INSTALL = "under CI a missing test dependency is an error: install the test extras (./run.sh setup)"


def _strict() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _fail_if_missing_dependency(report) -> None:
    if report.skipped and isinstance(report.longrepr, tuple) and MISSING_MODULE in report.longrepr[2]:
        path, line, reason = report.longrepr
        report.outcome = "failed"
        report.longrepr = f"{path}:{line}: {reason.removeprefix('Skipped: ')}\n{INSTALL}"


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield  # a module-level importorskip skips the whole file at collection
    if _strict():
        _fail_if_missing_dependency(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield  # an importorskip in a fixture or a test skips that test
    if _strict():
        _fail_if_missing_dependency(report)
    return report
