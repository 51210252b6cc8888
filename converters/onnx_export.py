"""ONNX export of an AdaLoRA adapter on its base model, checked against torch before it is kept.

Three kinds of graph (``onnx_manifest.json`` records which):

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

import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from adalora_export.adapter import CompactAdapter
from adalora_export.errors import UserError
from adalora_export.hf import CAUSAL_LM, ENCODER, SEQ_CLS, TASKS, check_model_dir, infer_task, load_pretrained
from adalora_export.io import atomic_output_dir, atomic_output_file, check_output_path, write_json
from adalora_export.layer import is_adaptable
from adalora_export.model import adapted_layers, unwrap_adapters

from .onnx_graph import (
    DEFAULT_OPSET,
    DOWN,
    MAX_OPSET,
    MIN_OPSET,
    UP,
    GraphSpec,
    GraphWrapper,
    LowRankBranch,
    bind_inputs,
    branch_weights,
    graph_spec,
    io_signature,
    rank_axis,
    save_graph,
    to_fp16,
    trace_to_onnx,
)
from .serving import ADAPTER_FILE, MANIFEST, check_onnx_dir, create_session

DTYPES = ("fp32", "fp16")
# Largest accepted max|onnx - torch| / max|torch| over unpadded positions. fp16 rounds every
# weight and activation to 11 significant bits against an fp32 reference.
DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "generation_config.json",
)
_PEFT_TASKS = {"CAUSAL_LM": CAUSAL_LM, "SEQ_CLS": SEQ_CLS, "FEATURE_EXTRACTION": ENCODER}


def export_onnx(
    adapter_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    merge: bool = False,
    dtype: str = "fp32",
    opset: int | None = None,
    with_past: bool = False,
    adapter_inputs: bool = False,
    tolerance: float | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Read the adapter at ``adapter_dir`` and export it on ``base`` (see ``export_adapter_onnx``)."""
    _check_options(merge, dtype, opset, adapter_inputs, tolerance)
    check_output_path(output, overwrite)
    from adalora_export.formats import load_adapter

    adapter = load_adapter(adapter_dir, allow_pickle=allow_pickle)
    return export_adapter_onnx(
        adapter,
        output,
        base=base,
        merge=merge,
        dtype=dtype,
        opset=opset,
        with_past=with_past,
        adapter_inputs=adapter_inputs,
        tolerance=tolerance,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
    )


def export_adapter_onnx(
    adapter: CompactAdapter,
    output: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    merge: bool = False,
    dtype: str = "fp32",
    opset: int | None = None,
    with_past: bool = False,
    adapter_inputs: bool = False,
    tolerance: float | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Export ``adapter`` on the HF model at ``base`` into the directory ``output``; return the manifest.

    ``merge``: a merged graph; ``adapter_inputs``: hot-swappable adapter inputs (the adapter is
    written beside the graph as ``adapter.onnx_adapter``); neither: a rank-compact graph.
    ``with_past`` adds KV-cache inputs/outputs to a causal LM. ``dtype`` fp16 converts weights,
    compute and float inputs/outputs. Fails (nothing written) when onnxruntime and torch differ
    by more than ``tolerance`` (relative to the largest reference value). A pickled base
    (``pytorch_model.bin``) is read only with ``allow_pickle``.
    """
    _check_options(merge, dtype, opset, adapter_inputs, tolerance)
    output = check_output_path(output, overwrite)
    opset = opset or DEFAULT_OPSET
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    kind = "merged" if merge else "adapter_inputs" if adapter_inputs else "rank_compact"
    base_dir = _base_dir(adapter, base)
    task = _task(adapter, check_model_dir(base_dir))
    if with_past and task != CAUSAL_LM:
        raise UserError(f"--with-past needs a causal LM; {base_dir} is a {task} model")

    with tqdm(total=6, desc=f"ONNX export ({kind}, {dtype})", unit="stage") as stages:
        stages.set_postfix_str("loading")
        model = load_pretrained(base_dir, task, allow_pickle=allow_pickle, dtype=torch.float32).eval()
        _check_fits(adapter, model, base_dir)
        samples = parity_samples(model, graph_spec(model, task, with_past))
        stages.update()

        stages.set_postfix_str("torch reference")
        base_extras = {name: model.get_parameter(name).detach().clone() for name in adapter.extra_weights}
        base_refs = _reference(model, task, with_past, samples) if kind == "adapter_inputs" else None
        adapter.apply_to(model)
        refs = _reference(model, task, with_past, samples)
        stages.update()

        stages.set_postfix_str("tracing")
        swappable, constants, defaults, axes, branches = _prepare(model, adapter, kind, base_extras)
        spec = graph_spec(model, task, with_past, list(swappable))
        trace_values = [samples[0][name] for name in spec.data_inputs + spec.past_inputs] + list(swappable.values())
        proto = trace_to_onnx(GraphWrapper(model, spec).eval(), trace_values, axes, opset)
        bind_inputs(proto, constants, defaults)
        stages.update()

        stages.set_postfix_str("fp16" if dtype == "fp16" else "manifest")
        if dtype == "fp16":
            proto = to_fp16(proto)
        manifest = _manifest(adapter, model, kind, task, dtype, opset, with_past, base_dir, branches, base_extras)
        manifest["inputs"], manifest["outputs"] = io_signature(proto, exclude=set(defaults))
        if with_past:
            manifest["cache"] = _cache_info(samples[0], spec)
        stages.update()

        with atomic_output_dir(output, overwrite) as tmp:
            stages.set_postfix_str("saving")
            model_path = save_graph(proto, tmp)
            del proto
            model.config.architectures = [type(model).__name__]  # the task exported, whatever the base said
            model.config.save_pretrained(tmp)
            for name in TOKENIZER_FILES:
                if (base_dir / name).is_file():
                    shutil.copyfile(base_dir / name, tmp / name)
            if kind == "adapter_inputs":
                manifest["adapter_file"] = ADAPTER_FILE
                _write_adapter_file(adapter, manifest, tmp / ADAPTER_FILE)
            stages.update()

            stages.set_postfix_str("onnxruntime check")
            manifest["parity"] = check_parity(model_path, manifest, spec, samples, refs, base_refs, tolerance)
            write_json(tmp / MANIFEST, manifest)
            stages.update()
    return manifest


def write_onnx_adapter(
    adapter: CompactAdapter, onnx_dir: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write ``adapter`` as an ``.onnx_adapter`` file for the adapter-input graph in ``onnx_dir``.

    Any AdaLoRA adapter for the same base fits, whatever its ranks, as long as its modules are
    among the graph's adapted layers (a layer the adapter leaves out, or at rank 0, stays the base).
    """
    _, manifest = check_onnx_dir(onnx_dir)
    if manifest.get("kind") != "adapter_inputs":
        raise UserError(f"{onnx_dir} was exported without --adapter-inputs; adapters cannot be swapped into it")
    with atomic_output_file(output, overwrite) as tmp:
        _write_adapter_file(adapter, manifest, tmp)
    return Path(output)


def export_onnx_adapter(
    adapter_dir: str | os.PathLike,
    onnx_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Read the adapter at ``adapter_dir`` and write it for ``onnx_dir`` (see ``write_onnx_adapter``)."""
    check_output_path(output, overwrite)
    from adalora_export.formats import load_adapter

    return write_onnx_adapter(load_adapter(adapter_dir, allow_pickle=allow_pickle), onnx_dir, output, overwrite)


def _manifest(adapter, model, kind, task, dtype, opset, with_past, base_dir, branches, base_extras) -> dict:
    """What a server (and a person) needs to know about the graph, parity figures aside."""
    return {
        "format": "adalora-export-onnx",
        "version": 1,
        "kind": kind,
        "task": task,
        "model_type": model.config.model_type,
        "dtype": dtype,
        "opset": opset,
        "with_past": with_past,
        "exporter": f"torch.onnx TorchScript exporter, torch {torch.__version__}",
        "base_model_name_or_path": adapter.base_model_name_or_path or str(base_dir),
        "init_r": adapter.config.init_r,
        "lora_alpha": adapter.config.lora_alpha,
        "scale": adapter.scale,
        "rank_pattern": adapter.rank_pattern,
        "branches": branches,
        "extra_inputs": {n: list(t.shape) for n, t in base_extras.items()} if kind == "adapter_inputs" else {},
        "eos_token_ids": _eos_ids(model),
        "labels": {str(k): v for k, v in (model.config.id2label or {}).items()} if task == SEQ_CLS else {},
    }


# -- checks and preparation ---------------------------------------------------------------------


def _check_options(merge: bool, dtype: str, opset: int | None, adapter_inputs: bool, tolerance: float | None) -> None:
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: expected fp32 or fp16")
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET}")
    if merge and adapter_inputs:
        raise UserError("--adapter-inputs keeps the adapter out of the weights; it cannot be combined with --merge")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
        raise UserError(f"tolerance must be a positive number, got {tolerance}")


def _base_dir(adapter: CompactAdapter, base: str | os.PathLike | None) -> Path:
    if base is not None:
        return Path(base)
    name = adapter.base_model_name_or_path
    if name and Path(name).is_dir():
        return Path(name)
    raise UserError(f"pass --base: the adapter's base model {name!r} is not a local directory")


def _task(adapter: CompactAdapter, config: dict) -> str:
    # The adapter's task wins over the base's architectures: a seq_cls adapter on a plain encoder
    # checkpoint brings its own classification head. (Ours are named as in hf.py, PEFT's in capitals.)
    task = _PEFT_TASKS.get(adapter.task_type, adapter.task_type)
    return task if task in TASKS else infer_task(config)


def _check_fits(adapter: CompactAdapter, model: nn.Module, base_dir: Path) -> None:
    """Every adapter module exists in the base with its shapes, every extra weight too; else a UserError."""
    modules = dict(model.named_modules())
    for path, module in adapter.modules.items():
        layer = modules.get(path)
        if layer is None or not is_adaptable(layer):
            raise UserError(f"adapter module {path} is not a linear layer of {base_dir}: an adapter for another base?")
        out_f, in_f = layer.weight.shape if isinstance(layer, nn.Linear) else layer.weight.shape[::-1]
        if (in_f, out_f) != (module.in_features, module.out_features):
            raise UserError(
                f"adapter module {path} is {module.out_features}x{module.in_features}, "
                f"the base model {base_dir} has {out_f}x{in_f}: an adapter for another base?"
            )
    params = dict(model.named_parameters())
    for name, value in adapter.extra_weights.items():
        if name not in params or params[name].shape != value.shape:
            raise UserError(f"adapter weight {name} {tuple(value.shape)} does not fit the base model {base_dir}")


def _prepare(model: nn.Module, adapter: CompactAdapter, kind: str, base_extras: dict[str, torch.Tensor]):
    """Rewrite the adapted model (SVDLinear layers) for ``kind``.

    Returns (swappable: input name -> tracing value, constants, defaults, dynamic axes of the
    swappable inputs, branches for the manifest).
    """
    swappable: dict[str, torch.Tensor] = {}
    constants: dict[str, np.ndarray] = {}
    defaults: dict[str, np.ndarray] = {}
    axes: dict[str, dict[int, str]] = {}
    branches: dict = {}
    if kind == "merged":
        unwrap_adapters(model)
        return swappable, constants, defaults, axes, branches
    for path, layer in list(adapted_layers(model)):
        down, up = branch_weights(adapter, path)
        if kind == "rank_compact" and layer.rank == 0:
            _replace(model, path, layer.base_layer)  # rank 0: no branch at all
            continue
        if kind == "adapter_inputs" and layer.rank == 0:
            # Traced at rank 1 (a zero-size trace could specialise); the rank axis stays symbolic.
            down, up = torch.zeros(layer.in_features, 1), torch.zeros(1, layer.out_features)
        _replace(model, path, LowRankBranch(layer.base_layer, down, up))
        names = (path + DOWN, path + UP)
        swappable.update(zip(names, (down, up)))
        if kind == "rank_compact":
            constants.update(zip(names, (down.numpy(), up.numpy())))
            branches[path] = layer.rank
        else:
            axis = rank_axis(path)
            axes[names[0]], axes[names[1]] = {1: axis}, {0: axis}
            defaults[names[0]] = np.zeros((layer.in_features, 0), np.float32)
            defaults[names[1]] = np.zeros((0, layer.out_features), np.float32)
            branches[path] = {
                "down": names[0],
                "up": names[1],
                "in": layer.in_features,
                "out": layer.out_features,
                "rank_axis": axis,
            }
    if kind == "adapter_inputs":
        # Trained head weights become inputs defaulting to the base's: no active adapter = the base.
        for name, value in base_extras.items():
            model.get_parameter(name).data.copy_(value)
            swappable[name] = value
            defaults[name] = value.float().numpy()
    return swappable, constants, defaults, axes, branches


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def _eos_ids(model: nn.Module) -> list[int]:
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _cache_info(sample: dict[str, torch.Tensor], spec: GraphSpec) -> dict:
    key = sample[spec.past_inputs[0]]
    return {
        "inputs": spec.past_inputs,
        "outputs": spec.present_outputs,
        "num_layers": spec.num_layers,
        "num_kv_heads": key.shape[1],
        "head_dim": key.shape[3],
    }


# -- parity ---------------------------------------------------------------------------------------


def parity_samples(model: nn.Module, spec: GraphSpec, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Inputs of several batch sizes and lengths, row 1 padded (left for causal LMs, right otherwise).

    With a cache: (batch, new tokens, past) = (2, 4, 3), (1, 6, 0) (a prompt) and (3, 1, 9) (a
    decode step); without: (batch, length) = (3, 11), (1, 6), (2, 1). The first one is traced: no
    size 0 or 1 there, which the tracer could take for a constant.
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    shapes = [(2, 4, 3), (1, 6, 0), (3, 1, 9)] if spec.with_past else [(3, 11, 0), (1, 6, 0), (2, 1, 0)]
    if spec.with_past:
        with torch.no_grad():
            probe = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True).cache
        kv_heads, head_dim = probe.layers[0].keys.shape[1], probe.layers[0].keys.shape[3]
    samples = []
    for batch, length, past in shapes:
        total = past + length
        mask = torch.ones(batch, total, dtype=torch.long)
        if batch > 1:
            pad = min(batch + 1, total - 1)
            if spec.task == CAUSAL_LM:
                mask[1, :pad] = 0
            else:
                mask[1, total - pad :] = 0
        sample = {"input_ids": torch.randint(0, vocab, (batch, length), generator=gen), "attention_mask": mask}
        if "position_ids" in spec.data_inputs:
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            sample["position_ids"] = positions[:, past:]
        if "token_type_ids" in spec.data_inputs:
            sample["token_type_ids"] = torch.zeros(batch, length, dtype=torch.long)
        for name in spec.past_inputs:
            sample[name] = torch.randn(batch, kv_heads, past, head_dim, generator=gen)
        samples.append(sample)
    return samples


def _reference(model: nn.Module, task: str, with_past: bool, samples: list[dict]) -> list[tuple[torch.Tensor, ...]]:
    spec = graph_spec(model, task, with_past)
    wrapper = GraphWrapper(model, spec).eval()
    with torch.no_grad():
        return [
            tuple(t.float() for t in wrapper(*(s[n] for n in spec.data_inputs + spec.past_inputs))) for s in samples
        ]


def _valid(sample: dict[str, torch.Tensor], spec: GraphSpec, output: str) -> np.ndarray | None:
    """Boolean mask of the output positions to compare (unpadded tokens), None for all."""
    if output.startswith("present.") or spec.task == SEQ_CLS:
        return None
    length = sample["input_ids"].shape[1]
    return sample["attention_mask"][:, -length:].bool().numpy()


def check_parity(
    model_path: Path,
    manifest: dict,
    spec: GraphSpec,
    samples: list[dict],
    refs: list[tuple[torch.Tensor, ...]],
    base_refs: list[tuple[torch.Tensor, ...]] | None,
    tolerance: float,
) -> dict:
    """Run onnxruntime (CPU) on every sample, compare with torch, raise UserError past ``tolerance``.

    Adapter-input graphs are checked twice: with their adapter active (against base + adapter)
    and with none (against the base).
    """
    import onnxruntime as ort

    session = create_session(model_path, "cpu")
    float_type = np.float16 if manifest["dtype"] == "fp16" else np.float32
    runs = [("adapter", refs, None)]
    if base_refs is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(model_path.parent / ADAPTER_FILE))
        options = ort.RunOptions()
        options.add_active_adapter(lora)
        runs = [("adapter", refs, options), ("none", base_refs, None)]
    checks, worst = [], 0.0
    for active, references, options in runs:
        for sample, ref in zip(samples, references):
            feeds = {k: v.numpy().astype(float_type) if v.is_floating_point() else v.numpy() for k, v in sample.items()}
            outputs = session.run(spec.output_names, feeds, options)
            for name, got, want in zip(spec.output_names, outputs, ref):
                got, want = got.astype(np.float32), want.numpy()
                valid = _valid(sample, spec, name)
                if valid is not None:
                    got, want = got[valid], want[valid]
                if want.size == 0:
                    continue
                error = float(np.abs(got - want).max())
                relative = error / max(float(np.abs(want).max()), 1e-12)
                worst = max(worst, relative)
                past = sample[spec.past_inputs[0]].shape[2] if spec.with_past else 0
                checks.append(
                    {
                        "output": name,
                        "adapter": active,
                        "batch": int(sample["input_ids"].shape[0]),
                        "sequence": int(sample["input_ids"].shape[1]),
                        "past": int(past),
                        "max_abs_error": error,
                        "relative_error": relative,
                    }
                )
    if not math.isfinite(worst) or worst > tolerance:
        raise UserError(
            f"onnxruntime differs from torch by {worst:.3g} (relative) on {model_path.name}, "
            f"over the tolerance {tolerance:g}; nothing written"
        )
    return {
        "reference": "torch fp32, base model + unmerged adapter",
        "metric": "max |onnxruntime - torch| / max |torch| over unpadded positions",
        "tolerance": tolerance,
        "max_relative_error": worst,
        "checks": checks,
    }


def _write_adapter_file(adapter: CompactAdapter, manifest: dict, path: Path) -> None:
    """The adapter's branch (and head) weights as onnxruntime adapter parameters, in the graph's dtype."""
    import onnxruntime as ort

    branches, extras = manifest["branches"], manifest.get("extra_inputs", {})
    float_type = np.float16 if manifest["dtype"] == "fp16" else np.float32
    params = {}
    for path_, module in adapter.modules.items():
        branch = branches.get(path_)
        if branch is None:
            raise UserError(
                f"adapter module {path_} is not an adapted layer of this graph: an adapter for another base?"
            )
        if (branch["in"], branch["out"]) != (module.in_features, module.out_features):
            raise UserError(
                f"adapter module {path_} is {module.out_features}x{module.in_features}, the graph's layer is "
                f"{branch['out']}x{branch['in']}: an adapter for another base?"
            )
        if module.rank == 0:
            continue  # the graph's empty default is exactly rank 0
        down, up = branch_weights(adapter, path_)
        params[branch["down"]] = down.numpy().astype(float_type)
        params[branch["up"]] = up.numpy().astype(float_type)
    for name, value in adapter.extra_weights.items():
        if name not in extras or list(value.shape) != extras[name]:
            raise UserError(f"adapter weight {name} {tuple(value.shape)} is not an input of this graph")
        params[name] = value.float().numpy().astype(float_type)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for name, v in params.items()})
    fmt.export_adapter(str(path))


__all__ = [
    "DEFAULT_TOLERANCE",
    "check_parity",
    "export_adapter_onnx",
    "export_onnx",
    "export_onnx_adapter",
    "parity_samples",
    "write_onnx_adapter",
]
