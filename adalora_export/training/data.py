"""Training data: read JSONL / text files, tokenize them, and cut them into batches.

Formats (one record per line; blank lines are skipped; other keys are ignored):

- causal LM: ``{"text": ...}`` (loss on every token), ``{"prompt": ..., "completion": ...}`` (loss
  on the completion only), ``{"messages": [{"role": ..., "content": ...}, ...]}`` (rendered with the
  tokenizer's chat template when it has one, else as ``role: content`` lines; loss on the final
  message, which must come from the assistant); a ``.txt`` file holds one ``text`` per line.
- sequence classification: ``{"text": ..., "label": ...}`` with an optional ``"text_pair"``; labels
  are all integers (class ids) or all strings (names, mapped to ids in sorted order).

Length policy (``max_length`` tokens): text and classification records keep their first
``max_length`` tokens; in a prompt+completion (or messages) record the completion keeps its start,
at least half of the budget (all of itself if shorter), and the prompt keeps its end in the rest.

Batching is deterministic: optimizer step s (1-based) of an epoch takes a contiguous slice of one
permutation of the data seeded with seed + epoch; the slice is shared out among ranks (every
world_size-th example, like DistributedSampler) and cut into micro-batches. The same global batch
therefore holds the same examples whatever the split into ranks and micro-batches. A last
incomplete global batch of an epoch is dropped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..hf import CAUSAL_LM, SEQ_CLS

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


@dataclass
class Example:
    """One tokenized record: ``labels`` per token (causal LM) or ``label`` (classification)."""

    input_ids: list[int]
    labels: list[int] | None = None
    label: int | None = None
    token_type_ids: list[int] | None = None


@dataclass
class Dataset:
    path: Path
    task: str
    examples: list[Example]
    label_names: list[str] | None = None  # classification: id -> name
    truncated: int = 0  # records cut to max_length
    fingerprint: str = ""  # sha256 of the file, to refuse resuming on other data
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)


# --------------------------------------------------------------------------- reading
def read_records(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line of a ``.jsonl`` or ``.txt`` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    if path.suffix not in (".jsonl", ".txt"):
        raise UserError(f"data file {path}: expected a .jsonl file (one JSON object per line) or a .txt file")
    records = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            raise UserError(f"{path}:{number}: not UTF-8 text") from None
        if not line.strip():
            continue
        if path.suffix == ".txt":
            records.append((number, {"text": line}))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    if not records:
        raise UserError(f"data file {path} holds no examples")
    return records


def detect_task(path: str | os.PathLike) -> str | None:
    """seq_cls when every record has a ``label``; None (ask the model) when none has. A file that mixes
    the two is a UserError naming a line of each kind: training on half of it would be silently wrong."""
    records = read_records(path)
    labelled = [number for number, record in records if "label" in record]
    if not labelled:
        return None
    if len(labelled) == len(records):
        return SEQ_CLS
    unlabelled = next(number for number, record in records if "label" not in record)
    raise UserError(
        f"{path} mixes labelled records (line {labelled[0]}) with unlabelled ones (line {unlabelled}): "
        "give every record a 'label' (classification) or none (language modelling)"
    )


def _string(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise UserError(f"{where}: '{key}' is empty")
    return value


# ------------------------------------------------------------------- causal LM
def _append_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _cut_pair(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """The length policy for prompt+completion: the completion keeps its start and at least half the
    budget, the prompt its end in what is left."""
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion, False
    keep_c = min(len(completion), max(max_length - len(prompt), (max_length + 1) // 2))
    keep_p = max_length - keep_c
    return prompt[len(prompt) - keep_p :], completion[:keep_c], True


def _render_messages(messages: Any, tokenizer, where: str) -> tuple[str, str]:
    """(prompt text, completion text) of a conversation: the completion is the final assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must come from the assistant (it is what the model learns)")
    if len(messages) == 1:
        raise UserError(f"{where}: 'messages' holds only the assistant's answer; add the turn it answers")
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
        return "", full  # a template that rewrites earlier turns: learn the whole conversation
    # No template: a plain "role: content" transcript.
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + "assistant: "
    return prompt, messages[-1]["content"]


def encode_causal(record: dict, tokenizer, max_length: int, where: str) -> tuple[Example, bool]:
    """Tokenize one causal-LM record (text, prompt+completion, or messages)."""
    if "messages" in record:
        prompt_text, completion_text = _render_messages(record["messages"], tokenizer, where)
        templated = bool(getattr(tokenizer, "chat_template", None))
        # A chat template writes its own special tokens; the plain transcript gets BOS/EOS like text.
        prompt = tokenizer(prompt_text, add_special_tokens=not templated)["input_ids"] if prompt_text else []
        completion = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
        if not templated:
            completion = _append_eos(completion, tokenizer)
    elif "prompt" in record or "completion" in record:
        prompt = tokenizer(_string(record, "prompt", where, allow_empty=True))["input_ids"]
        completion = tokenizer(_string(record, "completion", where), add_special_tokens=False)["input_ids"]
        completion = _append_eos(completion, tokenizer)
    elif "text" in record:
        ids = _append_eos(tokenizer(_string(record, "text", where))["input_ids"], tokenizer)
        cut = len(ids) > max_length
        ids = ids[:max_length]
        return Example(input_ids=ids, labels=list(ids)), cut
    else:
        raise UserError(f"{where}: a causal LM record needs 'text', 'prompt'+'completion' or 'messages'")
    if not completion:
        raise UserError(f"{where}: the completion is empty after tokenization")
    prompt, completion, cut = _cut_pair(prompt, completion, max_length)
    return Example(input_ids=prompt + completion, labels=[IGNORE] * len(prompt) + completion), cut


# ---------------------------------------------------------------- classification
def label_names_of(records: list[tuple[int, dict]], path: Path) -> list[str] | None:
    """None for integer labels; the sorted names for string labels. Mixed kinds are an error."""
    kinds = set()
    names = set()
    for number, record in records:
        if "label" not in record:
            raise UserError(f"{path}:{number}: a classification record needs 'text' and 'label'")
        label = record["label"]
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise UserError(f"{path}:{number}: 'label' must be an integer class id or a string name")
        kind = "int" if isinstance(label, int) else "str"
        if kinds and kind not in kinds:
            raise UserError(f"{path}:{number}: labels mix integers and strings")
        kinds.add(kind)
        if kind == "str":
            names.add(label)
    return sorted(names) if "str" in kinds else None


def encode_classification(
    record: dict, tokenizer, max_length: int, where: str, label_ids: dict[str, int] | None, num_labels: int
) -> tuple[Example, bool]:
    """Tokenize one text(+text_pair)+label record."""
    text = _string(record, "text", where)
    pair = _string(record, "text_pair", where) if "text_pair" in record else None
    label = record.get("label")
    if label_ids is not None:
        if label not in label_ids:
            raise UserError(f"{where}: label {label!r} does not occur in the training data")
        label = label_ids[label]
    elif isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
        raise UserError(f"{where}: label {label!r} must be an integer class id in [0, {num_labels})")
    full = tokenizer(text, pair)
    enc = tokenizer(text, pair, truncation=True, max_length=max_length)
    cut = len(full["input_ids"]) > len(enc["input_ids"])
    return Example(input_ids=enc["input_ids"], label=label, token_type_ids=enc.get("token_type_ids")), cut


# ------------------------------------------------------------------------ loading
def load_dataset(
    path: str | os.PathLike,
    tokenizer,
    task: str,
    max_length: int,
    label_names: list[str] | None = None,
    num_labels: int | None = None,
) -> Dataset:
    """Read and tokenize a data file for ``task``; every problem is a UserError naming file and line.

    For classification, pass the training set's ``label_names`` / ``num_labels`` when loading the
    validation file so that both use the same ids.
    """
    path = Path(path)
    if max_length < 2:
        raise UserError(f"max_length must be at least 2, got {max_length}")
    records = read_records(path)
    examples, truncated = [], 0
    if task == SEQ_CLS:
        if path.suffix == ".txt":
            raise UserError(f"{path}: classification needs a .jsonl file with 'text' and 'label'")
        own_names = label_names_of(records, path)
        if label_names is None and num_labels is None:  # the training set defines the classes
            label_names = own_names
            if own_names is None:
                num_labels = max(2, 1 + max(r["label"] for _, r in records))
        if label_names is not None:
            num_labels = len(label_names)
        label_ids = {name: i for i, name in enumerate(label_names)} if label_names is not None else None
        for number, record in records:
            where = f"{path}:{number}"
            example, cut = encode_classification(record, tokenizer, max_length, where, label_ids, num_labels)
            examples.append(example)
            truncated += cut
    elif task == CAUSAL_LM:
        for number, record in records:
            example, cut = encode_causal(record, tokenizer, max_length, f"{path}:{number}")
            examples.append(example)
            truncated += cut
    else:
        raise UserError(f"task {task!r} cannot be trained: use causal_lm or seq_cls")
    fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()
    dataset = Dataset(path, task, examples, label_names, truncated, fingerprint)
    dataset.meta["num_labels"] = num_labels
    return dataset


# ----------------------------------------------------------------------- batching
def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Optimizer steps in one pass over the data (the last incomplete global batch is dropped)."""
    return num_examples // global_batch


@functools.lru_cache(maxsize=2)
def epoch_order(num_examples: int, seed: int) -> tuple[int, ...]:
    """The permutation of one epoch (cached: every step of the epoch reads it)."""
    return tuple(torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).tolist())


def step_indices(step: int, num_examples: int, global_batch: int, seed: int) -> list[int]:
    """Indices of the examples that optimizer step ``step`` (1-based) trains on, over all ranks."""
    per_epoch = steps_per_epoch(num_examples, global_batch)
    epoch, k = divmod(step - 1, per_epoch)
    return list(epoch_order(num_examples, seed + epoch)[k * global_batch : (k + 1) * global_batch])


def shard(indices: list[int], rank: int, world_size: int, micro_batch: int) -> list[list[int]]:
    """This rank's share of a step (every world_size-th index), cut into micro-batches."""
    mine = indices[rank::world_size]
    return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example; padding carries no loss and no attention."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if examples[0].token_type_ids is not None:
        types = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            types[i, : len(e.token_type_ids)] = torch.tensor(e.token_type_ids)
        batch["token_type_ids"] = types
    if examples[0].labels is not None:
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return batch


def micro_batches(
    dataset: Dataset, step: int, global_batch: int, rank: int, world_size: int, micro_batch: int, seed: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """This rank's collated micro-batches of optimizer step ``step`` (1-based)."""
    indices = step_indices(step, len(dataset), global_batch, seed)
    return [
        collate([dataset.examples[i] for i in ids], pad_id) for ids in shard(indices, rank, world_size, micro_batch)
    ]
