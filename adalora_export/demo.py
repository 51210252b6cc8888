"""The built-in demo: the whole path on a toy model and data set built in-process (no downloads).

1. write a small Llama (random weights) with a word-level tokenizer (``toy``), and a learnable data set
   of arithmetic progressions ("7 10 13 16 ...": the model must infer the stride), as files;
2. train it with AdaLoRA through ``adalora_export.training.train`` (the code path of ``train``);
3. the run writes the compact adapter (pruned: every layer at its own rank);
4. merge it into the base weights (verified), export the merged model to ONNX with a KV cache, and
   generate with onnxruntime, printing the parity figures of each step.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .adapter import CompactAdapter
from .converters.merge import merge_into_base, verify_merge
from .converters.onnx import OnnxKind, export_onnx
from .errors import UserError
from .io import check_output_path
from .serving import OnnxServer
from .sources import load_adapter
from .toy import write_toy_model
from .training import TrainResult, train

VOCAB_NUMBERS = 100


def progressions(n: int, seed: int, length: tuple[int, int] = (8, 14), max_stride: int = 3) -> list[str]:
    """Arithmetic progressions below VOCAB_NUMBERS, as text: "7 10 13 16 19 22 25 28"."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n:
        stride = int(torch.randint(1, max_stride + 1, (1,), generator=g))
        size = int(torch.randint(length[0], length[1] + 1, (1,), generator=g))
        top = VOCAB_NUMBERS - stride * (size - 1)
        if top <= 0:
            continue
        start = int(torch.randint(0, top, (1,), generator=g))
        out.append(" ".join(str(start + stride * i) for i in range(size)))
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run_demo(
    output: str | None = None,
    steps: int | None = None,
    overwrite: bool = False,
    real: bool = False,
    packages: str | None = None,
) -> dict:
    """Run the whole path and print a summary; returns the figures. ``real``: the real demo instead
    (``real_demo``: SmolLM2 on Debian's package descriptions, from ``packages`` or apt's lists)."""
    if real:
        from .real_demo import real_demo_data, run_real_demo

        inputs = {"--packages": packages}
        if output is not None:
            check_output_path(output, overwrite, inputs=inputs)  # before the data is read
        splits = real_demo_data(packages)  # read and split before anything is written
        return run_real_demo(_demo_root(output, overwrite, inputs), splits, steps)
    root = _demo_root(output, overwrite)
    # The toy model's matrices are far too small to gain from several threads, and on a busy machine
    # the threads' waiting costs several times the work (measured: 40 s with one thread, 310 s with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(root, steps)
    finally:
        torch.set_num_threads(threads)


# What a demo leaves in its --output (all, or some): the toy demo's, then the real demo's.
DEMO_ENTRIES = ("base", "data", "merged", "onnx", "run", "int4", "summary.json")


def _demo_root(output: str | None, overwrite: bool, inputs: dict | None = None) -> Path:
    if output is None:
        return Path(tempfile.mkdtemp(prefix="adalora-demo-"))
    check_output_path(output, overwrite, inputs=inputs or {})  # the toy demo reads nothing of the user's
    root = Path(output)
    if root.exists():
        # --overwrite replaces an earlier demo only: anything else is the user's, and rmtree is not undoable.
        if not root.is_dir() or not {p.name for p in root.iterdir()} <= set(DEMO_ENTRIES):
            raise UserError(
                f"{root} is not an earlier demo's output ({', '.join(DEMO_ENTRIES)}); choose another --output"
            )
        shutil.rmtree(root)
    root.mkdir(parents=True)
    return root


def _run_demo(root: Path, steps: int | None) -> dict:
    started = time.time()
    base, result = _train_demo(root, steps)
    adapter_dir = root / "run" / "adapter"
    adapter = load_adapter(adapter_dir)
    summary = {
        "loss_start": result.loss_start,
        "loss_end": result.loss_end,
        "eval_loss_start": result.eval_start.get("eval_loss"),
        "eval_loss_end": result.eval_end.get("eval_loss"),
        "train_seconds": result.wall_time,
        "ranks": result.ranks,
        "adapter_parameters": adapter.num_parameters(),
        "files": [str(p) for p in result.files],
    }
    print(
        f"\ntrained {result.total_step} steps in {result.wall_time:.1f}s: loss {result.loss_start:.3f} -> "
        f"{result.loss_end:.3f}, eval loss {summary['eval_loss_start']:.3f} -> {summary['eval_loss_end']:.3f}"
    )
    print(
        f"pruned adapter {adapter_dir}: {adapter.num_parameters():,} parameters, "
        f"{sum(result.ranks.values())} triplets (budget {result.budget:,} {result.budget_unit}); ranks per layer:"
    )
    for path, rank in result.ranks.items():
        print(f"  {path:40s} {rank:2d} {'#' * rank}")
    summary.update(_ship_demo(root, base, adapter))
    summary["files"] += [str(root / "merged"), str(root / "onnx")]
    summary["wall_seconds"] = time.time() - started
    _print_summary(summary, result.ranks)
    return summary


def _train_demo(root: Path, steps: int | None) -> tuple[Path, TrainResult]:
    """The toy base and its data under ``root``, then the training run ``root/run``: (base, TrainResult)."""
    base = write_toy_model(root / "base", [str(i) for i in range(VOCAB_NUMBERS)], hidden=256, layers=2)
    (root / "data").mkdir()
    train_file = write_jsonl(root / "data" / "train.jsonl", [{"text": t} for t in progressions(4096, seed=1)])
    valid_file = write_jsonl(root / "data" / "valid.jsonl", [{"text": t} for t in progressions(128, seed=2)])
    print(f"demo in {root}: a random-weight Llama (hidden 256, 2 layers) learns arithmetic progressions")

    total = steps or 500
    result = train(
        root / "run",
        model=base,
        data=train_file,
        validation=valid_file,
        max_steps=total,
        batch_size=16,
        lr=2e-2,
        warmup_ratio=0.05,
        max_length=32,
        save_steps=max(1, total // 2),
        eval_steps=max(1, total // 5),
        lora_alpha=32,
        adalora_init_r=8,
        adalora_target_r=4,
        adalora_tinit=total // 10,
        adalora_tfinal=total // 5,
        adalora_deltaT=5,
    )
    return base, result


def _ship_demo(root: Path, base: Path, adapter: CompactAdapter) -> dict:
    """Merge the adapter, export the merged ONNX graph with a KV cache and generate from it."""
    merge_into_base(adapter, base, root / "merged")
    figures = {"merge_max_abs_diff": verify_merge(adapter, base, root / "merged")}
    manifest = export_onnx(adapter, base, root / "onnx", kind=OnnxKind.MERGED, with_past=True)
    figures["onnx_max_relative_error"] = manifest["parity"]["max_relative_error"]
    prompt = "12 15 18"
    text = OnnxServer(root / "onnx", provider="cpu").generate(prompt, max_new_tokens=6)
    figures["generation"] = {"prompt": prompt, "output": text, "expected": "21 24 27 30 33 36"}
    return figures


def _print_summary(summary: dict, ranks: dict[str, int]) -> None:
    print("\nsummary")
    print(f"  loss {summary['loss_start']:.3f} -> {summary['loss_end']:.3f} in {summary['train_seconds']:.1f}s")
    print(f"  ranks: {' '.join(str(r) for r in ranks.values())} (init_r 8, target average 4)")
    print(f"  merged vs base+adapter: max |logit diff| {summary['merge_max_abs_diff']:.2e}")
    print(f"  ONNX vs torch: max relative error {summary['onnx_max_relative_error']:.2e}")
    g = summary["generation"]
    print(f"  onnxruntime greedy: {g['prompt']!r} -> {g['output']!r} (a perfect model: {g['expected']!r})")
    print("  files: " + ", ".join(summary["files"]))
    print(f"demo done in {summary['wall_seconds']:.1f}s")
