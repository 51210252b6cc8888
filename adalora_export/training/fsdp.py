"""``train --fsdp``: the frozen base sharded with FSDP2 over torchrun's ranks; the trained weights whole.

Placement. ``fully_shard`` is called on every block of the model (each child of a ``ModuleList``
that holds an adapted layer: decoder layers, encoder blocks) and then on the model root, which
takes what is left (embeddings, final norm, LM head). Each rank keeps 1/world_size of the base;
a block's weights are gathered for its forward (and again for its backward) and freed after.

The trained parameters are NOT sharded: the AdaLoRA factors A, E, B of every layer and a fresh
classifier head are ``ignored_params`` of ``fully_shard``, plain tensors held whole on every rank,
and ``average_gradients`` all-reduces their gradients once per optimizer step (one flat buffer),
before clipping. Why this choice:

- it is small: the factors are ``init_r x (in + out) + init_r`` numbers per adapted matrix. At
  init_r 12 on every attention and MLP projection (counted from the configs): Llama-2-7B 30.0M of
  6.74B parameters (0.45%), Llama-3-8B 31.5M of 8.03B (0.39%); only a small model is more
  (SmolLM2-135M: 3.7M of 135M, 2.7%), and a small model is not what FSDP is for. A whole copy
  per rank costs little next to the base shard it saves (with Adam's two moments, 3x that);
- it is exact: every rank holds the same averaged gradient, so the allocator's importance, its
  masks (``Distributed.check_masks_agree`` still compares them) and the clipping norm are the same
  on every rank and the same as one process with the same global batch;
- everything the allocator does stays plain tensor code: the final shrink replaces A, E, B by
  smaller Parameters and slices their optimizer state as in one process, with no re-sharding,
  and checkpoints save the adapter and optimizer state as they always did (rank 0 writes them).

The base is frozen, so FSDP reduces no gradient at all: gradient accumulation needs no
``set_requires_gradient_sync``. On CUDA the base is loaded in the autocast dtype and gathered in it
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); the CPU runs fp32 throughout.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import adapted_layers
from .distributed import Distributed


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks that hold adapted layers: each child of a ModuleList containing an SVD adapter."""
    adapted = {id(layer) for _, layer in adapted_layers(model)}
    found = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for child in module:
                if any(id(m) in adapted for m in child.modules()):
                    found.append(child)
    return found


def shard_model(model: nn.Module, dist: Distributed, amp_dtype: torch.dtype | None) -> list[nn.Parameter]:
    """FSDP2 over ``model`` in place (per block, then the root); returns the whole (ignored) parameters.

    The trained parameters (``requires_grad``: adapters, a fresh head) stay whole and are moved to
    this rank's device; the frozen rest is sharded onto it.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    whole = [p for p in model.parameters() if p.requires_grad]
    ignored = set(whole)
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    policy = MixedPrecisionPolicy()
    if dist.device.type == "cuda" and amp_dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    for p in whole:  # fully_shard moves what it manages; the ignored parameters follow by hand
        p.data = p.data.to(dist.device)
    return whole


@torch.no_grad()
def average_gradients(params: list[nn.Parameter], dist: Distributed) -> None:
    """All-reduce the gradients of the whole parameters (one flat buffer) and divide by the ranks, as DDP does.

    Every rank runs the same graph, so the same parameters have gradients on every rank."""
    grads = [p.grad for p in params if p.grad is not None and p.grad.numel()]
    if dist.world_size == 1 or not grads:
        return
    import torch.distributed as td

    flat = torch.cat([g.reshape(-1).float() for g in grads])
    td.all_reduce(flat)
    flat.div_(dist.world_size)
    start = 0
    for g in grads:
        g.copy_(flat[start : start + g.numel()].view_as(g))
        start += g.numel()
