"""Preparing the adapted torch model for each ``OnnxKind`` before it is traced.

The model arrives with its adapted layers wrapped in ``SVDLinear`` (``CompactAdapter.apply_to``).
``merged`` unwraps them into plain weights; ``rank_compact`` and ``adapter_inputs`` replace each
by a ``LowRankBranch`` whose two factors are traced as graph inputs of our own names
(``<module>.lora_down`` in x r, ``<module>.lora_up`` r x out), then bound as constants
(rank-compact) or kept as inputs with empty rank-0 defaults (adapter inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from adalora_export.adapter import CompactAdapter
from adalora_export.formats.onnx_dir import OnnxKind, branch_entry
from adalora_export.model import adapted_layers, replace_module, unwrap_adapters

DOWN = ".lora_down"
UP = ".lora_up"


class LowRankBranch(nn.Module):
    """``base(x) + (x @ lora_down) @ lora_up``: one adapted layer, its scale folded into ``lora_down``."""

    def __init__(self, base_layer: nn.Module, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.base_layer = base_layer
        self.lora_down = nn.Parameter(down, requires_grad=False)  # in x r
        self.lora_up = nn.Parameter(up, requires_grad=False)  # r x out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + (x @ self.lora_down) @ self.lora_up


def branch_weights(adapter: CompactAdapter, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of module ``path``: down = (A * E * scale)^T (in x r), up = B^T (r x out), fp32.

    The one derivation of the branch factors, for the traced graph and for ``.onnx_adapter`` files alike.
    """
    down, up = adapter.modules[path].factors()
    return (down * adapter.scale).T.contiguous(), up.T.contiguous()


@dataclass
class PreparedGraph:
    """What the trace and the graph rewrites need to know about the prepared model."""

    swappable: dict[str, torch.Tensor] = field(default_factory=dict)  # traced input name -> tracing value
    constants: dict[str, np.ndarray] = field(default_factory=dict)  # inputs bound as initializers
    defaults: dict[str, np.ndarray] = field(default_factory=dict)  # inputs kept, with these defaults
    axes: dict[str, dict[int, str]] = field(default_factory=dict)  # dynamic axes of the swappable inputs
    branches: dict = field(default_factory=dict)  # the manifest's ``branches``


def prepare_model(
    model: nn.Module, adapter: CompactAdapter, kind: OnnxKind, base_extras: dict[str, torch.Tensor]
) -> PreparedGraph:
    """Rewrite the adapted model (SVDLinear layers) in place for ``kind``.

    ``base_extras``: the base's own values of the adapter's extra weights (adapter inputs default to them).
    """
    prepared = PreparedGraph()
    if kind == OnnxKind.MERGED:
        unwrap_adapters(model)
        return prepared
    for path, layer in list(adapted_layers(model)):
        down, up = branch_weights(adapter, path)
        if kind == OnnxKind.RANK_COMPACT:
            if layer.rank == 0:
                replace_module(model, path, layer.base_layer)  # rank 0: no branch at all
                continue
            _add_constant_branch(prepared, path, layer.rank, down, up)
        else:
            if layer.rank == 0:
                # Traced at rank 1 (a zero-size trace could specialise); the rank axis stays symbolic.
                down, up = torch.zeros(layer.in_features, 1), torch.zeros(1, layer.out_features)
            _add_input_branch(prepared, path, layer.in_features, layer.out_features, down, up)
        replace_module(model, path, LowRankBranch(layer.base_layer, down, up))
    if kind == OnnxKind.ADAPTER_INPUTS:
        # Trained head weights become inputs defaulting to the base's: no active adapter = the base.
        for name, value in base_extras.items():
            model.get_parameter(name).data.copy_(value)
            prepared.swappable[name] = value
            prepared.defaults[name] = value.float().numpy()
    return prepared


def _add_constant_branch(prepared: PreparedGraph, path: str, rank: int, down: torch.Tensor, up: torch.Tensor) -> None:
    """A rank-compact branch: traced as inputs, bound as initializers at the layer's final rank."""
    names = (path + DOWN, path + UP)
    prepared.swappable.update(zip(names, (down, up)))
    prepared.constants.update(zip(names, (down.numpy(), up.numpy())))
    prepared.branches[path] = rank


def _add_input_branch(
    prepared: PreparedGraph, path: str, in_features: int, out_features: int, down: torch.Tensor, up: torch.Tensor
) -> None:
    """An adapter-input branch: graph inputs with a rank axis of the layer's own and empty defaults."""
    down_name, up_name = path + DOWN, path + UP
    prepared.swappable.update({down_name: down, up_name: up})
    entry = branch_entry(path, down_name, up_name, in_features, out_features)
    prepared.axes[down_name], prepared.axes[up_name] = {1: entry["rank_axis"]}, {0: entry["rank_axis"]}
    prepared.defaults[down_name] = np.zeros((in_features, 0), np.float32)
    prepared.defaults[up_name] = np.zeros((0, out_features), np.float32)
    prepared.branches[path] = entry
