"""FSDP against DDP on two ranks (CPU, gloo): resident base weights and peak RSS per rank, step time.

    .venv/bin/python bench/bench_fsdp.py [--size tiny|quick|full] [--steps N]

Builds a random-weight Llama from a config once (under bench/_data/fsdp-<size>; ``full`` is the
748M model of bench_merge.py), then runs ``cli.py train`` logic under ``torchrun --nproc_per_node 2``
twice, with and without ``--fsdp``, the same data and options. Each rank reports the bytes of base
weights it holds after sharding (the frozen parameters' local tensors), its peak RSS and its median
step time (steps 2..N, from metrics.jsonl); the table puts FSDP's next to DDP's with the ratios.
The issue's goal on the CPU: resident base weights per rank at most 0.6x DDP's, step time at most
1.3x. Peak RSS includes building the whole model on the CPU before it is sharded (see README).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "_data"
SIZES = {  # hidden, intermediate, layers, vocab (full: bench_merge.py's 748M model)
    "tiny": (256, 688, 4, 4000),
    "quick": (1024, 2816, 4, 16000),
    "full": (2048, 5632, 12, 32000),
}


def build_base(size: str) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = DATA / f"fsdp-{size}"
    if (root / "done.json").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    hidden, inter, layers, vocab = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(root)
    words = [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(root)
    lines = [" ".join(f"w{(i * 7 + j * 13) % len(words)}" for j in range(64)) for i in range(256)]
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (root / "done.json").write_text(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))
    return root


def worker(base: Path, out: Path, steps: int, fsdp: bool, report: Path) -> None:
    """One rank under torchrun: train, then write what it held and how long its steps took."""
    import torch

    from adalora_export.training import loop

    held = {}
    run_steps = loop.run_steps

    def measured(run, *args, **kwargs):
        frozen = [p for p in run.net.parameters() if not p.requires_grad]
        local = [p.to_local() if hasattr(p, "to_local") else p for p in frozen]
        held["base_bytes"] = sum(t.numel() * t.element_size() for t in local)
        return run_steps(run, *args, **kwargs)

    loop.run_steps = measured
    torch.set_num_threads(1)
    options = dict(max_steps=steps, batch_size=2, max_length=64, save_steps=0, adalora_init_r=12)
    options.update(adalora_target_r=8, adalora_tinit=1, adalora_tfinal=1, adalora_deltaT=1, fsdp=fsdp)
    loop.train(out, model=base, data=base / "train.jsonl", overwrite=True, progress=False, **options)
    times = (
        sorted(
            json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()[1:] if line.strip()
        )
        if int(os.environ["RANK"]) == 0
        else []
    )
    held["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held["step_seconds"] = times[len(times) // 2] if times else None
    Path(f"{report}.{os.environ['RANK']}").write_text(json.dumps(held))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker", nargs=4, metavar=("BASE", "OUT", "FSDP", "REPORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        base, out, fsdp, report = args.worker
        worker(Path(base), Path(out), args.steps, fsdp == "1", Path(report))
        return
    base = build_base(args.size)
    params = json.loads((base / "done.json").read_text())["parameters"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("ddp", "fsdp"):
            report = Path(tmp) / mode
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
            cmd += ["--steps", str(args.steps), "--worker", str(base), str(Path(tmp) / f"run-{mode}")]
            cmd += ["1" if mode == "fsdp" else "0", str(report)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
            subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
            results[mode] = [json.loads(Path(f"{report}.{r}").read_text()) for r in range(2)]
    print(f"Llama-style base '{args.size}', {params / 1e6:.0f}M parameters, 2 ranks (gloo, CPU), {args.steps} steps")
    print(f"{'per rank':<28}{'DDP':>12}{'FSDP':>12}{'FSDP/DDP':>10}")
    rows = [
        ("resident base weights (MB)", "base_bytes", 1e6, max),
        ("peak RSS (MB)", "peak_rss_bytes", 1e6, max),
        ("median step time (s)", "step_seconds", 1, lambda *v: next(x for x in v if x is not None)),
    ]
    for label, key, unit, pick in rows:
        ddp, fsdp = (pick(*(r[key] for r in results[m])) / unit for m in ("ddp", "fsdp"))
        print(f"{label:<28}{ddp:>12.3f}{fsdp:>12.3f}{fsdp / ddp:>10.2f}")
    print("goal on the CPU: resident base weights <= 0.6x DDP's, step time <= 1.3x DDP's")


if __name__ == "__main__":
    main()
