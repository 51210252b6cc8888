"""From a transformers model to an ONNX graph: the traced wrapper, the trace and the graph rewrites.

The graph is traced with torch's TorchScript exporter (``dynamo=False``): on transformers 5 models it
gives correct dynamic batch, sequence and cache axes (the export's own parity check runs several
shapes) in about a second, where the dynamo exporter takes tens of seconds for the same tiny model.

Tensors that must be named exactly in the graph (branch weights, hot-swappable head weights) are
traced as graph *inputs* and turned into initializers afterwards, so their names and shapes are
ours and never the exporter's: a rank-compact branch is an initializer pair
``<module>.lora_down`` (in x r) and ``<module>.lora_up`` (r x out); an adapter input is the same
pair kept as a graph input whose default is an empty (rank 0) initializer and whose rank axis is
named after its own layer.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from adalora_export.errors import UserError
from adalora_export.formats.onnx_dir import DATA_FILE, MODEL_FILE
from adalora_export.hf import CAUSAL_LM, ENCODER, SEQ_CLS
from adalora_export.io import disk_full, disk_full_message

DEFAULT_OPSET = 17  # the accepted range is the directory's (formats.onnx_dir: MIN_OPSET, MAX_OPSET)


@dataclass
class GraphSpec:
    """What one graph takes and gives: data inputs, cache, swappable tensors, outputs and their axes."""

    task: str
    data_inputs: list[str]
    outputs: list[str]
    num_layers: int = 0  # cache layers (with_past only)
    # parameters traced as graph inputs of the same name (branch weights, swappable head weights)
    swappable: list[str] = field(default_factory=list)

    @property
    def with_past(self) -> bool:
        return self.num_layers > 0

    @property
    def past_inputs(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def present_outputs(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return self.data_inputs + self.past_inputs + self.swappable

    @property
    def output_names(self) -> list[str]:
        return self.outputs + self.present_outputs

    def dynamic_axes(self, swappable_axes: dict[str, dict[int, str]]) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {}
        for name in self.data_inputs:
            axes[name] = {
                0: "batch",
                1: "total_sequence" if name == "attention_mask" and self.with_past else "sequence",
            }
        for name in self.past_inputs:
            axes[name] = {0: "batch", 2: "past_sequence"}
        for name in self.present_outputs:
            axes[name] = {0: "batch", 2: "total_sequence"}
        for name in self.outputs:
            axes[name] = {0: "batch"} if self.task == SEQ_CLS else {0: "batch", 1: "sequence"}
        axes.update(swappable_axes)
        return axes


def graph_spec(model: nn.Module, task: str, with_past: bool, swappable: list[str] | None = None) -> GraphSpec:
    """The inputs and outputs of ``model``'s graph for ``task``."""
    accepted = inspect.signature(model.forward).parameters
    data = ["input_ids", "attention_mask"]
    if task == CAUSAL_LM:
        data.append("position_ids")
    elif "token_type_ids" in accepted and getattr(model.config, "type_vocab_size", 0):
        data.append("token_type_ids")
    outputs = ["last_hidden_state"] if task == ENCODER else ["logits"]
    layers = model.config.get_text_config().num_hidden_layers if with_past else 0
    return GraphSpec(task, data, outputs, layers, list(swappable or []))


class GraphWrapper(nn.Module):
    """Flat tensors in, flat tensors out, in ``spec``'s order: what the tracer sees.

    Swappable tensors arrive as inputs and stand in for the model's parameters of the same name
    during the call, so the traced graph reads them from its inputs (``torch.func.functional_call``
    does the same but refuses to run under the tracer).
    """

    def __init__(self, model: nn.Module, spec: GraphSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        spec = self.spec
        n_data, n_past = len(spec.data_inputs), len(spec.past_inputs)
        kwargs = dict(zip(spec.data_inputs, flat[:n_data]))
        if spec.with_past:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            past = flat[n_data : n_data + n_past]
            for i in range(spec.num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            kwargs.update(cache=cache, use_cache=True)
        elif spec.task == CAUSAL_LM:
            kwargs["use_cache"] = False
        swaps = dict(zip(spec.swappable, flat[n_data + n_past :]))
        with _parameters_replaced(self.model, swaps):
            out = self.model(**kwargs)
        result = [out[spec.outputs[0]]]
        if spec.with_past:
            for layer in out.cache.layers[: spec.num_layers]:
                result += [layer.keys, layer.values]
        return tuple(result)


@contextlib.contextmanager
def _parameters_replaced(model: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Let ``tensors`` stand in for the parameters of the same names (and every tied alias of them,
    such as an output head sharing the embedding), restoring them afterwards."""
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    aliases = {name: names for names in names_of.values() for name in names}
    saved = []
    try:
        for name, tensor in tensors.items():
            for alias in aliases.get(name, [name]):
                owner_path, _, attr = alias.rpartition(".")
                owner = model.get_submodule(owner_path) if owner_path else model
                saved.append((owner, attr, owner._parameters[attr]))
                owner._parameters[attr] = tensor
        yield
    finally:
        for owner, attr, param in reversed(saved):
            owner._parameters[attr] = param


def base_weights(model: nn.Module, exclude: set[str]) -> dict[str, torch.Tensor]:
    """The model's parameters but ``exclude``, to be traced as graph inputs and then written out
    one at a time (``externalize_weights``, ``save_graph``) rather than embedded by the exporter.

    Why: the TorchScript exporter copies every weight into its protobuf and serializes that again,
    about three copies of the model at once (5 GB for the 1.5 GB fp16 graph of a 748M model); as
    inputs they cost nothing more than the torch model holds already.
    """
    return {name: p.detach() for name, p in model.named_parameters() if name not in exclude}


def externalize_weights(model: onnx.ModelProto, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn the traced weight inputs into tensors to be written beside the graph; return name -> tensor.

    A 2-D weight read only through one Transpose (a Linear's MatMul) is kept transposed under that
    node's output and the node is dropped, which is the folding the exporter does for embedded
    weights. A weight read otherwise too, such as a tied output head's (the embedding's Gather and the
    head's Transpose), is stored once as it is: its Transpose stays in the graph, for onnxruntime to
    fold when it loads (folding it here would store the weight twice). Any other computation on a
    weight stays in the graph as well. Unused weights are dropped.
    """
    graph = model.graph
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name in weights:
                users.setdefault(name, []).append(node)
    external: dict[str, torch.Tensor] = {}
    folded: set[str] = set()
    for name, tensor in weights.items():
        readers = users.get(name, [])
        if len(readers) == 1 and _transposes(readers[0], tensor):
            external[readers[0].output[0]] = tensor.t()
            folded.add(readers[0].output[0])
        elif readers:
            external[name] = tensor
    kept = [n for n in graph.node if not (n.op_type == "Transpose" and n.output[0] in folded)]
    del graph.node[:]
    graph.node.extend(kept)
    inputs = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(inputs)
    return external


def _transposes(node: onnx.NodeProto, tensor: torch.Tensor) -> bool:
    """Whether ``node`` transposes the 2-D ``tensor`` (what a Linear's MatMul reads)."""
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return node.op_type == "Transpose" and tensor.dim() == 2 and perm in (None, [1, 0])


def trace_to_onnx(
    wrapper: GraphWrapper,
    sample: list[torch.Tensor],
    swappable_axes: dict[str, dict[int, str]],
    opset: int,
) -> onnx.ModelProto:
    """Trace ``wrapper`` on ``sample`` into an in-memory ModelProto (weights loaded, not yet saved)."""
    spec = wrapper.spec
    with tempfile.TemporaryDirectory(prefix="adalora-onnx-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "traced.onnx")
        with torch.no_grad(), _naming_a_full_disk(path):
            torch.onnx.export(
                wrapper,
                tuple(sample),
                path,
                dynamo=False,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(swappable_axes),
                opset_version=opset,
                do_constant_folding=True,
            )
        # Models over 2 GiB come out with external data beside ``path``: load it before tmp goes.
        return onnx.load(path, load_external_data=True)


@contextlib.contextmanager
def _naming_a_full_disk(path: str) -> Iterator[None]:
    """The trace goes through a file in the temporary directory (TMPDIR), not the output's disk: say so."""
    try:
        yield
    except OSError as exc:
        error = disk_full(exc)
        if error is None:
            raise
        raise UserError(disk_full_message(error, path) + " (the temporary directory: set TMPDIR)") from None


def bind_inputs(model: onnx.ModelProto, constants: dict[str, np.ndarray], defaults: dict[str, np.ndarray]) -> None:
    """Turn traced graph inputs into initializers (``constants``) or into inputs with a default (``defaults``)."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    missing = [name for name in [*constants, *defaults] if name not in inputs]
    if missing:
        raise RuntimeError(f"the traced graph lost its inputs {missing[:3]}")
    keep = [i for i in graph.input if i.name not in constants]
    del graph.input[:]
    graph.input.extend(keep)
    for name, value in {**constants, **defaults}.items():
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))


def save_graph(model: onnx.ModelProto, directory: Path, external: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model.onnx`` with all weights in one external file ``model.onnx.data`` beside it.

    ``external`` tensors (``externalize_weights``) are written first, one at a time, at 4 KiB-aligned
    offsets (so onnxruntime can map them), and become the graph's initializers; the graph's own
    initializers follow them in the same file.
    """
    path = directory / MODEL_FILE
    with open(directory / DATA_FILE, "wb") as data:
        for name, tensor in (external or {}).items():
            if tensor.dtype not in _ONNX_TYPES:
                raise RuntimeError(f"weight {name} is {tensor.dtype}, not fp32 or fp16")
            data.write(b"\0" * (-data.tell() % 4096))
            offset = data.tell()
            row_bytes = tensor[0].numel() * tensor.element_size() if tensor.dim() else 1
            blocks = tensor.split(max(1, 2**24 // max(1, row_bytes))) if tensor.dim() else (tensor,)
            for block in blocks:  # a transposed view is copied a block of rows at a time
                data.write(memoryview(block.contiguous().numpy()).cast("B"))
            nbytes = data.tell() - offset
            init = onnx.TensorProto(name=name, dims=tensor.shape, data_type=_ONNX_TYPES[tensor.dtype])
            init.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", DATA_FILE), ("offset", offset), ("length", nbytes)):
                entry = init.external_data.add()
                entry.key, entry.value = key, str(value)
            model.graph.initializer.append(init)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
    return path


_ONNX_TYPES = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16}


def io_signature(model: onnx.ModelProto, exclude: set[str]) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of the graph as {name, dtype, shape} with symbolic axes as strings."""

    def describe(value: onnx.ValueInfoProto) -> dict:
        tensor = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return {
            "name": value.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
            "shape": shape,
        }

    inputs = [describe(v) for v in model.graph.input if v.name not in exclude]
    return inputs, [describe(v) for v in model.graph.output]
