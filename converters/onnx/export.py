"""ONNX export of an AdaLoRA adapter on its base model, checked against torch before it is kept.

Three kinds of graph (``OnnxKind``; ``onnx_manifest.json`` records which):

- ``merged``: the adapter merged into the base weights, one plain graph.
- ``rank_compact``: the base weights plus, for every adapted layer of non-zero rank, a branch
  ``(x @ lora_down) @ lora_up`` at that layer's final rank with the scale folded in.
- ``adapter_inputs``: every adapted layer's branch weights are graph inputs with empty (rank 0)
  defaults, each rank axis named after its layer, so onnxruntime swaps adapters per request
  (``.onnx_adapter`` files, ``RunOptions.add_active_adapter``). Trained non-adapter weights (a
  fresh classification head) are inputs too, defaulting to the base's values.

Every export runs onnxruntime against the torch model (base + unmerged adapter, fp32) on several
batch sizes and lengths, compares unpadded positions, writes the figures into the manifest and
fails with a UserError, leaving nothing behind, when they exceed the tolerance.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from tqdm import tqdm

from adalora_export.adapter import CompactAdapter, model_shapes
from adalora_export.errors import UserError
from adalora_export.formats.onnx_dir import (
    ADAPTER_FILE,
    DTYPES,
    GENAI_CONFIG,
    MANIFEST,
    MAX_OPSET,
    MIN_OPSET,
    Manifest,
    OnnxKind,
    copy_tokenizer_files,
    genai_config,
)
from adalora_export.hf import CAUSAL_LM, SEQ_CLS, TASKS, check_model_dir, eos_token_ids, infer_task
from adalora_export.io import atomic_output_dir, check_output_path, release_freed_memory, write_json
from adalora_export.layer import SVDLinear

from .adapter_file import write_adapter_file
from .branches import PreparedGraph, prepare_model
from .graph import (
    DEFAULT_OPSET,
    GraphSpec,
    GraphWrapper,
    base_weights,
    bind_inputs,
    externalize_weights,
    graph_spec,
    io_signature,
    save_graph,
    trace_to_onnx,
)
from .parity import check_parity, check_tolerance, parity_samples, torch_reference

# Largest accepted max|onnx - torch| / max|torch| over unpadded positions. fp16 rounds every
# weight and activation to 11 significant bits against an fp32 reference. The fp16 trace lands in
# onnxruntime-genai's fp16 class (optimized.py: 5e-3) on real-size models; 1e-2 leaves room for
# tiny ones with small logits, where torch's own fp16 forward is 0.005 off already (GPT-2, hidden 64).
DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


@dataclass(frozen=True)
class _Settings:
    """One export's checked options."""

    kind: OnnxKind
    task: str
    dtype: str
    opset: int
    with_past: bool
    tolerance: float


@dataclass
class _Traced:
    """The traced graph and what checking and saving it needs."""

    proto: onnx.ModelProto | None  # None once saved
    spec: GraphSpec
    prepared: PreparedGraph
    weights: dict[str, torch.Tensor] | None  # the base weights, written beside the graph (None once saved)


def export_onnx(
    adapter: CompactAdapter,
    base_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    kind: OnnxKind = OnnxKind.RANK_COMPACT,
    dtype: str = "fp32",
    opset: int | None = None,
    with_past: bool = False,
    tolerance: float | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Export ``adapter`` on the HF model at ``base_dir`` into the directory ``output``; return the manifest.

    ``kind``: see the module docstring (adapter inputs also write the adapter beside the graph as
    ``adapter.onnx_adapter``). ``with_past`` adds KV-cache inputs/outputs to a causal LM. ``dtype``
    fp16 converts weights, compute and float inputs/outputs. Fails (nothing written) when
    onnxruntime and torch differ by more than ``tolerance`` (relative to the largest reference
    value; default ``DEFAULT_TOLERANCE[dtype]``). A pickled base (``pytorch_model.bin``) is read
    only with ``allow_pickle``.
    """
    kind = _check_options(kind, dtype, opset, tolerance)
    output = check_output_path(output, overwrite, inputs={"the base model": base_dir})
    base_dir = Path(base_dir)
    settings = _settings(adapter, base_dir, kind, dtype, opset, with_past, tolerance)

    with tqdm(total=6, desc=f"ONNX export ({kind.value}, {dtype})", unit="stage") as stages:
        stages.set_postfix_str("loading")
        model, base_extras = _load(adapter, base_dir, allow_pickle)
        samples = parity_samples(model, graph_spec(model, settings.task, with_past))
        stages.update()

        stages.set_postfix_str("torch reference")
        refs, base_refs = _references(model, adapter, settings, samples, base_dir)
        stages.update()

        stages.set_postfix_str("tracing")
        traced = _trace(model, adapter, settings, base_extras, samples[0])
        stages.update()

        stages.set_postfix_str("manifest")
        manifest = _manifest(adapter, model, settings, base_dir, traced, base_extras, samples[0])
        stages.update()

        with atomic_output_dir(output, overwrite) as tmp:
            stages.set_postfix_str("saving")
            model_path = _save(traced, model, adapter, manifest, base_dir, tmp)
            del model  # the graph and the references are all the check needs: free the torch weights first
            release_freed_memory()
            stages.update()

            stages.set_postfix_str("onnxruntime check")
            manifest.parity = check_parity(
                model_path, manifest.to_dict(), traced.spec, samples, refs, base_refs, settings.tolerance
            )
            write_json(tmp / MANIFEST, manifest.to_dict())
            stages.update()
    return manifest.to_dict()


def _check_options(kind: OnnxKind | str, dtype: str, opset: int | None, tolerance: float | None) -> OnnxKind:
    """The kind as an ``OnnxKind``; a UserError for an unknown kind or dtype or a bad opset or tolerance."""
    try:
        kind = OnnxKind(kind)
    except ValueError:
        raise UserError(f"unknown ONNX kind {kind!r}: expected one of {', '.join(k.value for k in OnnxKind)}") from None
    if kind == OnnxKind.OPTIMIZED:
        raise UserError("optimized graphs are built by onnxruntime-genai's builder: use export_optimized")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: expected fp32 or fp16")
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET}")
    check_tolerance(tolerance)
    return kind


def _settings(
    adapter: CompactAdapter,
    base_dir: Path,
    kind: OnnxKind,
    dtype: str,
    opset: int | None,
    with_past: bool,
    tolerance: float | None,
) -> _Settings:
    """The export's settings; a UserError for a base the adapter does not fit or a cache on a non-LM."""
    base_config = check_model_dir(base_dir)
    adapter.check_head(base_config, str(base_dir))
    task = _task(adapter, base_config)
    if with_past and task != CAUSAL_LM:
        raise UserError(f"--with-past needs a causal LM; {base_dir} is a {task} model")
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    return _Settings(kind, task, dtype, opset or DEFAULT_OPSET, with_past, tolerance)


def _load(adapter: CompactAdapter, base_dir: Path, allow_pickle: bool) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(the base model, the base's own values of the adapter's extra weights).

    In the base's own dtype: a bf16 base is never held in fp32 whole (torch_reference computes in
    fp32 module by module); the adapter's trained head weights stay fp32 for the reference.
    """
    model = adapter.load_base(base_dir, allow_pickle=allow_pickle, dtype="auto")
    adapter.check_fits(*model_shapes(model), base=str(base_dir))
    for name in adapter.extra_weights:
        model.get_parameter(name).data = model.get_parameter(name).data.float()
    base_extras = {name: model.get_parameter(name).detach().clone() for name in adapter.extra_weights}
    return model, base_extras


def _references(
    model: nn.Module, adapter: CompactAdapter, settings: _Settings, samples: list[dict], base_dir: Path
) -> tuple[list, list | None]:
    """(torch's outputs with the adapter, the base's own for adapter inputs, else None), in fp32; the
    adapter is applied to ``model`` on the way."""
    task, with_past, adapter_inputs = settings.task, settings.with_past, settings.kind == OnnxKind.ADAPTER_INPUTS
    try:
        base_refs = torch_reference(model, task, with_past, samples) if adapter_inputs else None
        adapter.apply_to(model, base=str(base_dir))
        return torch_reference(model, task, with_past, samples), base_refs
    except ValueError as exc:  # transformers' decoder classifiers find each row's last token by the pad id
        if "padding token" not in str(exc):
            raise
        raise UserError(
            f"the {model.config.model_type} classifier needs a pad token id for batches, and neither the adapter "
            f"nor {base_dir}/config.json records one: set pad_token_id in that config (train records its own)"
        ) from None


def _task(adapter: CompactAdapter, config: dict) -> str:
    # The adapter's task wins over the base's architectures: a seq_cls adapter on a plain encoder
    # checkpoint brings its own classification head.
    return adapter.task_type if adapter.task_type in TASKS else infer_task(config)


def _trace(
    model: nn.Module,
    adapter: CompactAdapter,
    settings: _Settings,
    base_extras: dict[str, torch.Tensor],
    sample: dict[str, torch.Tensor],
) -> _Traced:
    """Cast the model to the export's dtype, prepare it for its kind, trace it on ``sample`` and bind
    its inputs. The base weights are traced as inputs and kept aside for ``save_graph``.

    fp16 traces the model cast to fp16, so the graph computes what transformers computes in fp16:
    its models keep norm statistics, rotary angles and softmax in fp32 by explicit casts, which the
    trace records. (Converting an fp32 graph afterwards, as onnxruntime's float16 tool does, rounds
    those to fp16 too, and each blocked op's output on its way to the next: the 748M Llama of
    bench_merge.py came out at 0.027 relative error that way; traced in fp16, 0.0016.)
    Attention is traced in its eager form: the TorchScript exporter's SDPA symbolic computes in fp32
    and hands fp32 to the fp16 layers after it, a graph onnxruntime refuses.
    """
    dtype = torch.float16 if settings.dtype == "fp16" else torch.float32
    if settings.dtype == "fp16":
        model.set_attn_implementation("eager")
    _cast_base(model, dtype)
    prepared = prepare_model(model, adapter, settings.kind, base_extras)  # merges in fp32, rounds once
    spec = graph_spec(model, settings.task, settings.with_past, list(prepared.swappable))
    weights = base_weights(model, exclude=set(prepared.swappable))
    data = [sample[name] for name in spec.data_inputs + spec.past_inputs]
    data = [t.to(dtype) if t.is_floating_point() else t for t in data]
    swappable = [t.to(dtype) for t in prepared.swappable.values()]
    if settings.dtype == "fp16":
        for values in (prepared.constants, prepared.defaults):
            values.update({name: value.astype(np.float16) for name, value in values.items()})
    tracing = dataclasses.replace(spec, swappable=spec.swappable + list(weights))
    proto = trace_to_onnx(
        GraphWrapper(model, tracing).eval(), data + swappable + list(weights.values()), prepared.axes, settings.opset
    )
    external = externalize_weights(proto, weights)
    bind_inputs(proto, prepared.constants, prepared.defaults)
    return _Traced(proto, spec, prepared, external)


def _cast_base(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the model's float parameters to ``dtype``, but not the adapter's (SVDLinear's own), which
    stay fp32 until merged or turned into branches. Buffers keep their dtype (rotary inverse
    frequencies stay fp32, as transformers computes them).

    bf16 -> fp16 is done in place, a block at a time: the new weights take the old ones' memory
    (for a memory-mapped checkpoint, its private pages), so the model is never held twice.
    """
    for module in model.modules():
        if isinstance(module, SVDLinear):
            continue
        for param in module._parameters.values():
            if param is None or not param.is_floating_point() or param.dtype == dtype:
                continue
            old = param.data
            if old.element_size() != dtype.itemsize or not old.is_contiguous():
                param.data = old.to(dtype)
                continue
            src, dst = old.view(-1), old.view(dtype).view(-1)
            for start in range(0, src.numel(), 2**22):
                dst[start : start + 2**22] = src[start : start + 2**22].to(dtype)  # read the block, then write it
            param.data = dst.view(old.shape)


def _manifest(
    adapter: CompactAdapter,
    model: nn.Module,
    settings: _Settings,
    base_dir: Path,
    traced: _Traced,
    base_extras: dict[str, torch.Tensor],
    sample: dict[str, torch.Tensor],
) -> Manifest:
    """What a server (and a person) needs to know about the graph, parity figures aside."""
    adapter_inputs = settings.kind == OnnxKind.ADAPTER_INPUTS
    inputs, outputs = io_signature(traced.proto, exclude=set(traced.prepared.defaults))
    return Manifest(
        kind=settings.kind,
        task=settings.task,
        model_type=model.config.model_type,
        dtype=settings.dtype,
        opset=settings.opset,
        with_past=settings.with_past,
        exporter=f"torch.onnx TorchScript exporter, torch {torch.__version__}",
        base_model_name_or_path=str(base_dir.absolute()),  # the base this graph was built from
        adapter_inputs=adapter_inputs,
        init_r=adapter.config.init_r,
        lora_alpha=adapter.config.lora_alpha,
        scale=adapter.scale,
        rank_pattern=adapter.rank_pattern,
        branches=traced.prepared.branches,
        extra_inputs={n: list(t.shape) for n, t in base_extras.items()} if adapter_inputs else {},
        eos_token_ids=eos_token_ids(model),
        labels={str(k): v for k, v in (model.config.id2label or {}).items()} if settings.task == SEQ_CLS else {},
        head_in_base=infer_task(check_model_dir(base_dir)) == SEQ_CLS if settings.task == SEQ_CLS else None,
        max_length=adapter.task_info.max_length,
        pad_token_id=model.config.pad_token_id,
        inputs=inputs,
        outputs=outputs,
        cache=_cache_info(sample, traced.spec) if settings.with_past else None,
        # A causal LM with a KV cache: onnxruntime-genai can run it as it is, given its config.
        genai_config=GENAI_CONFIG if settings.with_past else None,
        adapter_file=ADAPTER_FILE if adapter_inputs else None,
    )


def _save(
    traced: _Traced, model: nn.Module, adapter: CompactAdapter, manifest: Manifest, base_dir: Path, directory: Path
) -> Path:
    """Write the graph, config, tokenizer, ``genai_config.json`` and (adapter inputs) the adapter file
    the manifest names into ``directory``.

    Drops the in-memory graph once saved. Returns the path of ``model.onnx``.
    """
    model_path = save_graph(traced.proto, directory, traced.weights)
    traced.proto = traced.weights = None  # on disk now: free their memory before the onnxruntime check
    model.config.architectures = [type(model).__name__]  # the task exported, whatever the base said
    model.config.save_pretrained(directory)
    copy_tokenizer_files(base_dir, directory)
    if manifest.genai_config:
        write_json(directory / manifest.genai_config, genai_config(manifest.to_dict(), model.config.to_dict()))
    if manifest.adapter_file:
        write_adapter_file(adapter, manifest.to_dict(), directory / manifest.adapter_file)
    return model_path


def _cache_info(sample: dict[str, torch.Tensor], spec: GraphSpec) -> dict:
    key = sample[spec.past_inputs[0]]
    return {
        "inputs": spec.past_inputs,
        "outputs": spec.present_outputs,
        "num_layers": spec.num_layers,
        "num_kv_heads": key.shape[1],
        "head_dim": key.shape[3],
    }
