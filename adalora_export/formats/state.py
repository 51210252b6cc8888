"""The training adapter state: what a checkpoint holds of the adapter and the allocator.

A checkpoint directory (and a finished run's ``final/``) holds
- ``adapter_state.safetensors``: ``<module path>.lora_A|lora_E|lora_B`` at each layer's current
  size (init_r before the final phase, the kept rank after it), plus any fully trained extra
  weights (a classification head) under their parameter names;
- ``allocator_state.safetensors``: the importance EMAs (absent after the final phase);
- ``adalora_state.json``: the config (with total_step), the step, the mask in force, the frozen
  mask once fixed (``frozen_mask``), and per layer whether it is a Conv1D (fan_in_fan_out).
Pruning reads it into a ``CompactAdapter`` (``compact_from_state``); the trainer builds an
``AdapterState`` from its model and allocator and restores them from one (``training.checkpoint``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapter import CompactAdapter, ModuleAdapter
from ..config import AdaLoraConfig
from ..errors import UserError
from ..io import load_tensors, read_json, write_json
from ..layer import PARTS

ADAPTER_STATE = "adapter_state.safetensors"
ALLOCATOR_STATE = "allocator_state.safetensors"
STATE_JSON = "adalora_state.json"
STATE_FORMAT = "adalora-export-state/1"
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


@dataclass
class AdapterState:
    """One state directory's content, in memory."""

    config: AdaLoraConfig
    step: int
    tensors: dict[str, torch.Tensor]
    layers: dict[str, bool]  # module path -> fan_in_fan_out
    extra: list[str]
    current_mask: dict[str, list[bool]] | None
    frozen_mask: dict[str, list[bool]] | None  # the mask fixed at the final phase (then physical)
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


def write_state_dir(directory: str | os.PathLike, state: AdapterState) -> None:
    """Write ``state`` into the existing directory ``directory`` (the caller makes it atomic)."""
    directory = Path(directory)
    tensors = {name: t.detach().cpu().contiguous() for name, t in state.tensors.items()}
    save_file(tensors, str(directory / ADAPTER_STATE))
    if state.allocator_tensors:
        allocator = {k: v.detach().cpu().contiguous() for k, v in state.allocator_tensors.items()}
        save_file(allocator, str(directory / ALLOCATOR_STATE))
    write_json(
        directory / STATE_JSON,
        {
            "format": STATE_FORMAT,
            "config": state.config.to_dict(),
            "step": state.step,
            "layers": state.layers,
            "order": list(state.layers),  # model order; JSON objects are written with sorted keys
            "extra": sorted(state.extra),
            "current_mask": state.current_mask,
            "frozen_mask": state.frozen_mask,
            "final_importance": state.final_importance,
            "meta": state.meta,
        },
    )


def read_state_dir(directory: str | os.PathLike) -> AdapterState:
    """Read a state directory written by ``write_state_dir``; bad or missing files are UserErrors."""
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
            frozen_mask=info.get("frozen_mask", info.get("rank_pattern")),  # "rank_pattern" in older states
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
    mask = state.frozen_mask or state.current_mask or {}
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
