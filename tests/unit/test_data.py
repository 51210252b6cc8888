"""Data formats of adalora_export.training.data: each format, the length policy, batching, bad records."""

from __future__ import annotations

import json

import pytest

from adalora_export.errors import UserError
from adalora_export.toy import toy_tokenizer
from adalora_export.training.data import (
    CAUSAL_LM,
    IGNORE,
    SEQ_CLS,
    collate,
    detect_task,
    load_dataset,
    shard,
    step_indices,
)

WORDS = "the a cat dog sat ran on mat fast slow good bad very user assistant system : hi hello bye".split()


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer(WORDS)


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def ids(tok, text, special=True):
    return tok(text, add_special_tokens=special)["input_ids"]


def test_text_jsonl_and_txt(tmp_path, tok):
    jsonl = write(tmp_path, "d.jsonl", [{"text": "the cat sat"}, "", {"text": "a dog ran", "id": 7}])
    ds = load_dataset(jsonl, tok, CAUSAL_LM, max_length=16)
    assert len(ds) == 2  # the blank line is skipped, extra keys ignored
    first = ds.examples[0]
    assert first.input_ids == ids(tok, "the cat sat") + [tok.eos_token_id]
    assert first.labels == first.input_ids
    txt = write(tmp_path, "d.txt", ["the cat sat", "a dog ran"])
    assert [e.input_ids for e in load_dataset(txt, tok, CAUSAL_LM, 16).examples] == [e.input_ids for e in ds.examples]


def test_prompt_completion_masks_the_prompt(tmp_path, tok):
    path = write(tmp_path, "d.jsonl", [{"prompt": "the cat", "completion": "sat on the mat"}])
    (ex,) = load_dataset(path, tok, CAUSAL_LM, 32).examples
    prompt = ids(tok, "the cat")
    completion = ids(tok, "sat on the mat", special=False) + [tok.eos_token_id]
    assert ex.input_ids == prompt + completion
    assert ex.labels == [IGNORE] * len(prompt) + completion


def test_length_policy(tmp_path, tok):
    long_prompt = " ".join(["the cat"] * 10)  # 21 tokens with <s>
    path = write(
        tmp_path,
        "d.jsonl",
        [
            {"text": "the cat sat on the mat very fast"},
            {"prompt": long_prompt, "completion": "sat on the mat"},
            {"prompt": "the", "completion": " ".join(["good"] * 30)},
        ],
    )
    ds = load_dataset(path, tok, CAUSAL_LM, max_length=8)
    assert ds.truncated == 3
    text, pc, long_completion = ds.examples
    assert text.input_ids == ids(tok, "the cat sat on the mat very fast")[:8]  # the start is kept
    completion = ids(tok, "sat on the mat", special=False) + [tok.eos_token_id]
    # Completion: its first half of the budget; prompt: its last 4 tokens.
    assert pc.input_ids == ids(tok, long_prompt)[-4:] + completion[:4]
    assert pc.labels == [IGNORE] * 4 + completion[:4]
    # A short prompt stays whole; the completion fills the rest.
    assert long_completion.input_ids == ids(tok, "the") + ids(tok, "good", special=False) * 6
    assert long_completion.labels == [IGNORE] * 2 + ids(tok, "good", special=False) * 6


def test_messages_plain_and_chat_template(tmp_path, tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write(tmp_path, "d.jsonl", [{"messages": messages}])
    (plain,) = load_dataset(path, tok, CAUSAL_LM, 32).examples
    prompt = ids(tok, "user: hi\nassistant: ")
    assert plain.input_ids == prompt + ids(tok, "hello", special=False) + [tok.eos_token_id]
    assert plain.labels[: len(prompt)] == [IGNORE] * len(prompt)

    templated = toy_tokenizer(WORDS)
    templated.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    (ex,) = load_dataset(path, templated, CAUSAL_LM, 32).examples
    prompt = ids(tok, "user : hi </s> assistant : ", special=False)
    assert ex.input_ids == prompt + ids(tok, "hello </s>", special=False)
    assert ex.labels == [IGNORE] * len(prompt) + ids(tok, "hello </s>", special=False)


def test_classification_labels(tmp_path, tok):
    train = write(
        tmp_path,
        "t.jsonl",
        [
            {"text": "good", "label": "pos"},
            {"text": "bad", "label": "neg"},
            {"text": "the", "text_pair": "cat", "label": "pos"},
        ],
    )
    assert detect_task(train) == SEQ_CLS
    ds = load_dataset(train, tok, SEQ_CLS, 16)
    assert ds.label_names == ["neg", "pos"] and [e.label for e in ds.examples] == [1, 0, 1]
    pair = ds.examples[2]
    assert pair.input_ids == tok("the", "cat")["input_ids"]
    valid = write(tmp_path, "v.jsonl", [{"text": "bad", "label": "neg"}])
    vs = load_dataset(valid, tok, SEQ_CLS, 16, label_names=ds.label_names, num_labels=2)
    assert vs.examples[0].label == 0
    unseen = write(tmp_path, "u.jsonl", [{"text": "bad", "label": "meh"}])
    with pytest.raises(UserError, match=r"u\.jsonl:1: label 'meh' does not occur"):
        load_dataset(unseen, tok, SEQ_CLS, 16, label_names=ds.label_names, num_labels=2)
    ints = write(tmp_path, "i.jsonl", [{"text": "good", "label": 3}, {"text": "bad", "label": 0}])
    ids_ds = load_dataset(ints, tok, SEQ_CLS, 16)
    assert ids_ds.label_names is None and ids_ds.meta["num_labels"] == 4


@pytest.mark.parametrize(
    "lines, task, message",
    [
        (['{"text": "the cat"}', '{"text": '], CAUSAL_LM, r"d\.jsonl:2: not valid JSON"),
        (['{"text": "the"}', "[1, 2]"], CAUSAL_LM, r"d\.jsonl:2: expected a JSON object"),
        ([{"text": 5}], CAUSAL_LM, r"d\.jsonl:1: 'text' must be a string"),
        ([{"title": "x"}], CAUSAL_LM, r"d\.jsonl:1: a causal LM record needs"),
        ([{"prompt": "the"}], CAUSAL_LM, r"d\.jsonl:1: 'completion' must be a string"),
        ([{"prompt": "the", "completion": "  "}], CAUSAL_LM, r"d\.jsonl:1: 'completion' is empty"),
        ([{"messages": []}], CAUSAL_LM, r"d\.jsonl:1: 'messages' must be a non-empty list"),
        ([{"messages": [{"role": "user"}]}], CAUSAL_LM, r"d\.jsonl:1: messages\[0\] must be an object"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], CAUSAL_LM, r"d\.jsonl:1: the last message must"),
        ([{"text": "good", "label": 1}, {"text": "bad"}], SEQ_CLS, r"d\.jsonl:2: a classification record needs"),
        ([{"text": "good", "label": 1}, {"text": "bad", "label": "x"}], SEQ_CLS, r"d\.jsonl:2: labels mix"),
        ([{"text": "good", "label": 1.5}], SEQ_CLS, r"d\.jsonl:1: 'label' must be an integer"),
        ([{"text": "good", "label": -1}], SEQ_CLS, r"d\.jsonl:1: label -1 must be an integer class id"),
        ([{"text": "good", "text_pair": 3, "label": 0}], SEQ_CLS, r"d\.jsonl:1: 'text_pair' must be a string"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path, tok, lines, task, message):
    path = write(tmp_path, "d.jsonl", lines)
    with pytest.raises(UserError, match=message):
        load_dataset(path, tok, task, 16)


def test_bad_files(tmp_path, tok):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="holds no examples"):
        load_dataset(empty, tok, CAUSAL_LM, 16)
    latin = tmp_path / "l.txt"
    latin.write_bytes(b"the cat\nthe caf\xe9\n")
    with pytest.raises(UserError, match=r"l\.txt:2: not UTF-8"):
        load_dataset(latin, tok, CAUSAL_LM, 16)
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(tmp_path / "missing.jsonl", tok, CAUSAL_LM, 16)
    csv = tmp_path / "d.csv"
    csv.write_text("text\nthe cat\n")
    with pytest.raises(UserError, match="expected a .jsonl file"):
        load_dataset(csv, tok, CAUSAL_LM, 16)
    txt = write(tmp_path, "c.txt", ["good"])
    with pytest.raises(UserError, match="classification needs a .jsonl"):
        load_dataset(txt, tok, SEQ_CLS, 16)


def test_global_batches_do_not_depend_on_the_split():
    indices = step_indices(3, num_examples=50, global_batch=8, seed=1)
    assert len(indices) == 8 and indices == step_indices(3, 50, 8, 1)
    one_rank = shard(indices, 0, 1, 2)  # 4 micro-batches of 2
    two_ranks = shard(indices, 0, 2, 2) + shard(indices, 1, 2, 2)
    assert sorted(sum(one_rank, [])) == sorted(sum(two_ranks, [])) == sorted(indices)
    # Step 7 is the first of epoch 2 (6 steps per epoch): another permutation.
    epoch_one = {i for s in range(1, 7) for i in step_indices(s, 50, 8, 1)}
    assert len(epoch_one) == 48
    assert step_indices(7, 50, 8, 1) != step_indices(1, 50, 8, 1)


def test_collate_pads_right_without_loss(tmp_path, tok):
    path = write(tmp_path, "d.jsonl", [{"text": "the cat sat on the mat"}, {"prompt": "a", "completion": "dog"}])
    ds = load_dataset(path, tok, CAUSAL_LM, 16)
    batch = collate(ds.examples, pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = len(ds.examples[1].input_ids)
    assert batch["attention_mask"][1].sum() == short
    assert (batch["labels"][1, short:] == IGNORE).all() and (batch["input_ids"][1, short:] == tok.pad_token_id).all()
