"""onnxruntime-genai runs our causal-LM exports as they are: ``genai_config.json`` beside the graph,
``og.Model`` / ``og.Generator`` for greedy decoding, ``og.Adapters`` hot-swapping our ``.onnx_adapter``
files of different per-layer ranks on one model. Tokens equal transformers' greedy ``generate``."""

from __future__ import annotations

import json

import pytest
import torch
from support import make_adapter, make_base, run_cli

from adalora_export.converters.onnx.adapter_file import write_onnx_adapter
from adalora_export.sources import load_adapter

og = pytest.importorskip("onnxruntime_genai")

PROMPT = "the cat sat on the mat"
NEW = 8


def genai_tokens(model, ids: list[int], adapters=None, name: str | None = None) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + NEW, min_length=len(ids) + NEW, do_sample=False)
    generator = og.Generator(model, params)
    if name is not None:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return list(generator.get_sequence(0))[len(ids) :]


@torch.no_grad()
def torch_tokens(model, ids: list[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tmp_path_factory):
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp(request.param)
    base = make_base(tmp / "base", request.param, hidden=32)
    first = make_adapter(base, tmp / "first", seed=0, ranks=(2, 0, 3, 1))
    second = make_adapter(base, tmp / "second", seed=1, ranks=(1, 4, 0, 2))  # other ranks per layer
    ids = AutoTokenizer.from_pretrained(base)(PROMPT).input_ids
    return base, first, second, ids, tmp


def expected(adapter_dir, base, ids) -> list[int]:
    adapter = load_adapter(adapter_dir)
    return torch_tokens(adapter.apply_to(adapter.load_base(base)), ids)


def test_genai_runs_the_merged_graph(setup):
    base, first, _, ids, tmp = setup
    out = tmp / "merged"
    assert run_cli("export", str(first), "--onnx", "--merge", "--with-past", "-o", str(out)) == 0
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is False  # our graph concatenates its cache
    assert genai_tokens(og.Model(str(out)), ids) == expected(first, base, ids)


def test_genai_hot_swaps_adapters_of_different_ranks(setup):
    from transformers import AutoModelForCausalLM

    base, first, second, ids, tmp = setup
    out = tmp / "adapter_inputs"
    assert run_cli("export", str(first), "--onnx", "--adapter-inputs", "--with-past", "-o", str(out)) == 0
    write_onnx_adapter(load_adapter(second), out, tmp / "second.onnx_adapter")
    model = og.Model(str(out))
    adapters = og.Adapters(model)
    adapters.load(str(out / "adapter.onnx_adapter"), "first")
    adapters.load(str(tmp / "second.onnx_adapter"), "second")
    with torch.no_grad():
        plain = torch_tokens(AutoModelForCausalLM.from_pretrained(base).eval(), ids)
    want_first, want_second = expected(first, base, ids), expected(second, base, ids)
    assert want_first != plain and want_second != plain  # each adapter really changes the tokens
    assert want_first != want_second  # and the two differ
    assert genai_tokens(model, ids) == plain  # no adapter active: the base
    assert genai_tokens(model, ids, adapters, "first") == want_first
    assert genai_tokens(model, ids, adapters, "second") == want_second  # swapped on the same model
    assert genai_tokens(model, ids, adapters, "first") == want_first
