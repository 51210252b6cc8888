"""The training adapter state: what a checkpoint holds of the adapter and the allocator.

A checkpoint directory (and a finished run's ``final/``) holds
- ``adapter_state.safetensors``: ``<module path>.lora_A|lora_E|lora_B`` at each layer's current
  size (init_r before the final phase, the kept rank after it), plus any fully trained extra
  weights (a classification head) under their parameter names;
- ``allocator_state.safetensors``: the importance EMAs (absent after the final phase);
- ``adalora_state.json``: the config (with total_step), the step, the mask in force, the frozen
  rank pattern once fixed, and per layer whether it is a Conv1D (fan_in_fan_out).
Pruning reads it into a ``CompactAdapter``; resuming loads it back into a model and allocator.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .adapter import CompactAdapter, ModuleAdapter
from .allocator import RankAllocator, shrink_to_rank_pattern
from .config import AdaLoraConfig
from .errors import UserError
from .io import load_tensors, read_json, write_json
from .model import adapted_layers

ADAPTER_STATE = "adapter_state.safetensors"
ALLOCATOR_STATE = "allocator_state.safetensors"
STATE_JSON = "adalora_state.json"
PARTS = ("lora_A", "lora_E", "lora_B")
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


@dataclass
class AdapterState:
    config: AdaLoraConfig
    step: int
    tensors: dict[str, torch.Tensor]
    layers: dict[str, bool]  # module path -> fan_in_fan_out
    extra: list[str]
    current_mask: dict[str, list[bool]] | None
    rank_pattern: dict[str, list[bool]] | None
    final_importance: dict[str, list[float]] | None = None
    allocator_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def is_state_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / STATE_JSON).is_file()


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """A run's ``checkpoint-<step>`` state directories, oldest first.

    Checkpoints are written under a temporary name and renamed when complete, so one that carries
    the final name is complete: the one rule for "a checkpoint" that resume and prune share.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), child)
        for child in run_dir.iterdir()
        if (m := CHECKPOINT_RE.fullmatch(child.name)) and is_state_dir(child)
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_adapter_state(
    model: nn.Module,
    config: AdaLoraConfig,
    allocator: RankAllocator | None,
    step: int,
    directory: str | os.PathLike,
    meta: dict | None = None,
) -> None:
    """Write the adapter and allocator state of ``model`` at optimizer step ``step`` into ``directory``."""
    directory = Path(directory)
    tensors, layers = {}, {}
    for path, layer in adapted_layers(model):
        layers[path] = layer.fan_in_fan_out
        for part in PARTS:
            tensors[f"{path}.{part}"] = getattr(layer, part).detach().cpu().contiguous()
    adapter = CompactAdapter.from_model(model, config)
    for name, value in adapter.extra_weights.items():
        tensors[name] = value.contiguous()
    save_file(tensors, str(directory / ADAPTER_STATE))
    alloc = allocator.state_dict() if allocator is not None else {"tensors": {}, "rank_pattern": None}
    if alloc["tensors"]:
        save_file({k: v.contiguous() for k, v in alloc["tensors"].items()}, str(directory / ALLOCATOR_STATE))
    write_json(
        directory / STATE_JSON,
        {
            "format": "adalora-export-state/1",
            "config": config.to_dict(),
            "step": step,
            "layers": layers,
            "order": list(layers),  # model order; JSON objects are written with sorted keys
            "extra": sorted(adapter.extra_weights),
            "current_mask": alloc.get("current_mask"),
            "rank_pattern": alloc.get("rank_pattern"),
            "final_importance": alloc.get("final_importance"),
            "meta": meta or {},
        },
    )


def load_adapter_state(directory: str | os.PathLike) -> AdapterState:
    """Read a state directory written by ``save_adapter_state``; bad or missing files are UserErrors."""
    directory = Path(directory)
    info = read_json(directory / STATE_JSON)
    try:
        config = AdaLoraConfig.from_dict(info["config"])
        state = AdapterState(
            config=config,
            step=int(info["step"]),
            tensors=load_tensors(directory / ADAPTER_STATE),
            layers={path: info["layers"][path] for path in info.get("order") or info["layers"]},
            extra=list(info.get("extra", [])),
            current_mask=info.get("current_mask"),
            rank_pattern=info.get("rank_pattern"),
            final_importance=info.get("final_importance"),
            meta=info.get("meta", {}),
        )
    except (KeyError, TypeError) as exc:
        raise UserError(f"{directory / STATE_JSON} is missing field {exc}") from None
    if (directory / ALLOCATOR_STATE).is_file():
        state.allocator_tensors = load_tensors(directory / ALLOCATOR_STATE)
    for path in state.layers:
        for part in PARTS:
            if f"{path}.{part}" not in state.tensors:
                raise UserError(f"{directory / ADAPTER_STATE} is missing tensor {path}.{part}")
    return state


def compact_from_state(state: AdapterState, **meta) -> CompactAdapter:
    """The compact adapter of a state: the triplets masked at that step are dropped."""
    modules = {}
    mask = state.rank_pattern or state.current_mask or {}
    for path, fan_in_fan_out in state.layers.items():
        a, e, b = (state.tensors[f"{path}.{part}"] for part in PARTS)
        keep = mask.get(path)
        modules[path] = ModuleAdapter.from_triplets(
            a,
            e,
            b,
            keep if keep is not None and len(keep) == e.shape[0] else None,
            fan_in_fan_out=fan_in_fan_out,
            importance=(state.final_importance or {}).get(path),
        )
    extra = {name: state.tensors[name] for name in state.extra}
    return CompactAdapter(config=state.config, modules=modules, extra_weights=extra, **meta)


@torch.no_grad()
def restore_model(model: nn.Module, state: AdapterState, allocator: RankAllocator | None = None) -> None:
    """Load a state into a model that ``inject_adapters`` prepared with the same config (and its allocator)."""
    if state.rank_pattern is not None:
        shrink_to_rank_pattern(model, state.rank_pattern)
    ours = dict(adapted_layers(model))
    if set(ours) != set(state.layers):
        raise UserError(
            "checkpoint adapts other modules than this model: " + ", ".join(sorted(set(ours) ^ set(state.layers))[:3])
        )
    for path, layer in ours.items():
        for part in PARTS:
            getattr(layer, part).copy_(state.tensors[f"{path}.{part}"])
    params = dict(model.named_parameters())
    for name in state.extra:
        params[name].copy_(state.tensors[name])
    if allocator is not None:
        allocator.load_state_dict(
            {
                "tensors": state.allocator_tensors,
                "rank_pattern": state.rank_pattern,
                "current_mask": state.current_mask,
                "final_importance": state.final_importance,
                "total_step": state.config.total_step,
                "config": state.config.to_dict(),
            }
        )
