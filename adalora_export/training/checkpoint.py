"""Training checkpoints: everything a run needs to continue exactly where it stopped.

``RUN_DIR/checkpoint-<step>/`` is written to a temporary directory and renamed into place, so a
kill at any moment leaves either the complete checkpoint or none. It holds

- the adapter state (``adalora_export.formats.state``): A, E, B at their current sizes, the allocator's
  importance EMAs, the mask in force and the frozen mask, any trained extra weights;
- ``optimizer.safetensors``: the optimizer's per-parameter state (Adam moments, step counts)
  keyed ``<parameter name>/<state key>``, so it survives the final shrink's new Parameters;
- ``rng.safetensors``: torch's CPU (and CUDA) generator states of every rank;
- ``trainer_state.json``: the step (the data position follows from it), the optimizer's param
  groups by parameter name, Python's and numpy's RNG states of every rank, the data fingerprint.

No pickle anywhere: safetensors and JSON only.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..adapter import CompactAdapter
from ..allocator import RankAllocator, shrink_to_mask
from ..config import AdaLoraConfig
from ..errors import UserError
from ..formats.state import AdapterState, list_checkpoints, read_state_dir, write_state_dir
from ..io import atomic_output_dir, load_tensors, read_json, write_json
from ..layer import PARTS
from ..model import adapted_layers
from .data import Dataset

OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
TRAINER_STATE = "trainer_state.json"


@dataclass
class Checkpoint:
    """A checkpoint read back: the adapter state plus what the loop needs to continue."""

    path: Path
    step: int
    adapter: AdapterState
    optimizer_tensors: dict[str, torch.Tensor]
    rng_tensors: dict[str, torch.Tensor]
    trainer_state: dict


# ------------------------------------------------------------------- adapter state
def adapter_state(
    model: torch.nn.Module, config: AdaLoraConfig, allocator: RankAllocator | None, step: int, meta: dict | None = None
) -> AdapterState:
    """The adapter and allocator state of ``model`` at optimizer step ``step``."""
    tensors, layers = {}, {}
    for path, layer in adapted_layers(model):
        layers[path] = layer.fan_in_fan_out
        tensors.update({f"{path}.{part}": getattr(layer, part) for part in PARTS})
    extra = CompactAdapter.from_model(model, config).extra_weights
    tensors.update(extra)
    alloc = allocator.state_dict() if allocator is not None else {"tensors": {}}
    return AdapterState(
        config=config,
        step=step,
        tensors=tensors,
        layers=layers,
        extra=sorted(extra),
        current_mask=alloc.get("current_mask"),
        frozen_mask=alloc.get("frozen_mask"),
        final_importance=alloc.get("final_importance"),
        allocator_tensors=alloc["tensors"],
        meta=meta or {},
    )


def save_adapter_state(
    model: torch.nn.Module,
    config: AdaLoraConfig,
    allocator: RankAllocator | None,
    step: int,
    directory: str | os.PathLike,
    meta: dict | None = None,
) -> None:
    """Write the adapter state of ``model`` (``adapter_state``) into ``directory``."""
    write_state_dir(directory, adapter_state(model, config, allocator, step, meta))


@torch.no_grad()
def restore_model(model: torch.nn.Module, state: AdapterState, allocator: RankAllocator | None = None) -> None:
    """Load a state into a model that ``inject_adapters`` prepared with the same config (and its allocator)."""
    if state.frozen_mask is not None:
        shrink_to_mask(model, state.frozen_mask)
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
                "frozen_mask": state.frozen_mask,
                "current_mask": state.current_mask,
                "final_importance": state.final_importance,
                "total_step": state.config.total_step,
                "config": state.config.to_dict(),
            }
        )


# ----------------------------------------------------------------------------- RNG
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: (tensors for safetensors, JSON-able python/numpy states)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------- optimizer
def optimizer_state(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state keyed by parameter name; ``names`` are the optimizer's params in order."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{names[index]}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{names[index]}/{key}"] = value
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor], plain: dict
) -> None:
    """Load ``optimizer_state``'s output into an optimizer built over the same named parameters."""
    index = {name: i for i, name in enumerate(names)}
    groups = plain["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise UserError("checkpoint optimizer has other parameter groups than this run")
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(plain["scalars"].items()):
        name, _, field = key.rpartition("/")
        if name not in index:
            raise UserError(f"checkpoint optimizer state names unknown parameter {name}")
        state.setdefault(index[name], {})[field] = value
    optimizer.load_state_dict(
        {"state": state, "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups]}
    )


# ----------------------------------------------------------------------- save/load
def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    config: AdaLoraConfig,
    allocator: RankAllocator,
    optimizer: torch.optim.Optimizer,
    param_names: list[str],
    rng: list[tuple[dict[str, torch.Tensor], dict]],
    trainer_state: dict,
    meta: dict | None = None,
    keep: int = 3,
) -> Path:
    """Write ``run_dir/checkpoint-<step>`` atomically, then delete all but the newest ``keep`` (0 = keep all).

    ``rng`` holds every rank's ``rng_state()`` (rank order); ``trainer_state`` is extra JSON (data
    fingerprint, epoch ...); ``meta`` goes into the adapter state (base model path, task).
    """
    path = Path(run_dir) / f"checkpoint-{step}"
    with atomic_output_dir(path, overwrite=True) as tmp:
        save_adapter_state(model, config, allocator, step, tmp, meta=meta)
        opt_tensors, opt_plain = optimizer_state(optimizer, param_names)
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
        rng_tensors = {f"rank{r}.{k}": v.contiguous() for r, (t, _) in enumerate(rng) for k, v in t.items()}
        save_file(rng_tensors, str(tmp / RNG_FILE))
        write_json(
            tmp / TRAINER_STATE,
            {"step": step, "optimizer": opt_plain, "rng": [plain for _, plain in rng], **trainer_state},
        )
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint directory; missing or corrupt files are UserErrors naming them."""
    path = Path(path)
    trainer_state = read_json(path / TRAINER_STATE)
    adapter = read_state_dir(path)
    if adapter.step != trainer_state.get("step"):
        raise UserError(f"{path}: adapter state is for step {adapter.step}, trainer state for {trainer_state['step']}")
    return Checkpoint(
        path=path,
        step=adapter.step,
        adapter=adapter,
        optimizer_tensors=load_tensors(path / OPTIMIZER_FILE),
        rng_tensors=load_tensors(path / RNG_FILE),
        trainer_state=trainer_state,
    )


def rank_rng(checkpoint: Checkpoint, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The RNG states that ``rank`` saved."""
    prefix = f"rank{rank}."
    tensors = {k[len(prefix) :]: v for k, v in checkpoint.rng_tensors.items() if k.startswith(prefix)}
    if not tensors:
        raise UserError(f"{checkpoint.path}: no RNG state for rank {rank}")
    return tensors, checkpoint.trainer_state["rng"][rank]


# -------------------------------------------------------------------------- resume
def restore_adapter(path: Path, model: torch.nn.Module, allocator: RankAllocator, train_set: Dataset) -> Checkpoint:
    """Read the checkpoint at ``path`` and put its adapter and allocator state into ``model`` and ``allocator``.

    The optimizer follows with ``restore_optimizer`` once it is built over the restored parameters.
    """
    checkpoint = load_checkpoint(path)
    if checkpoint.trainer_state.get("data_fingerprint") != train_set.fingerprint:
        raise UserError(f"{train_set.path} is not the file this run was trained on; cannot resume {path.parent}")
    restore_model(model, checkpoint.adapter, allocator)
    return checkpoint


def restore_optimizer(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer, names: list[str], rank: int) -> None:
    """The optimizer's state and this rank's RNG states, as the checkpoint saved them."""
    load_optimizer_state(optimizer, names, checkpoint.optimizer_tensors, checkpoint.trainer_state["optimizer"])
    set_rng_state(*rank_rng(checkpoint, rank))
