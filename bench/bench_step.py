"""Cost of AdaLoRA's allocator: one training step of our AdaLoRA vs plain LoRA at init_r (and PEFT's AdaLoRA).

Llama-style model, hidden 512, 4 layers, all 7 projections adapted, init_r 12, target_r 8. The three
methods step in turn (ours, LoRA, PEFT AdaLoRA, ours, ...) so they share the machine's load; we report
the median step per phase of our schedule (warm-up, budget phase with masking every step, final
phase after the physical shrink) and the ratio of the mean over the whole schedule.

    .venv/bin/python bench/bench_step.py            # 40 steps per phase
    .venv/bin/python bench/bench_step.py --steps 30 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adalora_export import AdaLoraConfig, RankAllocator, inject_adapters, orthogonal_regularizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    return LlamaForCausalLM(config)


def make_ours(total: int, tinit: int, tfinal: int):
    model = base_model()
    config = AdaLoraConfig(init_r=12, target_r=8, tinit=tinit, tfinal=tfinal, deltaT=1, target_modules=TARGETS)
    inject_adapters(model, config)
    allocator = RankAllocator(model, config, total_step=total)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(t: int, ids: torch.Tensor) -> None:
        loss = model(input_ids=ids, labels=ids).loss + config.orth_reg_weight * orthogonal_regularizer(model)
        loss.backward()
        opt.step()
        allocator.update_and_allocate(t, opt)
        opt.zero_grad(set_to_none=True)

    return step


def make_peft(total: int, tinit: int, tfinal: int, adalora: bool):
    import peft

    if adalora:
        cfg = peft.AdaLoraConfig(
            init_r=12, target_r=8, tinit=tinit, tfinal=tfinal, deltaT=1, total_step=total,
            target_modules=TARGETS, task_type="CAUSAL_LM",
        )  # fmt: skip
    else:
        cfg = peft.LoraConfig(r=12, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base_model(), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(t: int, ids: torch.Tensor) -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if adalora:
            model.base_model.update_and_allocate(t)
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per phase (>= 30 for the issue's figure)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.steps
    total, tinit, tfinal = 3 * n, n, n
    methods = {
        "ours AdaLoRA": make_ours(total, tinit, tfinal),
        "LoRA r=12 (PEFT)": make_peft(total, tinit, tfinal, adalora=False),
        "PEFT AdaLoRA": make_peft(total, tinit, tfinal, adalora=True),
    }
    g = torch.Generator().manual_seed(0)
    times = {name: [] for name in methods}
    for name, step in methods.items():  # one warm-up step each, outside the schedule's clock
        step(0 if "AdaLoRA" not in name else 0, torch.randint(0, 2000, (args.batch, args.seq), generator=g))
    for t in range(1, total + 1):
        ids = torch.randint(0, 2000, (args.batch, args.seq), generator=g)
        for name, step in methods.items():
            start = time.perf_counter()
            step(t, ids)
            times[name].append(time.perf_counter() - start)
    phases = {"warm-up": slice(0, n), "budget": slice(n, 2 * n), "final": slice(2 * n, 3 * n)}
    lora = times["LoRA r=12 (PEFT)"]
    print(f"threads={args.threads} batch={args.batch}x{args.seq} steps/phase={n}")
    print("| method | " + " | ".join(f"{p} median ms" for p in phases) + " | whole-schedule mean ms | / LoRA |")
    print("|---|" + "---|" * (len(phases) + 2))
    for name, ts in times.items():
        medians = [statistics.median(ts[s]) * 1e3 for s in phases.values()]
        mean = statistics.fmean(ts) * 1e3
        ratio = statistics.fmean(ts) / statistics.fmean(lora)
        print(f"| {name} | " + " | ".join(f"{m:.1f}" for m in medians) + f" | {mean:.1f} | {ratio:.3f} |")
    ours, peft_ada = times["ours AdaLoRA"], times["PEFT AdaLoRA"]
    print(f"ours / PEFT AdaLoRA (whole schedule): {statistics.fmean(ours) / statistics.fmean(peft_ada):.3f}")
    for pname, s in phases.items():
        r = statistics.median(ours[s]) / statistics.median(lora[s])
        print(f"ours / LoRA median, {pname}: {r:.3f}")


if __name__ == "__main__":
    main()
