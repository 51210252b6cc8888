"""GPU generation throughput: our merged fp16 graph and onnxruntime-genai's builder graphs (fp16, int4)
under CUDA, against torch eager fp16.

One prepared script for a CUDA machine. It builds a Llama-style model with an AdaLoRA adapter of
heterogeneous ranks, exports the merged graph with a KV cache in fp16 (the export checks itself
against torch first), then times greedy generation on the same GPU:

- ORT: ``CUDAExecutionProvider``, inputs and the KV cache bound on the device with IOBinding (the
  cache never leaves the GPU; only the last position's logits come back for the argmax);
- torch: eager fp16, the same model merged, ``DynamicCache``, the same prompt and loop.

It reports prompt (prefill) latency and decode tokens/s per batch size, and how many generated
tokens the two agree on. A second table has the builder's graphs (``export_optimized(...,
target="cuda")``: fp16, and int4 ``MatMulNBits``; each passes its own check first), timed through
onnxruntime-genai directly and through ``OnnxServer``, with their decode rate over torch's. That
needs the CUDA build of onnxruntime-genai (``run.sh`` installs it where a GPU answers). Without a
usable CUDA GPU the script says so and exits 0.

    .venv/bin/python bench/bench_onnx_gpu.py                 # hidden 2048, 8 layers, batches 1 and 8
    .venv/bin/python bench/bench_onnx_gpu.py --cpu-check     # the same code paths on the CPU, tiny model
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

from bench_genai import build_model, genai_steps, measure, prompts  # noqa: E402

from adalora_export.converters.onnx import OnnxKind, export_onnx, export_optimized  # noqa: E402
from adalora_export.hf import load_pretrained  # noqa: E402
from adalora_export.model import unwrap_adapters  # noqa: E402
from adalora_export.serving import OnnxServer, create_session, cuda_usable  # noqa: E402
from adalora_export.sources import load_adapter  # noqa: E402


def ort_generate(
    session, manifest: dict, prompt: np.ndarray, new_tokens: int, device: str
) -> tuple[list, float, float]:
    """Greedy generation with IOBinding; returns (tokens per row, prefill seconds, decode seconds)."""
    import onnxruntime as ort

    cache = manifest["cache"]
    dtype = np.float16 if manifest["dtype"] == "fp16" else np.float32
    batch, length = prompt.shape
    device_id = 0
    empty = np.zeros((batch, cache["num_kv_heads"], 0, cache["head_dim"]), dtype)
    past = {name: ort.OrtValue.ortvalue_from_numpy(empty, device, device_id) for name in cache["inputs"]}
    ids, tokens = prompt, []
    timings = []
    for step in range(new_tokens):
        start = time.perf_counter()
        total = length + step
        binding = session.io_binding()
        fresh = ids if step == 0 else ids[:, -1:]
        positions = np.arange(total - fresh.shape[1], total, dtype=np.int64)[None].repeat(batch, 0)
        for name, value in (
            ("input_ids", fresh),
            ("attention_mask", np.ones((batch, total), np.int64)),
            ("position_ids", positions),
        ):
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, device_id))
        for name, value in past.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", device, device_id)
        for name in cache["outputs"]:
            binding.bind_output(name, device, device_id)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()[:, -1]  # the one copy back to the host: (batch, seq, vocab) of this step
        past = dict(zip(cache["inputs"], outputs[1:]))
        nxt = logits.argmax(-1)[:, None].astype(np.int64)
        ids = np.concatenate([ids, nxt], axis=1)
        tokens.append(nxt[:, 0])
        timings.append(time.perf_counter() - start)
    return np.stack(tokens, 1).tolist(), timings[0], sum(timings[1:])


@torch.no_grad()
def torch_generate(model, prompt: np.ndarray, new_tokens: int, device: str) -> tuple[list, float, float]:
    """The same greedy loop in torch eager with a DynamicCache."""
    from transformers import DynamicCache

    ids = torch.from_numpy(prompt).to(device)
    cache, tokens, timings = DynamicCache(config=model.config), [], []
    fresh = ids
    for _ in range(new_tokens):
        start = time.perf_counter()
        total = cache.get_seq_length() + fresh.shape[1]
        mask = torch.ones(ids.shape[0], total, dtype=torch.long, device=device)
        out = model(input_ids=fresh, attention_mask=mask, cache=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        cache = out.cache
        tokens.append(nxt[:, 0])
        fresh = nxt
        if device == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return torch.stack(tokens, 1).tolist(), timings[0], sum(timings[1:])


def agreement(a: list, b: list) -> float:
    """Share of generated tokens before each row's first divergence (fp16 greedy may flip near-ties)."""
    prefix = 0
    for row_a, row_b in zip(a, b):
        for x, y in zip(row_a, row_b):
            if x != y:
                break
            prefix += 1
    return prefix / max(sum(len(row) for row in a), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-check", action="store_true", help="run the same path on the CPU with a tiny fp32 model")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="generated tokens")
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    if args.cpu_check:
        device, dtype, provider = "cpu", "fp32", "cpu"
        args.hidden, args.layers, args.prompt, args.new = 128, 2, 16, 8
    else:
        if not (torch.cuda.is_available() and cuda_usable()):
            print("bench_onnx_gpu: no usable CUDA GPU here (torch CUDA and onnxruntime's CUDA provider); not run.")
            return
        device, dtype, provider = "cuda", "fp16", "cuda"

    with tempfile.TemporaryDirectory(prefix="bench-onnx-gpu-") as tmp:
        base_dir, adapter_dir = build_model(Path(tmp), args.hidden, args.layers)
        adapter, model = load_adapter(adapter_dir), load_pretrained(base_dir, dtype=torch.float32).eval()
        start = time.perf_counter()
        manifest = export_onnx(adapter, base_dir, Path(tmp) / "onnx", kind=OnnxKind.MERGED, with_past=True, dtype=dtype)
        print(
            f"export ({dtype}, merged, KV cache): {time.perf_counter() - start:.0f} s, "
            f"parity {manifest['parity']['max_relative_error']:.2e} (tolerance {manifest['parity']['tolerance']:g})"
        )
        session = create_session(Path(tmp) / "onnx" / "model.onnx", provider)
        merged = unwrap_adapters(adapter.apply_to(model))
        merged = merged.to(device, torch.float16 if dtype == "fp16" else torch.float32).eval()
        ort_device = "cuda" if device == "cuda" else "cpu"
        print(
            f"GPU: {torch.cuda.get_device_name(0) if device == 'cuda' else 'none (CPU check)'}; "
            f"hidden {args.hidden}, {args.layers} layers, prompt {args.prompt}, {args.new} new tokens"
        )
        print(
            "| batch | ORT prefill | ORT decode tok/s | torch prefill | torch decode tok/s | ORT/torch decode | agree |"
        )
        print("|---|---|---|---|---|---|---|")
        batches, torch_rates = [int(b) for b in args.batches.split(",")], {}
        for batch in batches:
            prompt = np.asarray(prompts(batch, args.prompt), np.int64)
            ort_generate(session, manifest, prompt, 2, ort_device)  # warm-up (kernels, allocator)
            torch_generate(merged, prompt, 2, device)
            ort_tokens, ort_pre, ort_dec = ort_generate(session, manifest, prompt, args.new, ort_device)
            torch_tokens, t_pre, t_dec = torch_generate(merged, prompt, args.new, device)
            decoded = batch * (args.new - 1)
            ort_rate = decoded / ort_dec
            torch_rates[batch] = torch_rate = decoded / t_dec
            print(
                f"| {batch} | {ort_pre * 1e3:.1f} ms | {ort_rate:.0f} | {t_pre * 1e3:.1f} ms | {torch_rate:.0f} "
                f"| {ort_rate / torch_rate:.2f} | {agreement(ort_tokens, torch_tokens):.0%} |"
            )
        del session
        builder_table(adapter, base_dir, Path(tmp), "cuda" if device == "cuda" else "cpu", args, torch_rates)


def builder_table(adapter, base_dir: Path, root: Path, target: str, args, torch_rates: dict[int, float]) -> None:
    """onnxruntime-genai's builder graphs for ``target`` (fp16 and int4 on CUDA; fp32 and int4 in the
    CPU check), timed through onnxruntime-genai and through OnnxServer, against torch's decode rate."""
    import onnxruntime_genai as og

    if target == "cuda" and not og.is_cuda_available():
        print("\nbuilder graphs: this onnxruntime-genai is the CPU build (install onnxruntime-genai-cuda); not run.")
        return
    print("\n| batch | builder graph | route | prefill | decode tok/s | decode vs torch |")
    print("|---|---|---|---|---|---|")
    graphs = {}
    for dtype in ("fp16", "int4") if target == "cuda" else ("fp32", "int4"):
        out = root / f"opt_{dtype}_{target}"
        check = export_optimized(adapter, base_dir, out, dtype=dtype, target=target)["parity"]
        print(f"builder {dtype} ({target}): check {check['max_relative_error']:.2e} (bound {check['tolerance']:g})")
        graphs[dtype] = (og.Model(str(out)), OnnxServer(out, provider=target))
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = prompts(batch, args.prompt)
        for dtype, (model, server) in graphs.items():
            routes = {
                "onnxruntime-genai": lambda b, n, m=model: genai_steps(m, b, n),
                "OnnxServer": server.generate_batch_ids,
            }
            for route, steps in routes.items():
                first, rate = measure(steps, ids, args.new, 3)
                ratio = rate / torch_rates[batch]
                print(f"| {batch} | {dtype} | {route} | {first * 1e3:.1f} ms | {rate:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
