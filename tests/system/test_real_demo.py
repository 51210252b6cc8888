"""``adalora-export demo --real`` as the README runs it, shortened to 2 steps: SmolLM2 on Debian's package
descriptions -> int4 graph -> a streamed chat answer before and after, and the held-out table."""

from __future__ import annotations

import json

import pytest
from cli_runs import run_cli

from adalora_export import cli
from adalora_export.debian import CHAT_SECTIONS, package_index, read_packages

pytestmark = pytest.mark.slow  # a 135M model trained, scored and built as int4 on 2 cores (~3 min)


def test_real_demo_short_run(tmp_path, capsys):
    # The machine's own apt lists, passed as a Packages file (--packages), cut to the demo's sections.
    stanzas = [s for s in package_index().split("\n\n") if any(f"Section: {x}" in s for x in CHAT_SECTIONS)]
    packages = tmp_path / "Packages"
    packages.write_text("\n\n".join(stanzas))
    assert {p.section for p in read_packages(packages.read_text())} >= set(CHAT_SECTIONS)
    out = tmp_path / "demo"
    cli.main(["demo", "--real", "--output", str(out), "--steps", "2", "--packages", str(packages)])
    printed = capsys.readouterr().out
    assert "base model, before (torch):" in printed and "fine-tuned int4 graph, after" in printed
    assert "demo done" in printed
    summary = json.loads((out / "summary.json").read_text())
    figures = summary["figures"]
    assert set(figures) == {"base", "fine-tuned", "int4 graph"}
    for row in figures.values():
        assert 0 <= row["exact_match"] <= 1 and 0 <= row["named_match"] <= 1
    assert figures["base"]["nll"] > 0 and figures["fine-tuned"]["nll"] > 0
    assert summary["answer_after"].strip()  # the int4 graph answered the streamed question
    # The int4 graph passed its own check on real text (it raises otherwise, and writes nothing).
    assert summary["int4_check"]["perplexity_increase"] <= 0.2
    manifest = json.loads((out / "int4" / "onnx_manifest.json").read_text())
    assert manifest["parity"]["checked"] is True
    assert (out / "merged" / "model.safetensors").is_file() or (
        out / "merged" / "model.safetensors.index.json"
    ).is_file()
    assert sum(1 for _ in open(out / "data" / "train.jsonl")) == 480


def test_packages_without_real_is_exit_2(tmp_path, capsys):
    assert run_cli("demo", "--packages", tmp_path / "Packages") == 2
    assert "--packages applies to the real demo only" in capsys.readouterr().err


def test_real_demo_refuses_before_writing(tmp_path, capsys):
    """A Packages file with too few packages, and an --output over the Packages file: exit 2, nothing written."""
    thin = tmp_path / "Packages"
    thin.write_text("Package: tuxracer\nSection: games\nDescription: Tux races down snowy slopes, a 3D game\n")
    out = tmp_path / "demo"
    assert run_cli("demo", "--real", "--output", out, "--packages", thin) == 2
    assert "too few package descriptions" in capsys.readouterr().err and not out.exists()
    assert run_cli("demo", "--real", "--output", tmp_path, "--overwrite", "--packages", thin) == 2
    assert thin.is_file() and "--packages" in capsys.readouterr().err
