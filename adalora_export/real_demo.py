"""The real demo (``adalora-export demo --real``): a pretrained instruct LLM learns a real task, then ships.

SmolLM2-135M-Instruct (``pretrained.smollm2_dir``) is fine-tuned with AdaLoRA to answer "which Debian
section is this package in?" from the machine's own package descriptions (``debian``), then merged,
built as an int4 graph by onnxruntime-genai's builder (checked against torch on real text), and served
through ``OnnxServer``. A held-out question is answered, streamed, by the base before and by the int4
graph after; the held-out set's figures (exact match, answer NLL) compare base, fine-tuned and served.
About ten minutes on a 2-core CPU; the toy demo (``demo.py``) stays the default.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .converters.merge import merge_into_base
from .converters.onnx import export_optimized
from .debian import (
    CHAT_SECTIONS,
    match_rates,
    package_index,
    read_packages,
    score_answers,
    section_chats,
    split_by_section,
)
from .hf import load_base, load_tokenizer
from .pretrained import smollm2_dir
from .serving import OnnxServer
from .sources import load_adapter
from .training import train

SPLIT = {"train": 60, "valid": 4, "test": 8}  # per section: 480 / 32 / 64 records
STEPS, BATCH, LR = 60, 8, 5e-3


def real_demo_data(packages: str | None = None) -> dict[str, list]:
    """The demo's train / valid / test packages from a Packages file (default: apt's lists); a UserError,
    before anything is written, when there are too few."""
    return split_by_section(read_packages(package_index(packages)), CHAT_SECTIONS, SPLIT)


def run_real_demo(root: Path, splits: dict[str, list], steps: int | None = None) -> dict:
    """The whole real path under ``root`` (an empty directory) on ``real_demo_data``'s splits; returns the
    figures it prints."""
    started = time.time()
    base = smollm2_dir()
    (root / "data").mkdir()
    files = {name: root / "data" / f"{name}.jsonl" for name in splits}
    for name, rows in splits.items():
        files[name].write_text("".join(json.dumps(r) + "\n" for r in section_chats(rows)), encoding="utf-8")
    test = section_chats(splits["test"])
    # The question shown before and after: the first held-out game (a section any reader can check).
    question = next(r for r in test if r["messages"][-1]["content"] == "games")["messages"][:-1]
    print(f"demo in {root}: {base.name} learns the Debian section of a package from its description")
    sizes = ", ".join(f"{len(rows)} {name}" for name, rows in splits.items())
    print(f"data: {sizes} records in {files['train'].parent}")
    shown = question[0]["content"].replace("\n", "\n  ")
    print(f"\na held-out question (expected answer: games):\n  {shown}")

    tokenizer, model = load_tokenizer(base), load_base(base)
    print("base model, before (torch):")
    _stream_torch(model, tokenizer, question)
    figures = {"base": _scores(model, tokenizer, test)}

    total = steps or STEPS
    result = train(
        root / "run", model=base, data=files["train"], validation=files["valid"], max_steps=total,
        batch_size=BATCH, max_length=128, lr=LR, save_steps=0, eval_steps=max(1, total // 3),
        adalora_init_r=8, adalora_target_r=4,
    )  # fmt: skip
    adapter = load_adapter(root / "run" / "adapter")
    figures["fine-tuned"] = _scores(adapter.apply_to(model), tokenizer, test)

    merge_into_base(adapter, base, root / "merged")  # the merged HF directory, for any runtime
    manifest = export_optimized(adapter, base, root / "int4", dtype="int4")
    server = OnnxServer(root / "int4")
    print("\nfine-tuned int4 graph, after (onnxruntime-genai through OnnxServer):")
    answer = server.chat(question, max_new_tokens=16, on_text=lambda _, piece: print(piece, end="", flush=True))
    print()
    answers = server.chat([r["messages"][:-1] for r in test], max_new_tokens=12)
    figures["int4 graph"] = match_rates(answers, [r["messages"][-1]["content"] for r in test])
    summary = {
        "figures": figures,
        "answer_after": answer,
        "train_seconds": result.wall_time,
        "eval_loss": [result.eval_start.get("eval_loss"), result.eval_end.get("eval_loss")],
        "adapter_parameters": adapter.num_parameters(),
        "int4_check": {k: manifest["parity"].get(k) for k in ("perplexity_increase", "top1_agreement")},
        "wall_seconds": time.time() - started,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, len(test))
    return summary


def _stream_torch(model, tokenizer, messages: list[dict]) -> None:
    from transformers import TextStreamer

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    print("  ", end="", flush=True)
    model.generate(
        **ids,
        max_new_tokens=16,
        do_sample=False,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
    )


def _scores(model, tokenizer, records: list[dict]) -> dict:
    scores = score_answers(model, tokenizer, records)
    return {k: scores[k] for k in ("exact_match", "named_match", "nll")}


def _print_summary(summary: dict, tests: int) -> None:
    print(f"\nheld-out set ({tests} packages)  exact match  section named  answer NLL")
    for name, row in summary["figures"].items():
        nll = f"{row['nll']:.3f}" if "nll" in row else "-"
        print(f"  {name:26s} {row['exact_match']:11.1%} {row['named_match']:14.1%} {nll:>11s}")
    check = summary["int4_check"]
    print(
        f"int4 graph on real text against torch fp32: perplexity +{check['perplexity_increase']:.1%}, "
        f"top-1 agreement {check['top1_agreement']:.1%}"
    )
    print(f"adapter: {summary['adapter_parameters']:,} parameters; trained in {summary['train_seconds']:.0f}s")
    print(f"demo done in {summary['wall_seconds']:.0f}s", file=sys.stdout)
