"""`adalora-export demo` runs the whole path (a short version of it here)."""

from __future__ import annotations

import pytest
from training import assert_within_budget

from adalora_export import cli

pytestmark = pytest.mark.slow  # a system test: subprocesses, kills or torchrun


def test_demo_short_run(tmp_path, capsys):
    out = tmp_path / "demo"
    cli.main(["demo", "--output", str(out), "--steps", "10"])
    printed = capsys.readouterr().out
    assert "trained 10 steps" in printed and "demo done" in printed
    assert_within_budget(out / "run")  # the default preset: LoRA r=target_r's size at most
    assert (out / "run" / "adapter" / "adapter_config.json").is_file()
    assert (out / "merged" / "config.json").is_file() and "merged vs base+adapter" in printed
    assert (out / "onnx").is_dir() and "onnxruntime greedy: '12 15 18' -> " in printed
