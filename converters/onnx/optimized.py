"""Optimized decoder graphs built by onnxruntime-genai's own model builder, checked against torch.

For the architectures the builder takes (Llama, Mistral, Qwen2/3, Phi, Gemma and kin), its graph is
what onnxruntime's LLM stack serves fastest: fused GroupQueryAttention over a shared KV-cache
buffer, fused rotary embedding and norms, and int4 weights (``MatMulNBits``). We do not rewrite
that: the adapter is merged into a temporary HF directory (streaming, ``converters.merge``), the
builder turns it into ``model.onnx`` + ``genai_config.json``, and our own check then runs the result
through onnxruntime-genai against the merged torch model in fp32: greedy agreement over a few
prompts and the largest relative logit error, with a bound per dtype (int4 quantizes every matrix,
so it gets its own). Both figures go into ``onnx_manifest.json``; over the bound nothing is written.
Architectures the builder does not take (GPT-2, encoders, classifiers) use ``export_onnx``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from adalora_export.adapter import CompactAdapter
from adalora_export.errors import UserError
from adalora_export.hf import CAUSAL_LM, check_model_dir, load_pretrained
from adalora_export.io import atomic_output_dir, check_output_path, write_json

from ..merge import merge_into_base
from .layout import GENAI_CONFIG, MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION, MODEL_FILE, OnnxKind

BUILDER_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "PhiForCausalLM",
    "Phi3ForCausalLM",
    "GraniteForCausalLM",
    "OlmoForCausalLM",
    "SmolLM3ForCausalLM",
)
OPTIMIZED_DTYPES = ("fp32", "fp16", "int4")
TARGETS = ("cpu", "cuda")
# Largest relative logit error (to the largest reference logit) against torch fp32: fp32 is the same
# arithmetic reordered; fp16 the builder's accuracy class; int4 rounds every weight to 16 levels per block.
OPTIMIZED_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "int4": 0.25}
PROMPT_LENGTHS = (5, 11, 17)
NEW_TOKENS = 8


def export_optimized(
    adapter: CompactAdapter,
    base_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str = "fp32",
    target: str = "cpu",
    tolerance: float | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Write base + ``adapter`` as onnxruntime-genai's optimized graph into ``output``; returns the manifest."""
    if dtype not in OPTIMIZED_DTYPES:
        raise UserError(f"--dtype {dtype} is not built by the optimizer; choose one of {', '.join(OPTIMIZED_DTYPES)}")
    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if dtype == "fp16" and target == "cpu":
        raise UserError("the builder makes fp16 graphs for --target cuda only; on the CPU use fp32 or int4")
    base_dir = Path(base_dir)
    config = check_model_dir(base_dir)
    architecture = (config.get("architectures") or ["?"])[0]
    if adapter.task_type not in (None, CAUSAL_LM) or architecture not in BUILDER_ARCHITECTURES:
        raise UserError(
            f"onnxruntime-genai's builder does not take {architecture} ({adapter.task_type or 'causal_lm'}); "
            "export it with --onnx --merge instead"
        )
    output = check_output_path(output, overwrite)
    tolerance = OPTIMIZED_TOLERANCE[dtype] if tolerance is None else tolerance
    with tempfile.TemporaryDirectory(prefix=".adalora-optimized-", dir=output.absolute().parent) as work:
        merged = Path(work) / "merged"
        merge_into_base(adapter, base_dir, merged, allow_pickle=allow_pickle)
        with atomic_output_dir(output, overwrite) as tmp:
            _build(merged, tmp, dtype, target, Path(work) / "cache")
            for name in ("config.json", "generation_config.json"):  # what the directory's readers expect
                if (merged / name).is_file():
                    shutil.copyfile(merged / name, tmp / name)
            try:
                parity = check_optimized(tmp, merged, tolerance)
            except RuntimeError as exc:  # onnxruntime-genai cannot run it here (no GPU for a cuda graph, say)
                raise UserError(f"onnxruntime-genai cannot run the built graph: {str(exc).splitlines()[0]}") from None
            manifest = {
                "format": MANIFEST_FORMAT,
                "version": MANIFEST_VERSION,
                "kind": OnnxKind.OPTIMIZED.value,
                "task": CAUSAL_LM,
                "model_type": config["model_type"],
                "dtype": dtype,
                "target": target,
                "exporter": "onnxruntime-genai model builder",
                "base_model_name_or_path": str(base_dir.absolute()),
                "rank_pattern": adapter.rank_pattern,
                "genai_config": GENAI_CONFIG,
                "parity": parity,
            }
            write_json(tmp / MANIFEST, manifest)
    return manifest


def _build(merged: Path, output: Path, dtype: str, target: str, cache: Path) -> None:
    """Run the builder on the merged directory (a child process: it loads the whole model itself)."""
    argv = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", merged.name, "-i", str(merged)]
    argv += ["-o", str(output), "-p", dtype, "-e", target, "-c", str(cache)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0 or not (output / MODEL_FILE).is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"onnxruntime-genai's builder failed on {merged.name}: {tail[0]}")


@torch.no_grad()
def check_optimized(graph_dir: Path, merged: Path, tolerance: float) -> dict:
    """Run the built graph through onnxruntime-genai against the merged model in torch fp32."""
    import onnxruntime_genai as og

    reference = load_pretrained(merged, CAUSAL_LM, dtype=torch.float32).eval()
    model = og.Model(str(graph_dir))
    vocab = reference.config.get_text_config().vocab_size
    rng = np.random.default_rng(0)
    worst, agree, total = 0.0, 0, 0
    for length in PROMPT_LENGTHS:
        ids = rng.integers(0, vocab, length).tolist()
        want = reference(torch.tensor([ids])).logits[0].numpy()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length + NEW_TOKENS, min_length=length + NEW_TOKENS, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        got = np.asarray(generator.get_output("logits"), dtype=np.float32)[0, : want.shape[0]]
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
        while not generator.is_done():
            generator.generate_next_token()
        tokens = [int(t) for t in generator.get_sequence(0)[length:]]
        expected = _greedy(reference, ids, NEW_TOKENS)
        agree += sum(a == b for a, b in zip(tokens, expected))
        total += len(expected)
    del model  # frees the graph's weights before the caller renames the directory
    parity = {"max_relative_error": worst, "tolerance": tolerance, "greedy_agreement": agree / total}
    if worst > tolerance:
        raise UserError(
            f"onnxruntime-genai differs from torch by {worst:.3g} (relative) on the built graph, over the "
            f"tolerance {tolerance}; nothing written"
        )
    return parity


def _greedy(model: torch.nn.Module, ids: list[int], new: int) -> list[int]:
    """Plain argmax decoding in torch, no logits processors (``generate`` applies the generation
    config's, which onnxruntime-genai's search options do not mirror); EOS is suppressed as
    onnxruntime-genai's ``min_length`` does."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    sequence, out = list(ids), []
    for _ in range(new):
        logits = model(torch.tensor([sequence])).logits[0, -1]
        if eos:
            logits[list(eos)] = -float("inf")
        token = int(logits.argmax())
        sequence.append(token)
        out.append(token)
    return out
