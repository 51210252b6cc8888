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

With ``adapter_inputs`` the graph is the builder's optimized *base* with one LoRA branch per adapted
layer whose weights are graph inputs, each with its own rank axis and an empty (rank 0) default:
onnxruntime-genai's ``og.Adapters`` (and ``OnnxServer.set_adapter``) swap ``.onnx_adapter`` files
of any per-layer ranks per request. The builder only bakes a LoRA in (``adapter_path``), so we let it
build the branches from our uniform LoRA export and then rewrite its graph (``builder_graph``): the
branch weights become inputs (int4 branches go back to float MatMuls, since an adapter's weights come
from the file at run time), and q, k and v, which the builder unpacks when it bakes a LoRA in, are
packed back into one projection, as its merged graph has them.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm import tqdm

from adalora_export.adapter import CompactAdapter
from adalora_export.errors import UserError
from adalora_export.formats.onnx_dir import (
    ADAPTER_FILE,
    DATA_FILE,
    GENAI_CONFIG,
    MANIFEST,
    MODEL_FILE,
    OPTIMIZED_DTYPES,
    TARGETS,
    Manifest,
    OnnxKind,
    import_onnxruntime_genai,
)
from adalora_export.hf import CAUSAL_LM, check_model_dir, eos_token_ids, load_pretrained
from adalora_export.io import atomic_output_dir, check_output_path, output_parents, write_json

from ..lora import export_lora
from ..merge import merge_into_base
from .adapter_file import write_adapter_file
from .builder_graph import branches_as_inputs, pack_qkv
from .parity import check_tolerance

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
    adapter_inputs: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Write base + ``adapter`` as onnxruntime-genai's optimized graph into ``output`` (merged, or with
    ``adapter_inputs`` the base with hot-swappable branches and the adapter as ``adapter.onnx_adapter``);
    returns the manifest."""
    base_dir = Path(base_dir)
    config = _check_options(adapter, base_dir, dtype, target, tolerance, adapter_inputs)
    output = check_output_path(output, overwrite, inputs={"the base model": base_dir})
    tolerance = OPTIMIZED_TOLERANCE[dtype] if tolerance is None else tolerance
    manifest = _manifest(adapter, config, base_dir, dtype, target, adapter_inputs)
    stages = tqdm(total=4, desc=f"ONNX export (optimized, {dtype})", unit="stage")
    # Named like an atomic output's temporary, so a later export of the same name clears it after a kill.
    scratch = functools.partial(
        tempfile.TemporaryDirectory, prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.absolute().parent
    )
    with output_parents(output), stages, scratch() as work:
        work = Path(work)
        stages.set_postfix_str("merging" if not adapter_inputs else "LoRA branches")
        source, lora = _builder_source(adapter, base_dir, work, adapter_inputs, allow_pickle)
        stages.update()
        with atomic_output_dir(output, overwrite) as tmp:
            stages.set_postfix_str("onnxruntime-genai builder")
            _build(source, tmp, dtype, target, work / "cache", lora)
            stages.update()
            for name in ("config.json", "generation_config.json"):  # what the directory's readers expect
                if (source / name).is_file():
                    shutil.copyfile(source / name, tmp / name)
            if adapter_inputs:
                manifest.branches = _take_adapters(tmp, adapter)
                write_adapter_file(adapter, manifest.to_dict(), tmp / ADAPTER_FILE)
            reference = _reference(adapter, base_dir, source, adapter_inputs, allow_pickle)
            manifest.eos_token_ids = eos_token_ids(reference)
            stages.set_postfix_str("onnxruntime-genai check")
            stages.update()
            manifest.parity = _check(tmp, reference, tolerance, tmp / ADAPTER_FILE if adapter_inputs else None)
            write_json(tmp / MANIFEST, manifest.to_dict())
            stages.update()
    return manifest.to_dict()


def _check_options(
    adapter: CompactAdapter, base_dir: Path, dtype: str, target: str, tolerance: float | None, adapter_inputs: bool
) -> dict:
    """The base's config; a UserError for options the builder cannot take, before any work."""
    if dtype not in OPTIMIZED_DTYPES:
        raise UserError(f"--dtype {dtype} is not built by the optimizer; choose one of {', '.join(OPTIMIZED_DTYPES)}")
    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    check_tolerance(tolerance)
    import_onnxruntime_genai()  # it builds and checks the graph
    if dtype == "fp16" and target == "cpu":
        raise UserError("the builder makes fp16 graphs for --target cuda only; on the CPU use fp32 or int4")
    config = check_model_dir(base_dir)
    architecture = (config.get("architectures") or ["?"])[0]
    if adapter.task_type not in (None, CAUSAL_LM) or architecture not in BUILDER_ARCHITECTURES:
        raise UserError(
            f"onnxruntime-genai's builder does not take {architecture} ({adapter.task_type or 'causal_lm'}); "
            "export it with --onnx --merge instead"
        )
    if adapter_inputs and adapter.extra_weights:
        names = ", ".join(sorted(adapter.extra_weights))
        raise UserError(f"the adapter trains {names} in full; the builder's graph cannot take them as inputs")
    return config


def _manifest(
    adapter: CompactAdapter, config: dict, base_dir: Path, dtype: str, target: str, adapter_inputs: bool
) -> Manifest:
    """The manifest as far as it is known before the build: branches, EOS ids and parity come later."""
    return Manifest(
        kind=OnnxKind.OPTIMIZED,
        task=CAUSAL_LM,
        model_type=config["model_type"],
        dtype=dtype,
        exporter="onnxruntime-genai model builder",
        base_model_name_or_path=str(base_dir.absolute()),
        rank_pattern=adapter.rank_pattern,
        adapter_inputs=adapter_inputs,
        target=target,
        with_past=True,  # the builder's decoders always take a KV cache (onnxruntime-genai drives it)
        init_r=adapter.config.init_r,
        lora_alpha=adapter.config.lora_alpha,
        scale=adapter.scale,
        adapter_file=ADAPTER_FILE if adapter_inputs else None,
        genai_config=GENAI_CONFIG,
    )


def _builder_source(
    adapter: CompactAdapter, base_dir: Path, work: Path, adapter_inputs: bool, allow_pickle: bool
) -> tuple[Path, Path | None]:
    """(the HF directory the builder reads, the LoRA it bakes in): the base with our uniform LoRA export
    (which has a branch on every adapted layer) for adapter inputs, else the merged model."""
    if adapter_inputs:
        return base_dir, export_lora(adapter, work / "lora", layout="uniform")
    merge_into_base(adapter, base_dir, work / "merged", allow_pickle=allow_pickle)
    return work / "merged", None


def _build(source: Path, output: Path, dtype: str, target: str, cache: Path, lora: Path | None = None) -> None:
    """Run the builder on an HF directory (a child process: it loads the whole model itself)."""
    argv = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", source.name, "-i", str(source)]
    argv += ["-o", str(output), "-p", dtype, "-e", target, "-c", str(cache)]
    if lora is not None:
        argv += ["--extra_options", f"adapter_path={lora}"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0 or not (output / MODEL_FILE).is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"onnxruntime-genai's builder failed on {source}: {tail[0]}")


def _take_adapters(directory: Path, adapter: CompactAdapter) -> dict[str, dict]:
    """Rewrite the built graph in ``directory`` so that adapters swap into it (``builder_graph``): branch
    weights as inputs, q/k/v packed again. Returns the manifest's ``branches``."""
    model = onnx.load(str(directory / MODEL_FILE))
    branches = branches_as_inputs(model.graph, adapter.modules)
    pack_qkv(model.graph)
    (directory / DATA_FILE).unlink(missing_ok=True)
    onnx.save(model, str(directory / MODEL_FILE), save_as_external_data=True, location=DATA_FILE)
    return branches


def _reference(
    adapter: CompactAdapter, base_dir: Path, source: Path, adapter_inputs: bool, allow_pickle: bool
) -> torch.nn.Module:
    """The torch model the graph stands for, in fp32: base + adapter, or the merged directory."""
    if adapter_inputs:
        return adapter.apply_to(adapter.load_base(base_dir, allow_pickle=allow_pickle))
    return load_pretrained(source, CAUSAL_LM, dtype=torch.float32).eval()


def _check(graph_dir: Path, reference: torch.nn.Module, tolerance: float, adapter_file: Path | None) -> dict:
    """``check_optimized``, with onnxruntime-genai's own failures to run the graph as a UserError."""
    try:
        return check_optimized(graph_dir, reference, tolerance, adapter_file)
    except RuntimeError as exc:  # onnxruntime-genai cannot run it here (no GPU for a cuda graph, say)
        raise UserError(f"onnxruntime-genai cannot run the built graph: {str(exc).splitlines()[0]}") from None


@torch.no_grad()
def check_optimized(graph_dir: Path, reference: torch.nn.Module, tolerance: float, adapter_file: Path | None) -> dict:
    """Run the built graph through onnxruntime-genai (with ``adapter_file`` active, if given) against
    ``reference``, the model it stands for, in torch fp32."""
    og = import_onnxruntime_genai()
    model = og.Model(str(graph_dir))
    adapters = None
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), "adapter")
    vocab = reference.config.get_text_config().vocab_size
    rng = np.random.default_rng(0)
    worst, agree, total = 0.0, 0, 0
    for length in PROMPT_LENGTHS:
        ids = rng.integers(0, vocab, length).tolist()
        want = reference(torch.tensor([ids])).logits[0].numpy()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length + NEW_TOKENS, min_length=length + NEW_TOKENS, do_sample=False)
        generator = og.Generator(model, params)
        if adapters is not None:
            generator.set_active_adapter(adapters, "adapter")
        generator.append_tokens(ids)
        got = np.asarray(generator.get_output("logits"), dtype=np.float32)[0, : want.shape[0]]
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
        while not generator.is_done():
            generator.generate_next_token()
        tokens = [int(t) for t in generator.get_sequence(0)[length:]]
        expected = _greedy(reference, ids, NEW_TOKENS)
        agree += sum(a == b for a, b in zip(tokens, expected))
        total += len(expected)
    del adapters, model  # frees the graph's weights before the caller renames the directory
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
    eos = set(eos_token_ids(model))
    sequence, out = list(ids), []
    for _ in range(new):
        logits = model(torch.tensor([sequence])).logits[0, -1]
        if eos:
            logits[list(eos)] = -float("inf")
        token = int(logits.argmax())
        sequence.append(token)
        out.append(token)
    return out
