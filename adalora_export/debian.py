"""Debian's package descriptions as real fine-tuning data: the real demo's task and the real benchmarks'.

``apt-cache dumpavail`` prints every package the machine's apt lists know (after ``apt-get update``):
a name, a section (``games``, ``contrib/math``...) and a description written by a person. Two tasks
are built from it, both with fixed, stratified splits (seeded) so every method sees the same data:

- ``section_texts``: description -> section, for sequence classification (the MiniLM benchmarks);
- ``section_chats``: a chat question "which section is this package in?" answered with the section's
  name, for instruct LLMs (the real demo, the SmolLM2 benchmark). Exact match and the held-out
  per-token NLL of the answer are the figures (``score_answers``).

Nothing here downloads anything: the text is the machine's own apt lists, or a file in that format.
"""

from __future__ import annotations

import collections
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .serving.tokenizer import end_of_turn_ids

# Sections whose packages a reader can tell apart from the description alone (no python3-*/lib* names).
CHAT_SECTIONS = ("editors", "fonts", "games", "graphics", "mail", "math", "science", "sound")


@dataclass(frozen=True)
class Package:
    name: str
    section: str  # the last part: "contrib/math" -> "math"
    summary: str  # the description's first line
    description: str  # the whole description, one line, whitespace collapsed


def package_index(path: str | Path | None = None) -> str:
    """The text of a Packages-format file, or ``apt-cache dumpavail``'s output when ``path`` is None."""
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise UserError(f"cannot read the package index {path}: {exc.strerror}") from None
    try:
        text = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    if "Package:" not in text:
        raise UserError("apt-cache dumpavail printed no packages: run `apt-get update` first, or pass a Packages file")
    return text


def read_packages(text: str) -> list[Package]:
    """Every stanza with a package name, a section and a description, in file order."""
    packages = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith((" ", "\t")) and key == "Description":
                fields[key] += " " + line.strip().removeprefix(".")
            elif ":" in line and not line.startswith((" ", "\t")):
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Package") and fields.get("Section") and fields.get("Description"):
            summary = _first_line(stanza)
            description = " ".join(fields["Description"].split())
            packages.append(Package(fields["Package"], fields["Section"].split("/")[-1], summary, description))
    return packages


def _first_line(stanza: str) -> str:
    for line in stanza.splitlines():
        if line.startswith("Description:"):
            return line.partition(":")[2].strip()
    return ""


def split_by_section(
    packages: list[Package], sections: tuple[str, ...] | list[str], sizes: dict[str, int], seed: int = 0
) -> dict[str, list[Package]]:
    """Per section, ``sizes[split]`` packages for each split, disjoint, de-duplicated by description
    (Debian ships many near-copies: -dev, -data, -doc packages), each split shuffled.

    Raises UserError when a section has too few packages (older or partial apt lists).
    """
    by_section: dict[str, list[Package]] = collections.defaultdict(list)
    seen = set()
    for package in sorted(packages, key=lambda p: p.name):
        if package.section in sections and len(package.description) > 40 and package.description not in seen:
            seen.add(package.description)
            by_section[package.section].append(package)
    need = sum(sizes.values())
    short = [s for s in sections if len(by_section[s]) < need]
    if short:
        raise UserError(f"too few package descriptions in section(s) {', '.join(short)} (need {need} each)")
    rng = random.Random(seed)
    splits: dict[str, list[Package]] = {name: [] for name in sizes}
    for section in sections:
        chosen = rng.sample(by_section[section], need)
        start = 0
        for name, n in sizes.items():
            splits[name] += chosen[start : start + n]
            start += n
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def section_texts(packages: list[Package]) -> list[dict]:
    """Classification records: ``{"text": description (500 characters at most), "label": section}``."""
    return [{"text": p.description[:500], "label": p.section} for p in packages]


def section_question(package: Package, sections: tuple[str, ...] | list[str] = CHAT_SECTIONS) -> str:
    """The user's question about one package: its name, its description cut to 40 words, the choices."""
    words = package.description.split()
    description = " ".join(words[:40]) + (" ..." if len(words) > 40 else "")
    choices = ", ".join(sorted(sections)[:-1]) + " or " + sorted(sections)[-1]
    return (
        f"Debian package: {package.name}\nDescription: {description}\n"
        f"Which Debian section is it in? Answer with one word: {choices}."
    )


def section_chats(packages: list[Package], sections: tuple[str, ...] | list[str] = CHAT_SECTIONS) -> list[dict]:
    """Chat records (``train``'s ``messages`` format): the question, and the section as the answer."""
    return [
        {
            "messages": [
                {"role": "user", "content": section_question(p, sections)},
                {"role": "assistant", "content": p.section},
            ]
        }
        for p in packages
    ]


def answer_matches(answer: str, expected: str) -> bool:
    """Exact match, forgiving case, surrounding space and a final full stop ("Games." == "games")."""
    return answer.strip().rstrip(".").strip().lower() == expected.strip().lower()


def first_named(answer: str, choices: tuple[str, ...] | list[str] = CHAT_SECTIONS) -> str | None:
    """The first of ``choices`` the answer names as a word ("It belongs in games." -> "games"): a fairer
    reading of a chatty model's answer than exact match."""
    words = re.findall(r"[a-z0-9]+", answer.lower())
    return next((w for w in words if w in choices), None)


def score_answers(model, tokenizer, records: list[dict], max_new_tokens: int = 12, batch_size: int = 16) -> dict:
    """A causal LM's figures on chat records whose last message is the expected answer, in torch:

    - ``exact_match``: the share of greedy answers (after the chat template's generation prompt) that
      match (``answer_matches``); ``named_match``: the share whose first section named is right
      (``first_named``);
    - ``nll``: the mean per-token negative log-likelihood of the expected answer and its end-of-turn
      token, given the question (what training lowers; a continuous figure with a small spread).

    Returns also the answers themselves, for a reader to look at.
    """
    import torch

    model.eval()
    prompts, targets = [], []
    for record in records:
        *question, answer = record["messages"]
        prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template([*question, answer], tokenize=False)
        prompts.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = tokenizer(full.rstrip("\n"), add_special_tokens=False)["input_ids"]
        targets.append(ids[len(prompts[-1]) :])
    nll_sum, nll_count, answers = 0.0, 0, []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    end_ids = _end_ids(tokenizer)
    with torch.no_grad():
        for i in range(0, len(records), batch_size):
            rows = [p + t for p, t in zip(prompts[i : i + batch_size], targets[i : i + batch_size])]
            ids, mask = _left_pad(rows, pad)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            for r, t in enumerate(targets[i : i + batch_size]):
                positions = range(ids.shape[1] - len(t) - 1, ids.shape[1] - 1)
                nll_sum -= sum(float(logp[r, pos, tok]) for pos, tok in zip(positions, t))
                nll_count += len(t)
            ids, mask = _left_pad(prompts[i : i + batch_size], pad)
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=sorted(end_ids), pad_token_id=pad,
            )  # fmt: skip
            for row in out[:, ids.shape[1] :].tolist():
                answers.append(tokenizer.decode([t for t in row if t not in end_ids and t != pad]))
    expected = [r["messages"][-1]["content"] for r in records]
    return {**match_rates(answers, expected), "nll": nll_sum / nll_count, "answers": answers}


def match_rates(answers: list[str], expected: list[str]) -> dict[str, float]:
    """``exact_match`` and ``named_match`` (see ``score_answers``) of answers against the expected ones."""
    return {
        "exact_match": sum(map(answer_matches, answers, expected)) / len(answers),
        "named_match": sum(first_named(a) == e for a, e in zip(answers, expected)) / len(answers),
    }


def _end_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return ids | end_of_turn_ids(tokenizer)


def _left_pad(rows: list[list[int]], pad: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask
