"""adalora-export: train with AdaLoRA, prune to per-layer ranks, and ship the result."""

from .adapter import CompactAdapter, ModuleAdapter
from .allocator import Allocation, RankAllocator, shrink_to_mask
from .config import AdaLoraConfig, recommended_schedule
from .errors import UserError
from .layer import SVDLinear
from .model import (
    adapted_layers,
    inject_adapters,
    orthogonal_regularizer,
    trainable_parameters,
    unwrap_adapters,
)

__version__ = "0.1.0"

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
