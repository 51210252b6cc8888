"""A real LLM task: SmolLM2-135M-Instruct fine-tuned to name a Debian package's section, AdaLoRA vs LoRA.

    python bench/bench_llm_task.py                       # 5 seeds: base, ours, LoRA r=4, PEFT AdaLoRA (~65 min)
    python bench/bench_llm_task.py --seeds 1 --graphs    # one seed, plus ours served as fp32 and int4 graphs
    python bench/bench_llm_task.py --quick               # 1 seed, 6 steps, 16 test records: a smoke run

Data (``adalora_export.debian``): the machine's apt lists (``apt-cache dumpavail``; ``apt-get update``
first), 8 sections, per section 60 training, 8 validation and 16 test packages (a fixed split, seed 0), each a chat
question ("which section is it in? answer with one word: ...") answered by the section's name. Every
method trains on the same records in the same order (the product's batching), ``--steps`` steps of 8,
sequences of at most 128 tokens, AdamW, 6% linear warm-up then decay, clipping at 1.0, on all seven
projections of the 30 layers (210 matrices). Methods:

- ``base``: the instruct model zero-shot (the question lists the choices);
- ``ours``: ``adalora_export.training.train`` at its defaults (preset ``recommended``, budget in
  parameters), init_r 8 -> target_r 4: the final adapter is LoRA r=4's size (1,221,120 parameters);
- ``peft-lora-rN``: PEFT LoRA, lora_alpha = 2r; r=4 is the same final size as ours;
- ``ours-lora-rN``: ``train`` with ``--train_type lora`` at rank N, lora_alpha = 2r (PEFT LoRA's scale);
- ``peft-adalora``: PEFT's AdaLoRA, init_r 8 -> target_r 4, tinit 10%, tfinal 30%, deltaT 1.

Figures on the held-out set: per-token NLL of the answer and its end-of-turn token (what training
lowers; a continuous figure with a small spread), exact match and "section named" (the first section
the answer names; a fairer reading of a chatty base) of the greedy answer. Every method's seed s uses
the same data order, so methods are compared by paired differences with 95% intervals (``stats``).
Each method's rate is the best of ``LR_GRID`` on a validation split (8 per section), seed 100, unless
``--lr METHOD=RATE`` gives it.
The plot (``docs/llm_task.png``, ``--plot``) draws every method's answer NLL per seed, one line per seed
across the methods, so a paired difference reads as the lines' slope; ``--replot OUT.json ...`` redraws it
from saved runs (their rows pooled).
``--graphs`` exports ours (first seed) through onnxruntime-genai's builder as fp32 and int4 graphs and
scores them on the same held-out set through ``OnnxServer`` (answers) and onnxruntime-genai (NLL).
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

from adalora_export.debian import (  # noqa: E402
    CHAT_SECTIONS,
    match_rates,
    package_index,
    read_packages,
    score_answers,
    section_chats,
    split_by_section,
)
from adalora_export.hf import load_base, load_tokenizer  # noqa: E402
from adalora_export.pretrained import smollm2_dir  # noqa: E402
from adalora_export.sources import load_adapter  # noqa: E402
from adalora_export.training import train  # noqa: E402
from adalora_export.training.data import load_dataset, micro_batches  # noqa: E402
from adalora_export.training.step import count_items, lr_factor, task_loss  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPLIT = {"train": 60, "valid": 8, "test": 16}
BATCH, MAX_LENGTH, INIT_R, TARGET_R, WARMUP = 8, 128, 8, 4, 0.06
# The rates tried per method family on the validation split (seed 100, lowest answer NLL wins). Answer NLL on
# validation, seed 100 (BENCHMARKS.md §6): ours 5e-3 0.324, 1e-2 0.288, 2e-2 0.266 (4e-2 loses on test);
# LoRA r=4 1e-3 0.304, 3e-3 0.234, 6e-3 0.328, 1e-2 0.304; PEFT AdaLoRA 5e-3 / 1e-2 / 2e-2 in §6.
LR_GRID = {"ours": [1e-2, 2e-2], "peft-adalora": [1e-2, 2e-2], "peft-lora": [1e-3, 3e-3, 6e-3, 1e-2]}
LR_GRID["ours-lora"] = LR_GRID["peft-lora"]
TUNING_SEED = 100


def write_data(root: Path, quick: bool) -> dict[str, Path]:
    splits = split_by_section(read_packages(package_index()), CHAT_SECTIONS, SPLIT)
    if quick:
        splits["test"] = splits["test"][:16]
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows in splits.items():
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in section_chats(rows)), encoding="utf-8")
    return files


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_ours(work: Path, files: dict, seed: int, steps: int, lr: float, lora_rank: int | None = None):
    """The product's ``train``: AdaLoRA at its defaults, or (``lora_rank``) ``--train_type lora`` at that rank."""
    run = work / f"ours-{seed}"
    shape = dict(adalora_init_r=INIT_R, adalora_target_r=TARGET_R)
    if lora_rank:
        shape = dict(train_type="lora", adalora_target_r=lora_rank, lora_alpha=2 * lora_rank)
    train(run, smollm2_dir(), files["train"], max_steps=steps, batch_size=BATCH, max_length=MAX_LENGTH, lr=lr,
          seed=seed, save_steps=0, target_modules=TARGETS, warmup_ratio=WARMUP, progress=False, overwrite=True,
          **shape)  # fmt: skip
    adapter = load_adapter(run / "adapter")
    return adapter.apply_to(load_base(smollm2_dir())), adapter.num_parameters(), adapter


def run_peft(method: str, files: dict, seed: int, steps: int, lr: float):
    """PEFT LoRA or AdaLoRA with the product's batching, loss, schedule and clipping."""
    import peft

    torch.manual_seed(seed)
    model = load_base(smollm2_dir())
    if method == "peft-adalora":
        cfg = peft.AdaLoraConfig(task_type="CAUSAL_LM", init_r=INIT_R, target_r=TARGET_R, tinit=round(0.1 * steps),
                                 tfinal=round(0.3 * steps), deltaT=1, total_step=steps, lora_alpha=8,
                                 target_modules=TARGETS)  # fmt: skip
    else:
        r = int(method.rsplit("r", 1)[1])
        cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=TARGETS)
    model = peft.get_peft_model(model, cfg)
    tokenizer = load_tokenizer(smollm2_dir())
    data = load_dataset(files["train"], tokenizer, "causal_lm", MAX_LENGTH)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    warmup = math.ceil(WARMUP * steps)
    model.train()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, warmup, steps)
        (batch,) = micro_batches(data, step, BATCH, 0, 1, BATCH, seed, tokenizer.pad_token_id)
        loss = task_loss(model, batch, "causal_lm")[0] / count_items(batch, "causal_lm")
        if method == "peft-adalora":  # PEFT adds its orthogonal term only inside its own loss
            loss = loss + model.base_model.peft_config["default"].orth_reg_weight * _peft_orth(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if method == "peft-adalora":
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model, _peft_final_params(model, method), None


def _peft_orth(model) -> torch.Tensor:
    terms = []
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and p.requires_grad and p.numel():
            m = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.norm(m - torch.eye(m.shape[0]), p="fro"))
    return torch.stack(terms).mean()


def _peft_final_params(model, method: str) -> int:
    if method != "peft-adalora":
        return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    pattern = model.peft_config["default"].rank_pattern or {}
    shapes = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_E")}
    total = 0
    for key, keep in pattern.items():
        layer = shapes[key.removesuffix(".default").removesuffix(".lora_E")].base_layer
        total += int(sum(keep)) * (layer.in_features + layer.out_features + 1)
    return total


def family(method: str) -> str:
    return method.rsplit("-r", 1)[0] if "-lora-r" in method else method


def evaluate(
    method: str, files: dict, work: Path, seed: int, steps: int, test: list[dict], lr: float
) -> tuple[dict, object]:
    started = time.time()
    if method == "ours":
        model, final, adapter = run_ours(work, files, seed, steps, lr)
    elif method.startswith("ours-lora-r"):
        model, final, adapter = run_ours(work, files, seed, steps, lr, lora_rank=int(method.rsplit("r", 1)[1]))
    else:
        model, final, adapter = run_peft(method, files, seed, steps, lr)
    seconds = time.time() - started
    scores = score_answers(model, load_tokenizer(smollm2_dir()), test)
    row = {"method": method, "seed": seed, "lr": lr, "final_params": final, "train_seconds": seconds,
           **{k: scores[k] for k in ("nll", "exact_match", "named_match")}}  # fmt: skip
    return row, adapter


def serve_graphs(adapter, work: Path, test: list[dict]) -> list[dict]:
    """Ours exported by the builder as fp32 and int4 graphs, scored on the held-out set."""
    from adalora_export.converters.onnx import export_optimized
    from adalora_export.serving import OnnxServer

    rows = []
    for dtype in ("fp32", "int4"):
        out = work / f"graph-{dtype}"
        manifest = export_optimized(adapter, smollm2_dir(), out, dtype=dtype, overwrite=True)
        server = OnnxServer(out)
        answers = server.chat([r["messages"][:-1] for r in test], max_new_tokens=12)
        rows.append({"method": f"ours, {dtype} graph", **match_rates(answers, [r["messages"][-1]["content"]
                     for r in test]), "nll": graph_nll(server, test), "check": manifest["parity"]})  # fmt: skip
    return rows


def graph_nll(server, test: list[dict]) -> float:
    """Per-token NLL of the expected answers through onnxruntime-genai (``OnnxServer.genai_model``)."""
    import onnxruntime_genai as og

    total, count = 0.0, 0
    for record in test:
        prompt = server.chat_ids(record["messages"][:-1])
        answer = server.tokenizer(record["messages"][-1]["content"] + "<|im_end|>")["input_ids"]
        ids = prompt + list(answer)
        params = og.GeneratorParams(server.genai_model)
        params.set_search_options(max_length=len(ids) + 1, do_sample=False)
        generator = og.Generator(server.genai_model, params)
        generator.append_tokens(ids)
        logits = torch.from_numpy(np.asarray(generator.get_output("logits"), dtype=np.float32)[0, : len(ids)])
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        total -= float(logp.gather(1, torch.tensor(answer)[:, None]).sum())
        count += len(answer)
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--methods", default="ours,peft-lora-r4,peft-adalora")
    parser.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="METHOD=RATE",
        help="use this rate for METHOD instead of tuning it (repeatable)",
    )
    parser.add_argument("--graphs", action="store_true", help="also serve ours (first seed) as fp32 and int4 graphs")
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 steps, 16 test records")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "_out" / "llm_task.json"))
    parser.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "llm_task.png"))
    parser.add_argument("--replot", nargs="+", metavar="OUT_JSON", help="only redraw the plot from saved --out files")
    args = parser.parse_args()
    if args.replot:
        plot(read_rows(parser, args.replot, Path(args.plot)), Path(args.plot))
        return
    methods = args.methods.split(",")
    given = parse_rates(parser, args.lr, methods)  # before any work: a typo costs no model runs
    seeds, steps = (1, 6) if args.quick else (args.seeds, args.steps)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = write_data(work / "data", args.quick)
        test = records(files["test"])
        base = score_answers(load_base(smollm2_dir()), load_tokenizer(smollm2_dir()), test)
        rows = [{"method": "base", "seed": None, "final_params": 0, "nll": base["nll"],
                 "exact_match": base["exact_match"], "named_match": base["named_match"]}]  # fmt: skip
        graphs = []
        valid = records(files["valid"])
        lrs = {m: given.get(m, LR_GRID[family(m)][0]) for m in methods}
        if not args.quick:
            for m in (m for m in methods if m not in given):
                tried = {lr: evaluate(m, files, work, TUNING_SEED, steps, valid, lr)[0] for lr in LR_GRID[family(m)]}
                lrs[m] = min(tried, key=lambda lr: tried[lr]["nll"])
                print(json.dumps({"tuned": m, **{str(k): v["nll"] for k, v in tried.items()}}), file=sys.stderr)
        for seed in range(seeds):
            for method in methods:
                row, adapter = evaluate(method, files, work, seed, steps, test, lrs[method])
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if args.graphs and method == "ours" and seed == 0:
                    graphs = serve_graphs(adapter, work, test)
                    for g in graphs:
                        print(json.dumps(g), file=sys.stderr, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "graphs": graphs}, indent=1))
    print_tables(rows, graphs, seeds, steps, len(test))
    if seeds > 1:
        plot([r for r in rows if r["method"] != "base"], Path(args.plot))


def read_rows(parser: argparse.ArgumentParser, files: list[str], plot_path: Path) -> list[dict]:
    """The trained rows of saved ``--out`` files; an unreadable file, or a plot path that is one of them, is a
    usage error (exit 2) before anything is written."""
    rows = []
    for name in files:
        if Path(name).resolve() == plot_path.resolve():
            parser.error(f"--plot {plot_path} would overwrite the --replot input {name}")
        try:
            rows += [r for r in json.loads(Path(name).read_text())["rows"] if r["method"] != "base"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--replot {name}: not a saved --out file ({type(exc).__name__}: {exc})")
    return rows


def parse_rates(parser: argparse.ArgumentParser, items: list[str], methods: list[str]) -> dict[str, float]:
    """``--lr METHOD=RATE`` items as {method: rate}; a malformed item or one naming no run method is a usage error."""
    given = {}
    for item in items:
        method, _, rate = item.partition("=")
        try:
            given[method] = float(rate)
        except ValueError:
            parser.error(f"--lr expects METHOD=RATE, got {item!r}")
        if method not in methods:
            parser.error(f"--lr names {method!r}, which is not among --methods ({', '.join(methods)})")
    return given


def print_tables(rows: list[dict], graphs: list[dict], seeds: int, steps: int, tests: int) -> None:
    print(f"SmolLM2-135M-Instruct, Debian sections: {tests} held-out questions, {steps} steps, {seeds} seed(s)\n")
    print("| method | lr | answer NLL | exact match | section named | final adapter params | train s |")
    print("|---|---|---|---|---|---|---|")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {m: [r for r in rows if r["method"] == m] for m in methods}
    for m in methods:
        rs = by[m]
        nll, em = _spread([r["nll"] for r in rs]), _spread([r["exact_match"] for r in rs])
        named = statistics.fmean(r["named_match"] for r in rs)
        secs = f"{statistics.fmean(r['train_seconds'] for r in rs):.0f}" if m != "base" else "-"
        print(f"| {m} | {rs[0].get('lr', '-')} | {nll} | {em} | {named:.3f} | {rs[0]['final_params']:,} | {secs} |")
    for g in graphs:
        print(f"| {g['method']} | | {g['nll']:.3f} | {g['exact_match']:.3f} | {g['named_match']:.3f} | | |")
    if "ours" in by and seeds > 1:
        print("\nours minus each method, paired by seed (mean [95% interval]; * excludes 0; NLL: lower is better)\n")
        print("| against | answer NLL | exact match |")
        print("|---|---|---|")
        for m in methods:
            if m in ("ours", "base"):
                continue
            ours = {r["seed"]: r for r in by["ours"]}
            pairs = [(ours[r["seed"]], r) for r in by[m] if r["seed"] in ours]
            nll = format_difference([a["nll"] for a, _ in pairs], [b["nll"] for _, b in pairs])
            em = format_difference([a["exact_match"] for a, _ in pairs], [b["exact_match"] for _, b in pairs])
            print(f"| {m} | {nll} | {em} |")


def plot(rows: list[dict], path: Path) -> None:
    """Answer NLL per method (x) and seed (one line per seed, one marker per run): paired by seed, as the
    tables compare them. Methods keep their order of appearance."""
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    for seed in sorted({r["seed"] for r in rows}):
        points = {r["method"]: r["nll"] for r in rows if r["seed"] == seed}
        xs = [i for i, m in enumerate(methods) if m in points]
        ax.plot(xs, [points[methods[i]] for i in xs], marker="o", alpha=0.7, label=f"seed {seed}")
    for i, m in enumerate(methods):
        ax.hlines(statistics.fmean(r["nll"] for r in rows if r["method"] == m), i - 0.2, i + 0.2, color="black")
    ax.set_xticks(
        range(len(methods)), [f"{m}\nlr {next(r['lr'] for r in rows if r['method'] == m):g}" for m in methods]
    )
    ax.set_ylabel("held-out answer NLL (lower is better)")
    ax.set_title("SmolLM2-135M-Instruct, Debian sections: per seed (lines), mean (bars)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.png")  # renamed into place only when complete
    fig.savefig(partial, dpi=120)
    partial.replace(path)


def _spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} +- {sd:.3f}"


if __name__ == "__main__":
    main()
