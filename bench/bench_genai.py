"""Generation speed on this machine: torch eager against our graphs and onnxruntime-genai's, side by side.

    python bench/bench_genai.py [--quick] [--threads N] [--model smollm2 [--adapter DIR]] [--rounds N]

One Llama-style model (hidden 512, 8 layers, random weights; or ``--model smollm2``, the pretrained
SmolLM2-135M-Instruct) with an AdaLoRA adapter of heterogeneous per-layer ranks (zeros included;
``--adapter`` takes a trained one), greedy decoding of ``--new`` tokens after a
``--prompt``-token prompt, at batch 1 and 8. Routes:

- torch eager, merged (the adapter merged into the weights), with transformers' KV cache;
- ours merged fp32 (``export --onnx --merge --with-past``) through ``OnnxServer``;
- ours adapter-inputs fp32 with the adapter active (``--adapter-inputs --with-past``): through
  ``OnnxServer`` and through onnxruntime-genai (``og.Adapters``);
- the builder's optimized fp32 and int4 graphs (``--onnx --merge --optimized``): through
  ``OnnxServer`` (which drives onnxruntime-genai) and through onnxruntime-genai directly;
- the builder's base with adapter inputs and the adapter active (``--onnx --optimized --adapter-inputs``).

Reported: prefill latency (prompt -> first token) and decode tokens/s (the remaining tokens of all
rows over their time), and decode ratios against torch eager, in one run. Routes are timed in turn,
round after round (one warm-up round first), and each reports its best round, so slow drift on the
machine falls on every route alike; onnxruntime-genai directly runs on the very ``og.Model`` its
``OnnxServer`` route drives (``OnnxServer.genai_model``), so the two differ only by our Python. Read
the speeds only from a quiet machine; the script says how many threads it used.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adalora_export import AdaLoraConfig, CompactAdapter, ModuleAdapter  # noqa: E402
from adalora_export.converters.merge import merge_into_base  # noqa: E402
from adalora_export.converters.onnx import OnnxKind, export_onnx, export_optimized  # noqa: E402
from adalora_export.formats.peft import save_adapter  # noqa: E402
from adalora_export.hf import load_pretrained  # noqa: E402
from adalora_export.model import DEFAULT_TARGET_MODULES, find_target_paths  # noqa: E402
from adalora_export.serving import OnnxServer  # noqa: E402
from adalora_export.toy import toy_config, toy_tokenizer  # noqa: E402


def toy_base(root: Path, hidden: int, layers: int) -> Path:
    """A random Llama base directory (a word-level vocabulary of 4,000)."""
    from transformers import LlamaForCausalLM

    tokenizer = toy_tokenizer([f"w{i}" for i in range(4000)])
    config = toy_config("llama", len(tokenizer), hidden, layers, max_position_embeddings=512)
    config.num_attention_heads = hidden // 64
    config.num_key_value_heads = max(1, hidden // 128)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return root / "base"


def random_adapter(base: Path, root: Path) -> Path:
    """An adapter at ranks 0..8 (a fixed cycle) on every projection of ``base``, saved under ``root``."""
    model = load_pretrained(base, dtype=torch.float32)
    targets = DEFAULT_TARGET_MODULES["llama"]
    g = torch.Generator().manual_seed(1)
    modules = {}
    for i, path in enumerate(find_target_paths(model, targets)):
        out_f, in_f = model.get_submodule(path).weight.shape
        r = [0, 2, 4, 8, 6, 3, 1][i % 7]
        modules[path] = ModuleAdapter(
            torch.randn(r, in_f, generator=g) * 0.02,
            torch.randn(r, 1, generator=g),
            torch.randn(out_f, r, generator=g) * 0.02,
        )
    adapter = CompactAdapter(AdaLoraConfig(init_r=8, target_r=4, target_modules=targets), modules, str(base))
    return save_adapter(adapter, root / "adapter")


def prompts(batch: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(batch)
    return [rng.integers(10, 3000, length).tolist() for _ in range(batch)]


def timed_steps(steps) -> tuple[float, float, int]:
    """(seconds to the first step, seconds for the rest, tokens in the rest) of a step iterator."""
    start = time.perf_counter()
    first = rest = None
    tokens = 0
    for i, step in enumerate(steps):
        now = time.perf_counter()
        if i == 0:
            first = now - start
            mark = now
        else:
            tokens += sum(t is not None for t in step)
            rest = now - mark
    return first, rest or float("nan"), tokens


def torch_steps(model, batch: list[list[int]], new: int):
    """Greedy steps in torch with transformers' KV cache."""
    with torch.no_grad():
        ids = torch.tensor(batch)
        out = model(input_ids=ids, use_cache=True)
        for _ in range(new):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            yield token[:, 0].tolist()
            out = model(input_ids=token, cache=out.past_key_values, use_cache=True)


def genai_steps(model, batch: list[list[int]], new: int, adapters=None):
    """Greedy steps through onnxruntime-genai directly: one generator for the batch (the prompts have
    one length). ``model`` is an ``og.Model`` loaded outside the timing."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    length = len(batch[0])
    params.set_search_options(batch_size=len(batch), max_length=length + new, min_length=length + new, do_sample=False)
    generator = og.Generator(model, params)
    if adapters is not None:
        generator.set_active_adapter(adapters, "a")
    generator.append_tokens(np.asarray(batch, dtype=np.int32))
    for _ in range(new):
        generator.generate_next_token()
        yield [int(t) for t in generator.get_next_tokens()]


def measure(routes: dict, batch: list[list[int]], new: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Per route, the best prefill seconds and decode tokens/s over ``rounds`` rounds in which every
    route runs once in turn (after one warm-up round)."""
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in routes}
    for round_ in range(rounds + 1):
        for name, route in routes.items():
            time.sleep(0.2)  # the last route's onnxruntime threads spin a while after their run: let them stop
            first, rest, tokens = timed_steps(route(batch, new))
            if round_:
                results[name].append((first, tokens / rest))
    return {name: (min(f for f, _ in runs), max(r for _, r in runs)) for name, runs in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hidden 256, 4 layers, 1 round")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", choices=["toy", "smollm2"], default="toy",
                        help="toy: a random Llama (hidden 512, 8 layers); smollm2: SmolLM2-135M-Instruct")  # fmt: skip
    parser.add_argument("--adapter", help="an adapter of --model to run (default: random, ranks 0..8)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 5, --quick 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden, layers, rounds = (256, 4, 1) if args.quick else (512, 8, 5)
    rounds = args.rounds or rounds
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.model == "smollm2":
            from adalora_export.pretrained import smollm2_dir

            base = smollm2_dir()
        else:
            base = toy_base(root, hidden, layers)
        from adalora_export.sources import load_adapter

        adapter = load_adapter(args.adapter or random_adapter(base, root))
        print(f"building graphs of {base.name} ...", file=sys.stderr)
        export_onnx(adapter, base, root / "merged", kind=OnnxKind.MERGED, with_past=True)
        export_onnx(adapter, base, root / "inputs", kind=OnnxKind.ADAPTER_INPUTS, with_past=True)
        for dtype in ("fp32", "int4"):
            export_optimized(adapter, base, root / f"opt_{dtype}", dtype=dtype, tolerance=10.0)
            export_optimized(adapter, base, root / f"optai_{dtype}", dtype=dtype, tolerance=10.0, adapter_inputs=True)
        merge_into_base(adapter, base, root / "merged_hf")
        eager = load_pretrained(root / "merged_hf", dtype=torch.float32).eval()
        import onnxruntime_genai as og

        servers = {name: OnnxServer(root / name, provider="cpu") for name in ("merged", "opt_fp32", "opt_int4")}
        with_adapter = OnnxServer(root / "inputs", provider="cpu", adapter=root / "inputs" / "adapter.onnx_adapter")
        for dtype in ("fp32", "int4"):
            servers[f"optai_{dtype}"] = OnnxServer(
                root / f"optai_{dtype}", adapter=root / f"optai_{dtype}" / "adapter.onnx_adapter"
            )
        genai = {"inputs": og.Model(str(root / "inputs"))}
        genai.update({name: servers[name].genai_model for name in ("opt_fp32", "opt_int4")})
        adapters = og.Adapters(genai["inputs"])
        adapters.load(str(root / "inputs" / "adapter.onnx_adapter"), "a")
        routes = {
            "torch eager, merged": lambda b, n: torch_steps(eager, b, n),
            "ours merged fp32, OnnxServer": servers["merged"].generate_batch_ids,
            "ours adapter-inputs + adapter, OnnxServer": with_adapter.generate_batch_ids,
            "ours adapter-inputs + adapter, onnxruntime-genai": lambda b, n: genai_steps(
                genai["inputs"], b, n, adapters
            ),
            "builder fp32, OnnxServer": servers["opt_fp32"].generate_batch_ids,
            "builder fp32, onnxruntime-genai": lambda b, n: genai_steps(genai["opt_fp32"], b, n),
            "builder fp32 + adapter inputs, adapter active, OnnxServer": servers["optai_fp32"].generate_batch_ids,
            "builder int4, OnnxServer": servers["opt_int4"].generate_batch_ids,
            "builder int4, onnxruntime-genai": lambda b, n: genai_steps(genai["opt_int4"], b, n),
            "builder int4 + adapter inputs, adapter active, OnnxServer": servers["optai_int4"].generate_batch_ids,
        }
        threads = torch.get_num_threads()
        print(f"{base.name}; threads: torch {threads}; prompt {args.prompt}, {args.new} new tokens, greedy\n")
        print("| batch | route | prefill | decode tok/s | decode vs torch |")
        print("|---|---|---|---|---|")
        for batch_size in (1, 8):
            results = measure(routes, prompts(batch_size, args.prompt), args.new, rounds)
            baseline = results["torch eager, merged"][1]
            for name, (first, rate) in results.items():
                print(f"| {batch_size} | {name} | {first * 1000:.1f} ms | {rate:.0f} | {rate / baseline:.2f} |")


if __name__ == "__main__":
    main()
