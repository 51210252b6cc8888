"""The layout holds: imports run with the data flow, and the wheel claims only its own name."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from support import ROOT

pytestmark = pytest.mark.slow  # builds a wheel


def test_no_import_runs_against_the_flow():
    proc = subprocess.run([sys.executable, "docs/imports.py"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    edges = [line for line in proc.stdout.splitlines() if " -> " in line]
    # the drawing sees the real structure, imports inside functions included
    assert "adalora_export.cli -> adalora_export.export" in edges
    assert "adalora_export.sources -> adalora_export.state" in edges
    assert not any(line.startswith("adalora_export.converters") and "training" in line for line in edges)


def test_wheel_installs_only_the_adalora_export_package(tmp_path):
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
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("adalora_export-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"adalora_export", next(t for t in top if t.endswith(".dist-info"))}, top
    assert "adalora_export/converters/merge/__init__.py" in names or "adalora_export/converters/merge.py" in names
    assert "adalora_export/cli.py" in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "adalora-export = adalora_export.cli:main" in entry
