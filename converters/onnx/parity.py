"""The export's own check: onnxruntime (CPU) against the torch model on several shapes.

The reference is torch fp32 on the base model with the adapter unmerged; the samples vary batch,
length (and past length with a cache) and pad one row, and only unpadded positions are compared.
The session here is a plain CPU ``InferenceSession`` of its own: the runtime (``serving``) is a
later stage that the converters never import.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adalora_export.errors import UserError
from adalora_export.formats.onnx_dir import ADAPTER_FILE
from adalora_export.hf import CAUSAL_LM, SEQ_CLS

from .graph import GraphSpec, GraphWrapper, graph_spec
from .partition import DEFAULT_PART_BYTES, run_in_parts

_QUIET = 3  # onnxruntime log severity: errors only (no "initializer in graph inputs" warnings)


def check_tolerance(tolerance: float | None) -> None:
    """A UserError unless ``tolerance`` is None (the dtype's default) or a positive finite number.

    Both exporters' checks take one (``check_parity`` here, onnxruntime-genai's in ``optimized``)."""
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
        raise UserError(f"tolerance must be a positive number, got {tolerance}")


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
        if spec.with_past:
            sample.update(_past(model, spec, mask[:, :past], gen, (batch, kv_heads, past, head_dim)))
        samples.append(sample)
    return samples


def _past(model: nn.Module, spec: GraphSpec, mask: torch.Tensor, gen: torch.Generator, shape: tuple) -> dict:
    """A cache as the model itself writes it for a random prefix (masked positions: random values, which
    the graph must ignore). Random values everywhere would feed attention keys and values of a scale the
    model never makes; on SmolLM2 (30 layers, large activations) that alone put a correct graph 2.5e-4
    off torch, against 4e-6 to 8e-6 with prompts of its own."""
    past = {name: torch.randn(*shape, generator=gen) for name in spec.past_inputs}
    if shape[2] == 0:
        return past
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, shape[:1] + shape[2:3], generator=gen)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad(), _in_fp32(model):
        cache = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True).cache
    keep = mask.bool()[:, None, :, None]
    for i, layer in enumerate(cache.layers[: spec.num_layers]):
        for kind, values in (("key", layer.keys), ("value", layer.values)):
            name = f"past_key_values.{i}.{kind}"
            past[name] = torch.where(keep, values.float(), past[name])
    return past


def torch_reference(
    model: nn.Module, task: str, with_past: bool, samples: list[dict]
) -> list[tuple[torch.Tensor, ...]]:
    """The model's outputs, computed in fp32, on every sample, in the graph's output order.

    A bf16 or fp16 model stays in its dtype: each module's parameters are cast to fp32 for its own
    call only (``_in_fp32``), so the reference costs one module's fp32 copy, not the model's. A model
    that reads another module's weight directly fails that way; it is then cast to fp32 whole.
    """
    spec = graph_spec(model, task, with_past)
    wrapper = GraphWrapper(model, spec).eval()

    def run() -> list[tuple[torch.Tensor, ...]]:
        with torch.no_grad(), _in_fp32(model):
            return [
                tuple(t.float() for t in wrapper(*(s[n] for n in spec.data_inputs + spec.past_inputs))) for s in samples
            ]

    try:
        return run()
    except RuntimeError as exc:
        if "dtype" not in str(exc) and "scalar type" not in str(exc):
            raise
        model.float()
        return run()


_LOW = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def _in_fp32(model: nn.Module) -> Iterator[None]:
    """Run a bf16/fp16 model in fp32 without an fp32 copy of it; the model leaves as it came.

    ``nn.Linear`` multiplies by its weight cast to fp32 a block of output rows at a time (an output
    head of 32000 x 2048 would otherwise be a 256 MB copy); ``nn.Embedding`` looks up in its own
    dtype and casts the rows it returns (exact); any other module has its low-precision parameters
    cast to fp32 for its own call (bf16/fp16 -> fp32 -> back is exact).
    """
    handles, overridden = [], []

    def up(module: nn.Module, args) -> None:
        module._fp32_dtypes = {}
        for param in module._parameters.values():
            if param is not None and param.dtype in _LOW:
                module._fp32_dtypes[id(param)] = param.dtype
                param.data = param.data.float()

    def down(module: nn.Module, args, output) -> None:
        dtypes = getattr(module, "_fp32_dtypes", {})
        for param in module._parameters.values():
            if param is not None and id(param) in dtypes:
                param.data = param.data.to(dtypes[id(param)])
        module._fp32_dtypes = {}

    for module in model.modules():
        if not any(p is not None and p.dtype in _LOW for p in module._parameters.values()):
            continue
        if type(module) is nn.Linear:
            module.forward = functools.partial(_linear_in_fp32, module)
            overridden.append(module)
        elif type(module) is nn.Embedding:
            module.forward = functools.partial(lambda m, ids: nn.Embedding.forward(m, ids).float(), module)
            overridden.append(module)
        else:
            handles += [module.register_forward_pre_hook(up), module.register_forward_hook(down)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in overridden:
            del module.forward
        for module in model.modules():
            if getattr(module, "_fp32_dtypes", None):  # a call that raised: put its parameters back
                down(module, None, None)
            if hasattr(module, "_fp32_dtypes"):
                del module._fp32_dtypes


def _linear_in_fp32(module: nn.Linear, x: torch.Tensor, block_bytes: int = 2**26) -> torch.Tensor:
    """``module(x)`` in fp32, the weight cast a block of output rows at a time."""
    weight, bias, x = module.weight, module.bias, x.float()
    rows = max(1, block_bytes // (4 * weight.shape[1]))
    outs = [
        nn.functional.linear(x, weight[i : i + rows].float(), None if bias is None else bias[i : i + rows].float())
        for i in range(0, weight.shape[0], rows)
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


@dataclass
class _Run:
    """One pass over the samples: which adapter is active (as the report names it) and against what."""

    adapter: str  # "adapter" or "none"
    references: list[tuple[torch.Tensor, ...]]
    options: object = None  # onnxruntime RunOptions with the adapter active, or None


def check_parity(
    model_path: Path,
    manifest: dict,
    spec: GraphSpec,
    samples: list[dict],
    refs: list[tuple[torch.Tensor, ...]],
    base_refs: list[tuple[torch.Tensor, ...]] | None,
    tolerance: float,
    part_bytes: int = DEFAULT_PART_BYTES,
) -> dict:
    """Run onnxruntime (CPU) on every sample, compare with torch, raise UserError past ``tolerance``.

    The graph runs in parts of about ``part_bytes`` of weights (``partition.run_in_parts``), so the
    check holds one part's weights at a time, not the whole graph's.

    Adapter-input graphs (``base_refs`` given) are checked twice: with their adapter
    (``adapter.onnx_adapter`` beside the graph) active against base + adapter, and with none
    against the base.
    """
    import onnxruntime as ort

    float_type = np.float16 if manifest["dtype"] == "fp16" else np.float32
    runs = [_Run("adapter", refs)]
    if base_refs is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(model_path.parent / ADAPTER_FILE))
        options = ort.RunOptions()
        options.add_active_adapter(lora)
        runs = [_Run("adapter", refs, options), _Run("none", base_refs)]
    feeds = [
        {k: v.numpy().astype(float_type) if v.is_floating_point() else v.numpy() for k, v in sample.items()}
        for sample in samples
    ]
    jobs = [(sample_feeds, run.options) for run in runs for sample_feeds in feeds]
    outputs = iter(run_in_parts(model_path, jobs, spec.output_names, _cpu_session, part_bytes))
    checks = []
    for run in runs:
        for sample, ref in zip(samples, run.references):
            checks += _compare(spec, sample, run.adapter, next(outputs), ref)
    worst = 0.0
    for check in checks:  # a running max, as the figures came
        worst = max(worst, check["relative_error"])
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


def _compare(spec: GraphSpec, sample: dict, active: str, outputs: list, ref: tuple) -> list[dict]:
    """One check entry per output of one sample with anything to compare."""
    checks = []
    past = sample[spec.past_inputs[0]].shape[2] if spec.with_past else 0
    for name, got, want in zip(spec.output_names, outputs, ref):
        got, want = got.astype(np.float32), want.numpy()
        valid = _valid(sample, spec, name)
        if valid is not None:
            got, want = got[valid], want[valid]
        if want.size == 0:
            continue
        error = float(np.abs(got - want).max())
        checks.append(
            {
                "output": name,
                "adapter": active,
                "batch": int(sample["input_ids"].shape[0]),
                "sequence": int(sample["input_ids"].shape[1]),
                "past": int(past),
                "max_abs_error": error,
                "relative_error": error / max(float(np.abs(want).max()), 1e-12),
            }
        )
    return checks


def _valid(sample: dict[str, torch.Tensor], spec: GraphSpec, output: str) -> np.ndarray | None:
    """Boolean mask of the output positions to compare (unpadded tokens), None for all."""
    if output.startswith("present.") or spec.task == SEQ_CLS:
        return None
    length = sample["input_ids"].shape[1]
    return sample["attention_mask"][:, -length:].bool().numpy()


def _cpu_session(model_path: Path):
    """A quiet CPU InferenceSession with onnxruntime's fusions (the extended level), holding little
    more memory than the graph's weights.

    Why not every optimization and the memory arena: onnxruntime's CPU provider runs fp16 MatMuls
    through Casts to fp32, and the full level folds those into fp32 copies of every weight at load
    (2.9 GB for the 1.4 GB fp16 graph of a 748M model); the arena then keeps each run's casts. At
    this level, without the arena and in priority order (the default order runs every weight's Cast
    first, as nothing feeds them), the weights stay mapped from the data file and each cast lives
    only until its MatMul (``check_parity`` also runs the graph in parts, so only one part's weights
    are mapped at a time). Prepacking is off: it copies every fp32 MatMul weight into onnxruntime's
    packed layout when the session opens (2.8 GB at the load of the 748M model's 3.0 GB fp32 graph,
    whose weights it reads all of), a speed-up for serving that a check of a few samples never repays.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = _QUIET
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.enable_cpu_mem_arena = options.enable_mem_pattern = False
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED  # weight casts run when needed, not all first
    options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
