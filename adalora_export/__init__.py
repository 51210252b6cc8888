"""adalora-export: train with AdaLoRA, prune to per-layer ranks, and ship the result.

The names below are imported on first use (PEP 562): ``import adalora_export`` and the modules that
need no torch (the runtime, the command line's parsing) do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .adapter import CompactAdapter, ModuleAdapter
    from .allocator import Allocation, RankAllocator, shrink_to_mask
    from .config import AdaLoraConfig, recommended_schedule
    from .layer import SVDLinear
    from .model import (
        adapted_layers,
        inject_adapters,
        orthogonal_regularizer,
        trainable_parameters,
        unwrap_adapters,
    )

__version__ = "0.1.0"

_HOMES = {  # public name -> the module that defines it
    "CompactAdapter": "adapter",
    "ModuleAdapter": "adapter",
    "Allocation": "allocator",
    "RankAllocator": "allocator",
    "shrink_to_mask": "allocator",
    "AdaLoraConfig": "config",
    "recommended_schedule": "config",
    "SVDLinear": "layer",
    "adapted_layers": "model",
    "inject_adapters": "model",
    "orthogonal_regularizer": "model",
    "trainable_parameters": "model",
    "unwrap_adapters": "model",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


__all__ = [
    "AdaLoraConfig",
    "Allocation",
    "CompactAdapter",
    "ModuleAdapter",
    "RankAllocator",
    "SVDLinear",
    "UserError",
    "adapted_layers",
    "inject_adapters",
    "orthogonal_regularizer",
    "recommended_schedule",
    "shrink_to_mask",
    "trainable_parameters",
    "unwrap_adapters",
]
