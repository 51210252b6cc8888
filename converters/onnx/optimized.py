"""Optimized decoder graphs built by onnxruntime-genai's own model builder, checked against torch.

For the architectures the builder takes (Llama, Mistral, Qwen2/3, Phi, Gemma and kin), its graph is
what onnxruntime's LLM stack serves fastest: fused GroupQueryAttention over a shared KV-cache
buffer, fused rotary embedding and norms, and int4 weights (``MatMulNBits``). We do not rewrite
that: the adapter is merged into a temporary HF directory (streaming, ``converters.merge``), the
builder turns it into ``model.onnx`` + ``genai_config.json``, and our own check then runs the result
through onnxruntime-genai against the merged torch model in fp32 on real text tokenized by the model's
own tokenizer (``quality``): per-token perplexity of both, top-1 agreement of their next-token
predictions, the largest relative logit error, and greedy agreement from a few prompts. The bound
depends on the dtype: fp32 and fp16 are held to the logit error; int4, which rounds every matrix, to
what a user notices (perplexity within a share of torch's, top-1 agreement above a floor). The figures
and bounds go into ``onnx_manifest.json``; out of bounds nothing is written. A ``cuda`` graph built
where no CUDA GPU is usable is written unchecked, and the manifest says so. int4 builds take the
builder's settings that matter (``int4_settings``: block size, accuracy level, the output head's
precision, int8 for the most sensitive projections), recorded as the manifest's ``quantization``.
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

import onnx
import torch
from tqdm import tqdm

from adalora_export.adapter import CompactAdapter
from adalora_export.devices import cuda_usable
from adalora_export.errors import UserError
from adalora_export.formats.onnx_dir import (
    ADAPTER_FILE,
    DATA_FILE,
    GENAI_CONFIG,
    INT4_ACCURACY_LEVELS,
    INT4_BLOCK_SIZES,
    INT4_HEADS,
    INT4_SENSITIVE,
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
from .quality import NEW_TOKENS, check_optimized, check_sequences, judge

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
# The builder's int4 settings we choose by default (measured, README): the output head and llama.cpp's
# mixed layers (the most quantization-sensitive projections) in int8, which take the perplexity increase
# from +31% to +11%; blocks of 64, as good as 32 on perplexity (4 points lower top-1) and smaller and
# faster (16: the best top-1, 50% slower). The accuracy level is the builder's default for the target.
INT4_DEFAULTS = {"block_size": 64, "head": "int8", "sensitive": "int8"}
BUILDER_ACCURACY_LEVEL = {"cpu": 4, "cuda": 0}  # int8 activations on the CPU (fastest there), the graph's on CUDA
NO_CUDA = "not checked on this machine: no usable CUDA GPU"


def export_optimized(
    adapter: CompactAdapter,
    base_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str = "fp32",
    target: str = "cpu",
    tolerance: float | None = None,
    adapter_inputs: bool = False,
    int4_block_size: int | None = None,
    int4_accuracy_level: int | None = None,
    int4_head: str | None = None,
    int4_sensitive: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Write base + ``adapter`` as onnxruntime-genai's optimized graph into ``output`` (merged, or with
    ``adapter_inputs`` the base with hot-swappable branches and the adapter as ``adapter.onnx_adapter``);
    returns the manifest. The ``int4_*`` settings (``int4_settings``) apply to ``dtype="int4"`` only."""
    base_dir = Path(base_dir)
    int4 = int4_settings(dtype, target, int4_block_size, int4_accuracy_level, int4_head, int4_sensitive)
    config = _check_options(adapter, base_dir, dtype, target, tolerance, adapter_inputs)
    output = check_output_path(output, overwrite, inputs={"the base model": base_dir})
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
        options = _builder_options(int4, _ties_embeddings(source))
        if int4 is not None:
            manifest.quantization = {**int4, "builder_options": options}
        stages.update()
        with atomic_output_dir(output, overwrite) as tmp:
            stages.set_postfix_str("onnxruntime-genai builder")
            _build(source, tmp, dtype, target, work / "cache", lora, options)
            stages.update()
            for name in ("config.json", "generation_config.json"):  # what the directory's readers expect
                if (source / name).is_file():
                    shutil.copyfile(source / name, tmp / name)
            if adapter_inputs:
                manifest.branches = _take_adapters(tmp, adapter)
                write_adapter_file(adapter, manifest.to_dict(), tmp / ADAPTER_FILE)
            manifest.eos_token_ids = _eos_token_ids(source)
            stages.set_postfix_str("onnxruntime-genai check")
            stages.update()
            if target == "cuda" and not cuda_usable():  # the graph is built; it runs only on a GPU
                manifest.parity = {"checked": False, "reason": NO_CUDA}
            else:
                reference = _reference(adapter, base_dir, source, adapter_inputs, allow_pickle)
                sequences, scored_on = check_sequences(base_dir, _vocab_size(reference), _context(reference))
                figures = _check(tmp, reference, sequences, scored_on, tmp / ADAPTER_FILE if adapter_inputs else None)
                manifest.parity = judge(figures, dtype, tolerance)
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


def int4_settings(
    dtype: str,
    target: str,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    head: str | None = None,
    sensitive: str | None = None,
) -> dict | None:
    """The builder's int4 settings with our defaults filled in (None for another dtype); a UserError for
    a setting given with another dtype, or outside its choices (``formats.onnx_dir.INT4_*``).

    ``block_size``: weights per quantization block; ``accuracy_level``: MatMulNBits' compute type (the
    builder's default for ``target`` when None); ``head``: the output head's precision (int4, int8, or
    ``float``: the graph's float type), with a tied embedding; ``sensitive``: the precision of
    llama.cpp's mixed layers (first and last eighth of the layers and every third one's v, qkv and down
    projections), the ones int4 hurts most.
    """
    given = {"block_size": block_size, "accuracy_level": accuracy_level, "head": head, "sensitive": sensitive}
    if dtype != "int4":
        name = next((name for name, value in given.items() if value is not None), None)
        if name is not None:
            raise UserError(f"--int4-{name.replace('_', '-')} does not apply to --dtype {dtype} (int4 settings)")
        return None
    choices = {
        "block_size": INT4_BLOCK_SIZES,
        "accuracy_level": INT4_ACCURACY_LEVELS,
        "head": INT4_HEADS,
        "sensitive": INT4_SENSITIVE,
    }
    for name, value in given.items():
        if value is not None and value not in choices[name]:
            allowed = ", ".join(str(c) for c in choices[name])
            raise UserError(f"--int4-{name.replace('_', '-')} must be one of {allowed}, got {value!r}")
    settings = {**INT4_DEFAULTS, "accuracy_level": BUILDER_ACCURACY_LEVEL.get(target, 0)}
    settings.update({name: value for name, value in given.items() if value is not None})
    return {name: settings[name] for name in given}


def _builder_options(int4: dict | None, tied: bool) -> list[str]:
    """The builder's ``--extra_options`` for our int4 settings (none for another dtype); ``tied``: the
    model ties its embedding to its output head, which the builder then stores once, as one int4 matrix.

    Builder names (onnxruntime-genai 0.18): ``block_size``, ``accuracy_level``,
    ``matmul_mixed_precision`` (``last_matmul``: the head, ``mixed_layers``), ``nodes_to_exclude``.
    An int8 head cannot share the tied int4 embedding (the builder then looks for an int8 embedding it
    never makes, and onnxruntime refuses the graph), so the two are stored apart, the embedding still
    int4; a ``float`` head keeps the tied matrix shared, both unquantized.
    """
    if int4 is None:
        return []
    options = [f"block_size={int4['block_size']}", f"accuracy_level={int4['accuracy_level']}"]
    mixed = []
    if int4["head"] == "int8":
        mixed.append("last_matmul:int8")
        if tied:
            options += ["shared_embeddings=false", "op_types_to_quantize=MatMul/Gather"]
    elif int4["head"] == "float":
        options.append("nodes_to_exclude=/lm_head/MatMul" + (",/model/embed_tokens/Gather" if tied else ""))
    if int4["sensitive"] == "int8":
        mixed.append("mixed_layers:int8")
    if mixed:
        options.append("matmul_mixed_precision=" + ",".join(mixed))
    return options


def _ties_embeddings(source: Path) -> bool:
    """Whether the model in ``source`` ties its embedding to its output head, as the builder reads it."""
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(source, local_files_only=True), "tie_word_embeddings", False))


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


def _build(
    source: Path, output: Path, dtype: str, target: str, cache: Path, lora: Path | None = None, options: list = ()
) -> None:
    """Run the builder on an HF directory (a child process: it loads the whole model itself);
    ``options``: its ``--extra_options`` (``KEY=VALUE``)."""
    argv = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", source.name, "-i", str(source)]
    argv += ["-o", str(output), "-p", dtype, "-e", target, "-c", str(cache)]
    extra = list(options) + ([f"adapter_path={lora}"] if lora is not None else [])
    if extra:
        argv += ["--extra_options", *extra]
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


def _eos_token_ids(source: Path) -> list[int]:
    """The end ids of the model in ``source`` as ``hf.eos_token_ids`` reads a loaded one (its generation
    config's, else its config's), from the config files alone: an unchecked graph loads no model."""
    from types import SimpleNamespace

    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    try:
        generation = GenerationConfig.from_pretrained(source, local_files_only=True)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    return eos_token_ids(SimpleNamespace(generation_config=generation, config=config))


def _vocab_size(model: torch.nn.Module) -> int:
    return model.config.get_text_config().vocab_size


def _context(model: torch.nn.Module) -> int:
    """The longest sequence the check may score: the model's positions, less the greedy run's new tokens."""
    text = model.config.get_text_config()
    positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 2048
    return positions - NEW_TOKENS


def _check(
    graph_dir: Path, reference: torch.nn.Module, sequences: list, scored_on: str, adapter_file: Path | None
) -> dict:
    """``check_optimized``, with onnxruntime-genai's own failures to run the graph as a UserError."""
    try:
        return check_optimized(graph_dir, reference, sequences, scored_on, adapter_file)
    except RuntimeError as exc:  # onnxruntime-genai cannot run it here (a cuda graph without its provider, say)
        raise UserError(f"onnxruntime-genai cannot run the built graph: {str(exc).splitlines()[0]}") from None
