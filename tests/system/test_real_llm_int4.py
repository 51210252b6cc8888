"""int4 that serves a real model (issue 22): SmolLM2-135M-Instruct with a small adapter, exported by
onnxruntime-genai's builder at the default int4 settings, passes the real-text check and answers."""

from __future__ import annotations

import json

import pytest
from adapters import adapter_at_ranks
from cli_runs import run_cli

from adalora_export.pretrained import smollm2_dir

pytest.importorskip("onnxruntime_genai")
pytestmark = pytest.mark.slow  # SmolLM2 merged, built and checked: about a minute on two cores


@pytest.fixture(scope="module")
def smollm2_adapter(tmp_path_factory):
    """A small random adapter on SmolLM2's q and v projections (ranks 2, 0, 1; std 0.02), naming the base."""
    from adalora_export.formats.peft import save_adapter
    from adalora_export.hf import load_pretrained

    base = smollm2_dir()
    model = load_pretrained(base)
    meta = dict(base_model_name_or_path=str(base), task_type="causal_lm")
    adapter = adapter_at_ranks(model, ["q_proj", "v_proj"], [2, 0, 1], 4, 8.0, 0, std=0.02, **meta)
    return save_adapter(adapter, tmp_path_factory.mktemp("smollm2") / "adapter")


def test_int4_at_the_default_settings_passes_the_check_and_knows_paris(smollm2_adapter, tmp_path, capsys):
    from adalora_export.serving import OnnxServer

    out = tmp_path / "int4"
    capsys.readouterr()
    argv = ["export", smollm2_adapter, "--onnx", "--merge", "--optimized", "--dtype", "int4", "-o", out]
    assert run_cli(*argv) == 0, capsys.readouterr().err
    line = capsys.readouterr().out
    assert "perplexity" in line and "on the check text" in line, line
    manifest = json.loads((out / "onnx_manifest.json").read_text())
    parity, quantization = manifest["parity"], manifest["quantization"]
    assert parity["checked"] and parity["scored_on"] == "text" and parity["scored_tokens"] > 500
    assert parity["bounds"] == {"perplexity_increase": 0.2, "top1_agreement": 0.6}
    assert 0 < parity["perplexity_increase"] <= 0.2 and 0.6 <= parity["top1_agreement"] <= 1
    assert parity["reference_perplexity"] < 60  # real text: a real model, not random ids
    assert {k: quantization[k] for k in ("block_size", "accuracy_level", "head", "sensitive")} == {
        "block_size": 64,
        "accuracy_level": 4,
        "head": "int8",
        "sensitive": "int8",
    }
    answer = OnnxServer(out).generate("The capital of France is", 16)
    assert "Paris" in answer, answer
