"""onnxruntime-genai's own model builder takes our LoRA export as ``adapter_path`` and serves it exactly.

Not a reading rule but the runtime itself: the builder (``python -m onnxruntime_genai.models.builder``)
bakes each layout into a fused decoder graph, onnxruntime-genai's generator runs it, and its greedy
tokens and prefill logits equal transformers (base) and PEFT (base + our LoRA export).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from support import make_adapter, make_base

from adalora_export.converters.lora import LORA_LAYOUTS, export_lora
from adalora_export.sources import load_adapter

og = pytest.importorskip("onnxruntime_genai")
peft = pytest.importorskip("peft")

PROMPT = "the cat sat on the mat"
NEW_TOKENS = 8


def build(base_dir, output, cache, adapter_dir=None):
    argv = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "toy", "-i", str(base_dir)]
    argv += ["-o", str(output), "-p", "fp32", "-e", "cpu", "-c", str(cache)]
    if adapter_dir is not None:
        argv += ["--extra_options", f"adapter_path={adapter_dir}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return output


def genai_run(model_dir, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """onnxruntime-genai's greedy tokens and the prefill's last-position logits."""
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    logits = np.asarray(generator.get_output("logits"))[0, -1].copy()
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens, logits


@torch.no_grad()
def torch_run(model, ids: list[int]) -> tuple[list[int], np.ndarray]:
    x = torch.tensor([ids])
    out = model.generate(x, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(ids) :].tolist(), model(x).logits[0, -1].numpy()


def test_genai_builder_serves_both_layouts_like_peft(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = make_base(tmp_path / "base", "llama", hidden=64)  # GQA on the CPU wants head_size % 16 == 0
    adapter = load_adapter(make_adapter(base_dir, tmp_path / "adalora", ranks=(3, 0, 2, 1)))
    assert any(m.rank == 0 for m in adapter.modules.values())  # a pruned module, absent from compact
    ids = AutoTokenizer.from_pretrained(base_dir)(PROMPT).input_ids

    base_tokens, base_logits = genai_run(build(base_dir, tmp_path / "og_base", tmp_path / "cache"), ids)
    ref_tokens, ref_logits = torch_run(AutoModelForCausalLM.from_pretrained(base_dir).eval(), ids)
    assert base_tokens[: len(ref_tokens)] == ref_tokens
    np.testing.assert_allclose(base_logits, ref_logits, rtol=0, atol=1e-4 * np.abs(ref_logits).max())

    for layout in LORA_LAYOUTS:
        lora_dir = export_lora(adapter, tmp_path / f"lora_{layout}", layout=layout)
        tokens, logits = genai_run(build(base_dir, tmp_path / f"og_{layout}", tmp_path / "cache", lora_dir), ids)
        hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(lora_dir)).eval()
        ref_tokens, ref_logits = torch_run(hf, ids)
        assert tokens[: len(ref_tokens)] == ref_tokens, layout
        np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-4 * np.abs(ref_logits).max())
        assert np.abs(logits - base_logits).max() > 1e-2 * np.abs(base_logits).max()  # the adapter is in the graph
