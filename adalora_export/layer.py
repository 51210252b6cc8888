"""The SVD adapter layer: y = base(x) + dropout(x) @ (A*E)^T @ B^T * scale (docs/design.md, "The adapter").

One class wraps ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 style, weight stored in x out).
Every layer has its own rank r (0..init_r); ``scale`` = lora_alpha / (init_r + 1e-5) is fixed for
the life of the adapter, pruning included, exactly as PEFT does.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from .config import lora_scale
from .errors import UserError


def _is_conv1d(module: nn.Module) -> bool:
    # Checked without importing transformers: it costs seconds of start-up on paths that never need it
    # (merge), and a model holding a Conv1D has imported it already.
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def is_adaptable(module: nn.Module) -> bool:
    """True for the module types an SVD adapter can wrap: nn.Linear and transformers' Conv1D."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


PARTS = ("lora_A", "lora_E", "lora_B")  # the adapter's parameter names, in triplet order (PEFT's too)
RANK_DIM = {"lora_A": 0, "lora_E": 0, "lora_B": 1}  # the axis of each part that runs over the triplets


def is_adapter_parameter(name: str) -> bool:
    """True for the name of an A, E or B parameter (any prefix): not an extra weight of the adapter."""
    return name.rpartition(".")[2] in PARTS


def weight_layout_factors(
    down: torch.Tensor, up: torch.Tensor, fan_in_fan_out: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with ``left @ right`` = ``up @ down`` in the base weight's own layout: the one place
    the Conv1D transpose is written (Conv1D stores its weight in x out, so its rows are the update's columns)."""
    return (down.T, up.T) if fan_in_fan_out else (up, down)


def svd_factors(A: torch.Tensor, E: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) = (diag(E) A, B), with the update ``up @ down * scale``: the one place the formula is written.

    Consumers that keep the update low-rank (the LoRA export, merge, ONNX branches) take these two
    factors and put the scale where their numerics want it.
    """
    return A * E, B


def svd_delta(A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The AdaLoRA update B diag(E) A * scale (out x in)."""
    down, up = svd_factors(A, E, B)
    return (up @ down) * scale


class SVDLinear(nn.Module):
    """A frozen linear (or Conv1D) layer plus a trainable SVD-form update B diag(E) A."""

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        lora_alpha: float,
        init_r: int,
        lora_dropout: float = 0.0,
        lora_start: bool = False,
    ):
        super().__init__()
        if not is_adaptable(base_layer):
            raise UserError(f"cannot adapt {type(base_layer).__name__}: only nn.Linear and Conv1D are supported")
        self.base_layer = base_layer
        self.fan_in_fan_out = _is_conv1d(base_layer)
        self.out_features, self.in_features = self.shape_of(base_layer)
        base_layer.weight.requires_grad_(False)
        if getattr(base_layer, "bias", None) is not None:
            base_layer.bias.requires_grad_(False)
        self.init_r = init_r
        self.lora_alpha = lora_alpha
        self.scale = lora_scale(lora_alpha, init_r)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=device))
        # Either way the adapted model starts equal to the base.
        if lora_start:
            # LoRA's start (train_type lora): A Kaiming-uniform as PEFT's LoRA draws it, B = 0, E = 1, so B A
            # moves from the first step, where B diag(E) A with E = 0 and small A, B starts slowly
            # (BENCHMARKS.md §6: at a fixed rank 4 on SmolLM2, 0.234 against 0.315 answer NLL).
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
            nn.init.ones_(self.lora_E)
        else:  # A, B ~ N(0, 0.02) and E = 0 (PEFT's AdaLoRA init)
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False

    @staticmethod
    def shape_of(layer: nn.Module) -> tuple[int, int]:
        """(out_features, in_features) of an nn.Linear or a Conv1D (whose weight is stored in x out)."""
        rows, cols = layer.weight.shape
        return (cols, rows) if _is_conv1d(layer) else (rows, cols)

    @property
    def rank(self) -> int:
        return self.lora_E.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads .weight of some projections (dtype checks, tied embeddings).
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """The update in the base weight's own layout (out x in, or in x out for Conv1D), fp32."""
        down, up = svd_factors(self.lora_A, self.lora_E, self.lora_B)
        left, right = weight_layout_factors(down, up, self.fan_in_fan_out)
        return (left @ right) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or self.rank == 0:
            return result
        h = self.lora_dropout(x.to(self.lora_A.dtype))
        update = (h @ (self.lora_A * self.lora_E).T) @ self.lora_B.T
        return result + (update * self.scale).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight; forward then skips the branch."""
        if not self.merged:
            self._add_to_weight(+1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact up to float rounding in the base dtype)."""
        if self.merged:
            self._add_to_weight(-1.0)
            self.merged = False

    def _add_to_weight(self, sign: float, block_bytes: int = 2**24) -> None:
        """weight += sign * delta in fp32, rounded once to the weight's dtype, a block of rows at a time
        (no fp32 copy of a whole large weight: merging a 748M model stays within its own size)."""
        weight = self.base_layer.weight
        left, right = weight_layout_factors(*svd_factors(self.lora_A, self.lora_E, self.lora_B), self.fan_in_fan_out)
        rows = max(1, block_bytes // (4 * weight.shape[1]))
        for i in range(0, weight.shape[0], rows):
            block = weight[i : i + rows]
            block.copy_((block.float() + sign * ((left[i : i + rows] @ right) * self.scale)).to(weight.dtype))

    @torch.no_grad()
    def prune(self, keep: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Physically drop the triplets where ``keep`` is False, slicing any optimizer state too.

        A, E and B become new, smaller Parameters (resizing ``.data`` in place would leave autograd
        nodes of a still-referenced graph with stale shapes); the optimizer's param groups are
        pointed at them and its per-element state (Adam moments, SGD momentum) is sliced alike.
        """
        keep = keep.to(device=self.lora_E.device, dtype=torch.bool).view(-1)
        if keep.numel() != self.rank:
            raise UserError(f"keep mask has {keep.numel()} entries for a layer of rank {self.rank}")
        index = keep.nonzero().view(-1)
        for name, dim in RANK_DIM.items():
            old = getattr(self, name)
            new = nn.Parameter(old.detach().index_select(dim, index).contiguous(), requires_grad=old.requires_grad)
            if old.grad is not None:
                new.grad = old.grad.index_select(dim, index).contiguous()
            setattr(self, name, new)
            if optimizer is not None:
                _replace_in_optimizer(optimizer, old, new, dim, index)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, init_r={self.init_r}"


def _replace_in_optimizer(
    optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, dim: int, index: torch.Tensor
) -> None:
    """Point the optimizer at ``new`` instead of ``old`` and slice old's per-element state along ``dim``."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            state[key] = value.index_select(dim, index).contiguous()
    optimizer.state[new] = state
