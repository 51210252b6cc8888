"""Cost of `export --merge` against the I/O floor (`cp -r`) and PEFT's route, side by side.

A synthetic Llama-style base (748M parameters: about 3 GB in fp32 in 1 GB shards, and its bf16
copy in 500 MB shards) with an AdaLoRA adapter on every linear layer of every block (ranks 0..12)
is generated once under bench/_data/. Each route then runs in its own subprocess, after the same
page-cache warm-up (every base file read once), and we record its wall time and peak RSS
(``os.wait4``'s ru_maxrss of that process):

- cp -r              copy of the base directory: the I/O floor;
- cp -r + fsync      the same, then fsync of every copied file: the durability our merge gives
                     (its atomic output is fsynced before the rename);
- ours               `adalora-export export ADAPTER --base BASE --merge --output OUT` (--workers 1, 2);
- PEFT               from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained.

Each route runs ``--repeat`` times in turn (PEFT's once); the table shows the fastest wall time and
the largest peak RSS. Wall times include each process's start-up (Python, torch imports); "merge
alone" is our merge's own time as it reports it (reading the headers to the last fsync).
Goals (issue 5): ours at most the largest shard + 25% in RSS and 1.5x cp in wall time.

    .venv/bin/python bench/bench_merge.py            # full: ~3 GB fp32 + 1.5 GB bf16 (needs ~20 GB disk)
    .venv/bin/python bench/bench_merge.py --quick    # ~300 MB fp32 base, a minute
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "_data"
SIZES = {  # hidden, intermediate, layers, vocab, fp32 shard size, bf16 shard size
    "full": (2048, 5632, 12, 32000, "1GB", "500MB"),
    "quick": (1024, 2816, 4, 16000, "100MB", "50MB"),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_ROUTE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out, shard = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size=shard)
"""

# Runs a command and writes its peak RSS to a file. A small parent matters: a child's ru_maxrss
# starts from its parent's RSS at fork time (Linux carries it across exec).
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""

FSYNC_TREE = """
import os, sys
for d, _, files in os.walk(sys.argv[1]):
    for f in files:
        fd = os.open(os.path.join(d, f), os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


def generate(size: str) -> Path:
    """Write the bases and the adapter once; later runs reuse them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from adalora_export import AdaLoraConfig, CompactAdapter, ModuleAdapter
    from adalora_export.formats.peft import save_adapter

    hidden, inter, layers, vocab, shard32, shard16 = SIZES[size]
    root = DATA / f"merge-{size}"
    if (root / "done.json").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print(f"generating the {size} bases under {root} (once)", flush=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "base-fp32", max_shard_size=shard32)
    model.to(torch.bfloat16).save_pretrained(root / "base-bf16", max_shard_size=shard16)
    g = torch.Generator().manual_seed(1)
    adapter_config = AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, target_modules=TARGETS, total_step=1000)
    modules = {}
    for path, module in model.named_modules():
        if path.rpartition(".")[2] in TARGETS:
            out_f, in_f = module.weight.shape
            r = int(torch.randint(0, 13, (1,), generator=g))
            modules[path] = ModuleAdapter(
                torch.randn(r, in_f, generator=g) * 0.02,
                torch.randn(r, 1, generator=g),
                torch.randn(out_f, r, generator=g) * 0.02,
            )
    adapter = CompactAdapter(
        adapter_config, modules, base_model_name_or_path=str(root / "base-fp32"), task_type="causal_lm"
    )
    save_adapter(adapter, root / "adapter")
    (root / "done.json").write_text(json.dumps({"parameters": params, "modules": len(modules)}))
    return root


def dir_bytes(path: Path) -> tuple[int, int, int]:
    """(total bytes of weight files, the largest one, how many)."""
    sizes = [f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors"]
    return sum(sizes), max(sizes), len(sizes)


def warm(path: Path) -> None:
    """Read every file of ``path`` once so each route starts from the same warm page cache."""
    for f in path.iterdir():
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def measure(cmd: list[str], after: list[str] | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of ``cmd`` (and ``after``, run right after it), each in a subprocess."""
    start = time.perf_counter()
    peak, out = 0, ""
    rss_file = DATA / "rss.txt"
    for c in [cmd] + ([after] if after else []):
        launch = [sys.executable, "-S", "-c", LAUNCHER, str(rss_file), *c]
        proc = subprocess.run(launch, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(c)} failed: {proc.stderr[-2000:]}")
        peak, out = max(peak, int(rss_file.read_text())), out + proc.stdout
    return time.perf_counter() - start, peak, out


def run_dtype(root: Path, dtype: str, repeat: int, skip_peft: bool) -> list[tuple[str, float, int, float | None]]:
    base, adapter = root / f"base-{dtype}", root / "adapter"
    out = root / "out"
    shard = SIZES[root.name.split("-", 1)[1]][4 if dtype == "fp32" else 5]
    routes = {
        "cp -r": ([["cp", "-r", str(base), str(out)]], None),
        "cp -r + fsync": ([["cp", "-r", str(base), str(out)]], [sys.executable, "-c", FSYNC_TREE, str(out)]),
    }
    for workers in (1, 2):
        merge = [
            "export",
            str(adapter),
            "--base",
            str(base),
            "--merge",
            "--output",
            str(out),
            "--workers",
            str(workers),
        ]
        routes[f"ours (--workers {workers})"] = ([[sys.executable, "cli.py", *merge]], None)
    if not skip_peft:
        routes["PEFT merge_and_unload"] = (
            [[sys.executable, "-c", PEFT_ROUTE, str(base), str(adapter), str(out), shard]],
            None,
        )
    results: dict[str, list[tuple[float, int, str]]] = {name: [] for name in routes}
    for _ in range(repeat):
        for name, (cmds, after) in routes.items():
            if name.startswith("PEFT") and results[name]:
                continue  # once is enough: it is far from the others
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            warm(base)
            results[name].append(measure(cmds[0], after))
    shutil.rmtree(out, ignore_errors=True)
    rows = []
    for name, runs in results.items():
        merged = [float(m.group(1)) for _, _, o in runs if (m := re.search(r" in ([0-9.]+) s", o))]
        rows.append((name, min(w for w, _, _ in runs), max(r for _, r, _ in runs), min(merged) if merged else None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~300 MB base instead of ~3 GB")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each route (fastest wall time is shown)")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's route (the slow one)")
    args = parser.parse_args()
    root = generate("quick" if args.quick else "full")
    info = json.loads((root / "done.json").read_text())
    print(f"\nLlama-style base, {info['parameters'] / 1e6:.0f}M parameters, adapter on {info['modules']} linear layers")
    print(
        f"machine: {os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB\n"
    )
    print("| dtype | route | wall s | x cp -r | merge alone s | peak RSS GiB | x largest shard | x model |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for dtype in ("fp32", "bf16"):
        total, largest, shards = dir_bytes(root / f"base-{dtype}")
        rows = run_dtype(root, dtype, args.repeat, args.no_peft)
        floor = rows[0][1]
        label = f"{dtype} ({total / 2**30:.2f} GiB, {shards} shards)"
        for name, wall, rss, alone in rows:
            alone = f"{alone:.2f}" if alone is not None else ""
            ratios = f"{rss / 2**30:.2f} | {rss / largest:.2f} | {rss / total:.2f}"
            print(f"| {label} | {name} | {wall:.2f} | {wall / floor:.2f} | {alone} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
