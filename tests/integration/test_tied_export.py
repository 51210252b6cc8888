"""A model whose output head is tied to its embedding (SmolLM2, ``tie_word_embeddings: true``) is exported
with the weight stored once: the head reads the embedding's initializer through a Transpose that
onnxruntime folds when it loads, and the graph still equals torch."""

from __future__ import annotations

import onnx
import pytest
import torch
from adapters import make_adapter
from cli_runs import run_cli

from adalora_export.serving import OnnxServer


def tied_llama(path):
    from transformers import LlamaForCausalLM

    from adalora_export.toy import toy_config, toy_tokenizer

    tok = toy_tokenizer([f"w{i}" for i in range(1000)])  # a vocabulary large enough that a copy shows
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = toy_config("llama", len(tok), 64, 2, tie_word_embeddings=True, **ids)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("kind", [["--merge"], []], ids=["merged", "rank_compact"])
def test_a_tied_output_head_is_stored_once(kind, tmp_path):
    base, model = tied_llama(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "onnx"
    assert run_cli("export", adapter, "--onnx", *kind, "--with-past", "-o", out) == 0
    embedding = model.model.embed_tokens.weight
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    shapes = [list(t.dims) for t in graph.graph.initializer]
    weights = [s for s in shapes if sorted(s) == sorted(embedding.shape)]
    assert len(weights) == 1, shapes  # one (vocab x hidden) tensor: the embedding, read by both
    data = (out / "model.onnx.data").stat().st_size
    safetensors = (base / "model.safetensors").stat().st_size
    assert data < safetensors * 1.05 + embedding.numel() * 4 / 2, (data, safetensors)  # a copy would add 1x

    server = OnnxServer(out, provider="cpu")
    from adalora_export.sources import load_adapter

    reference = load_adapter(adapter)
    merged = reference.apply_to(reference.load_base(base))
    ids = server.tokenizer("w5 w17 w42 w9")["input_ids"]
    with torch.no_grad():
        want = merged.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert server.generate_ids(ids, 8) == want[0, len(ids) :].tolist()
