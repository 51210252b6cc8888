"""What an optimized graph is scored on against torch, and the figures: real text, perplexity, top-1.

Random token ids (what the check fed before) say little about a real model: the logits of nonsense
are flat, and an int4 graph that answered "The capital of France is" with " capital of France." kept
within its logit bound on them. The graph and the torch fp32 reference now read the same real English
text (``check_text.txt``: six paragraphs of plain prose written for this check), tokenized by the
model's own tokenizer, and each position is scored: the per-token negative log-likelihood of the
text's next token (given as perplexity, graph and torch) and whether both predict the same next token
(top-1 agreement). A model without a usable tokenizer (none, or one that turns the text into unknown
tokens, as the tests' word-level toys do) is scored on random ids instead, and the figures say so.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adalora_export.errors import UserError
from adalora_export.hf import load_tokenizer

CHECK_TEXT = Path(__file__).with_name("check_text.txt")
MAX_TOKENS = 128  # per passage: six passages, about 700 scored positions
MAX_UNKNOWN = 0.05  # a tokenizer that maps more of the text to its unknown token is not usable here
MIN_TOKENS = 16  # nor one that makes a passage shorter than this
RANDOM_SEQUENCES = (64, 64, 64, 64)  # lengths of the random-id sequences, when there is no usable tokenizer


def passages() -> list[str]:
    """The paragraphs of ``check_text.txt``, each on one line."""
    return [" ".join(p.split()) for p in CHECK_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def check_sequences(tokenizer_dir: str | os.PathLike, vocab_size: int, context: int) -> tuple[list[list[int]], str]:
    """(token id sequences, what they are): the check text through the tokenizer in ``tokenizer_dir``,
    each passage cut to ``MAX_TOKENS`` (and to ``context``), or random ids when it has no usable one."""
    limit = max(2, min(MAX_TOKENS, context))
    sequences = _text_ids(tokenizer_dir, limit)
    if sequences is not None:
        return sequences, "text"
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, min(n, limit)).tolist() for n in RANDOM_SEQUENCES], "random ids"


def _text_ids(tokenizer_dir: str | os.PathLike, limit: int) -> list[list[int]] | None:
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except UserError:
        return None
    sequences = [list(tokenizer(text)["input_ids"])[:limit] for text in passages()]
    unknown = tokenizer.unk_token_id
    total = sum(len(ids) for ids in sequences)
    unknowns = sum(ids.count(unknown) for ids in sequences) if unknown is not None else 0
    if min(len(ids) for ids in sequences) < min(MIN_TOKENS, limit) or unknowns > MAX_UNKNOWN * total:
        return None
    return sequences


@dataclass
class TextScore:
    """The figures of graph against torch, summed over the sequences ``add`` is given."""

    nll_graph: float = 0.0  # summed negative log-likelihood of each next token
    nll_torch: float = 0.0
    agree: int = 0  # positions where both predict the same next token
    scored: int = 0  # positions scored (each sequence's all but the last)
    worst: float = 0.0  # largest |graph - torch| logit, relative to the largest |torch| logit

    def add(self, ids: list[int], got: np.ndarray, want: np.ndarray) -> None:
        """One sequence: ``got`` (graph) and ``want`` (torch) are its logits, (len(ids), vocab)."""
        self.worst = max(self.worst, float(np.abs(got - want).max() / np.abs(want).max()))
        target = torch.tensor(ids[1:])
        got_t, want_t = torch.from_numpy(got[:-1]).float(), torch.from_numpy(want[:-1]).float()
        self.nll_graph += float(torch.nn.functional.cross_entropy(got_t, target, reduction="sum"))
        self.nll_torch += float(torch.nn.functional.cross_entropy(want_t, target, reduction="sum"))
        self.agree += int((got_t.argmax(-1) == want_t.argmax(-1)).sum())
        self.scored += len(ids) - 1

    def figures(self, source: str) -> dict:
        """The manifest's figures: ``source`` names what was scored (``text`` or ``random ids``)."""
        graph, reference = math.exp(self.nll_graph / self.scored), math.exp(self.nll_torch / self.scored)
        return {
            "scored_on": source,
            "scored_tokens": self.scored,
            "perplexity": graph,
            "reference_perplexity": reference,
            "perplexity_increase": graph / reference - 1,
            "top1_agreement": self.agree / self.scored,
            "max_relative_error": self.worst,
        }
