"""The layout holds: imports run with the data flow, and the wheel claims only its own name."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
from cli_runs import ROOT

pytestmark = pytest.mark.slow  # builds a wheel


def test_no_import_runs_against_the_flow():
    proc = subprocess.run([sys.executable, "docs/imports.py"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    edges = [line for line in proc.stdout.splitlines() if " -> " in line]
    # the drawing sees the real structure, imports inside functions included
    assert "adalora_export.cli -> adalora_export.export" in edges
    assert "adalora_export.sources -> adalora_export.formats.state" in edges
    assert not any(line.startswith("adalora_export.converters") and "training" in line for line in edges)
    assert "0 chain(s) breaking" in proc.stdout


def test_reach_check_finds_a_chain_through_another_module():
    # A converter importing a module that imports the allocator breaks the rule, though no edge is against the flow.
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import imports
    finally:
        sys.path.remove(str(ROOT / "docs"))
    pkg = imports.PACKAGE
    edges = {
        f"{pkg}.converters.lora": {f"{pkg}.adapter"},
        f"{pkg}.adapter": {f"{pkg}.allocator"},
        f"{pkg}.allocator": set(),
    }
    assert imports.unreachable_hits(edges) == [f"{pkg}.converters.lora -> {pkg}.adapter -> {pkg}.allocator"]
    edges[f"{pkg}.adapter"] = set()
    assert imports.unreachable_hits(edges) == []


def test_wheel_installs_only_the_adalora_export_package_and_all_of_it(tmp_path):
    # Build from a copy of the tracked files: a stale build/ in the checkout would leak deleted modules.
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("adalora_export-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"adalora_export", next(t for t in top if t.endswith(".dist-info"))}, top
    # Every module of the checkout is in the wheel, under its installed name.
    expected = {n for n in tracked if n.endswith(".py") and n.startswith("adalora_export/")}
    expected |= {"adalora_export/" + n for n in tracked if n.endswith(".py") and n.startswith("converters/")}
    assert expected <= set(names), sorted(expected - set(names))
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "adalora-export = adalora_export.cli:main" in entry
