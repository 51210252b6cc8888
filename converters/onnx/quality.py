"""The optimized graph's check: what it is scored on against torch, the figures, and their bounds.

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
from adalora_export.formats.onnx_dir import import_onnxruntime_genai
from adalora_export.hf import eos_token_ids, load_tokenizer

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


# The bound per dtype (``tolerance`` replaces it). fp32 and fp16: the largest relative logit error (to the
# largest reference logit) against torch fp32, the same arithmetic reordered or in the builder's fp16.
# int4 rounds every weight to 16 levels per block, so logits move visibly: its bound is on the graph's
# perplexity over the check text, at most this share above torch's, and at the default bound top-1
# agreement at least INT4_MIN_TOP1. Measured on SmolLM2-135M-Instruct with three small adapters (README):
# the default settings give +9 to +11% and 68-69%; the builder's own defaults (all int4, blocks of 32)
# +31% and 59%, and answer "The capital of France is" with " capital of France.".
OPTIMIZED_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "int4": 0.2}
INT4_MIN_TOP1 = 0.6
PROMPT_LENGTHS = (5, 11, 17)  # greedy decoding from the first tokens of the first sequences
NEW_TOKENS = 8


@torch.no_grad()
def check_optimized(
    graph_dir: Path,
    reference: torch.nn.Module,
    sequences: list[list[int]],
    scored_on: str,
    adapter_file: Path | None = None,
) -> dict:
    """Run the built graph through onnxruntime-genai (with ``adapter_file`` active, if given) against
    ``reference``, the model it stands for, in torch fp32; returns the figures (``judge`` holds them to
    the dtype's bounds).

    Each of ``sequences`` (``quality.check_sequences``; ``scored_on`` says what they are) is scored whole
    (``quality.TextScore``: perplexity of both, top-1 agreement, the largest relative logit error); the
    first ``PROMPT_LENGTHS`` tokens of the first ones are decoded greedily, ``NEW_TOKENS`` each.
    """
    og = import_onnxruntime_genai()
    model = og.Model(str(graph_dir))
    adapters = None
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), "adapter")
    score = TextScore()
    for ids in sequences:
        want = reference(torch.tensor([ids])).logits[0].numpy()
        run = _generator(og, model, adapters, ids, len(ids) + 1)
        score.add(ids, np.asarray(run.get_output("logits"), dtype=np.float32)[0, : len(ids)], want)
    agree, total = 0, 0
    for ids, length in zip(sequences, PROMPT_LENGTHS):
        prompt = ids[:length]
        run = _generator(og, model, adapters, prompt, len(prompt) + NEW_TOKENS)
        while not run.is_done():
            run.generate_next_token()
        tokens = [int(t) for t in run.get_sequence(0)[len(prompt) :]]
        expected = _greedy(reference, prompt, NEW_TOKENS)
        agree += sum(a == b for a, b in zip(tokens, expected))
        total += len(expected)
    del run, adapters, model  # frees the graph's weights before the caller renames the directory
    return {**score.figures(scored_on), "greedy_agreement": agree / total}


def _generator(og, model, adapters, ids: list[int], length: int):
    """An onnxruntime-genai generator that has read ``ids`` and runs greedily to ``length`` tokens (the end
    token held back until then, as ``_greedy`` does), with the adapter active when ``adapters`` is given."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    if adapters is not None:
        generator.set_active_adapter(adapters, "adapter")
    generator.append_tokens(ids)
    return generator


def judge(figures: dict, dtype: str, tolerance: float | None = None) -> dict:
    """The manifest's ``parity``: ``figures`` with the dtype's bounds (``OPTIMIZED_TOLERANCE``; ``tolerance``
    replaces the default, and for int4 the top-1 floor with it); a UserError, nothing written, when a
    figure is out of bounds."""
    bound = OPTIMIZED_TOLERANCE[dtype] if tolerance is None else tolerance
    if dtype != "int4":
        parity = {"checked": True, **figures, "tolerance": bound, "bounds": {"max_relative_error": bound}}
        if figures["max_relative_error"] > bound:
            raise UserError(
                f"onnxruntime-genai differs from torch by {figures['max_relative_error']:.3g} (relative) on the "
                f"built graph, over the tolerance {bound}; nothing written"
            )
        return parity
    bounds = {"perplexity_increase": bound}
    if tolerance is None:
        bounds["top1_agreement"] = INT4_MIN_TOP1
    parity = {"checked": True, **figures, "tolerance": bound, "bounds": bounds}
    increase, top1 = figures["perplexity_increase"], figures["top1_agreement"]
    if increase > bound or top1 < bounds.get("top1_agreement", 0.0):
        floor = f" (at least {bounds['top1_agreement']:.0%})" if "top1_agreement" in bounds else ""
        where = "the check text" if figures["scored_on"] == "text" else figures["scored_on"]
        raise UserError(
            f"the int4 graph's perplexity on {where} is {figures['perplexity']:.3g}, "
            f"torch's {figures['reference_perplexity']:.3g} (+{increase:.0%}, at most +{bound:.0%}), and its "
            f"next token is torch's at {top1:.0%} of positions{floor}; nothing written "
            "(--int4-head, --int4-sensitive, --int4-block-size or --tolerance change that)"
        )
    return parity


def _greedy(model: torch.nn.Module, ids: list[int], new: int) -> list[int]:
    """Plain argmax decoding in torch, no logits processors (``generate`` applies the generation
    config's, which onnxruntime-genai's search options do not mirror); EOS is suppressed as
    onnxruntime-genai's ``min_length`` does."""
    eos = set(eos_token_ids(model))
    sequence, out = list(ids), []
    for _ in range(new):
        logits = model(torch.tensor([sequence])).logits[0, -1]
        if eos:
            logits[list(eos)] = -float("inf")
        token = int(logits.argmax())
        sequence.append(token)
        out.append(token)
    return out
