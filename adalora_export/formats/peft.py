"""Compact adapter directories (docs/design.md, "Formats"): PEFT AdaLoRA directories, written and read.

A compact adapter directory holds
- ``adapter_config.json``: a PEFT AdaLoraConfig whose ``rank_pattern`` maps ``<path>.lora_E`` to init_r
  booleans with exactly r True entries. PEFT builds every layer at init_r at load and then slices it with
  that list, so the layer ends at rank r; which entries are True does not matter (we write the first r).
- ``adapter_model.safetensors``: ``base_model.model.<path>.lora_A`` (r x in), ``.lora_E`` (r x 1),
  ``.lora_B`` (out x r), rank 0 as empty tensors, plus fully trained extra weights (PEFT's
  ``modules_to_save``) as ``base_model.model.<parameter name>``.
- ``adalora_manifest.json``: ours, beside it: the full config, ranks, budget, parameters, importance.

``read_adapter_dir`` reads these and the AdaLoRA directories PEFT saved (sliced with a rank_pattern, or
unsliced at init_r with zeros in E). Reading any source (runs, checkpoints too) is
``adalora_export.sources.load_adapter``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..adapter import CompactAdapter, ModuleAdapter, TaskInfo
from ..config import SEED_PARAMETERS, AdaLoraConfig
from ..errors import UserError
from ..hf import SEQ_CLS, peft_task_type, task_from_peft
from ..io import atomic_output_dir, check_output_path, load_tensors, read_json, write_json
from ..layer import PARTS
from ..model import matches_target

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_PICKLE = "adapter_model.bin"
MANIFEST = "adalora_manifest.json"
MANIFEST_FORMAT = "adalora-export-adapter/1"
PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel -> LoraModel -> the transformers model


# --------------------------------------------------------------------------------------------- writing
def peft_common_config(adapter: CompactAdapter, target_modules: list[str] | str) -> dict[str, Any]:
    """The adapter_config.json fields that PEFT's LoRA and AdaLoRA configs share."""
    return {
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "task_type": peft_task_type(adapter.task_type),
        "target_modules": target_modules,
        "lora_alpha": adapter.config.lora_alpha,
        "lora_dropout": adapter.config.lora_dropout,
        # PEFT keeps one flag; it corrects it per layer type at load, and uses it when merging.
        "fan_in_fan_out": any(m.fan_in_fan_out for m in adapter.modules.values()),
        "modules_to_save": modules_to_save(adapter),
        "bias": "none",
        "inference_mode": True,
    }


def modules_to_save(adapter: CompactAdapter) -> list[str] | None:
    """The modules whose extra weights the adapter carries, as PEFT's ``modules_to_save``."""
    names = sorted({name.rpartition(".")[0] for name in adapter.extra_weights})
    return names or None


def extra_weight_tensors(adapter: CompactAdapter) -> dict[str, torch.Tensor]:
    """Extra weights under PEFT's keys (``base_model.model.<parameter name>``)."""
    return {PREFIX + name: t.detach().cpu().contiguous() for name, t in adapter.extra_weights.items()}


def write_peft_dir(
    out_dir: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    overwrite: bool = False,
    extra_json: dict[str, Any] | None = None,
) -> Path:
    """Write a PEFT adapter directory (config, safetensors, optional JSON files beside) atomically."""
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / ADAPTER_CONFIG, config)
        for name, data in (extra_json or {}).items():
            write_json(tmp / name, data)
    return Path(out_dir)


def save_adapter(adapter: CompactAdapter, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``adapter`` as a PEFT AdaLoRA directory with each module at its own rank, plus our manifest."""
    check_output_path(out_dir, overwrite)
    cfg = adapter.config
    tensors = {}
    for path, m in adapter.modules.items():
        a, e, b = (t.detach().cpu().contiguous() for t in (m.A, m.E, m.B))
        _check_module(path, a, e, b, cfg.init_r, "adapter")
        tensors.update({f"{PREFIX}{path}.lora_A": a, f"{PREFIX}{path}.lora_E": e, f"{PREFIX}{path}.lora_B": b})
    tensors.update(extra_weight_tensors(adapter))
    config = peft_common_config(adapter, _peft_target_modules(adapter))
    config.update(
        peft_type="ADALORA",
        **{name: getattr(cfg, name) for name in SEED_PARAMETERS},
        # PEFT refuses a config without a budget phase; an adapter built outside a run may not know its length.
        total_step=cfg.total_step if cfg.total_step is not None else cfg.tinit + cfg.tfinal + 1,
        rank_pattern={
            f"{path}.lora_E": [True] * m.rank + [False] * (cfg.init_r - m.rank) for path, m in adapter.modules.items()
        },
    )
    manifest = {"format": MANIFEST_FORMAT, "config": cfg.to_dict(), **adapter.summary()}
    if adapter.task_info.to_json():
        manifest["task_info"] = adapter.task_info.to_json()
    return write_peft_dir(out_dir, config, tensors, overwrite=overwrite, extra_json={MANIFEST: manifest})


def _peft_target_modules(adapter: CompactAdapter) -> list[str] | str:
    """The config's target names when they select exactly our modules' names, else the module paths.

    PEFT wraps every layer its target names match and then expects tensors for each, so the names
    must not reach further than the adapter does.
    """
    targets = adapter.config.target_modules
    paths = sorted(adapter.modules)
    if targets and all(matches_target(p, targets) for p in paths):
        return targets
    return paths


# --------------------------------------------------------------------------------------------- reading
def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a PEFT adapter directory (ours or PEFT's)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_dir(path: str | os.PathLike, allow_pickle: bool = False) -> CompactAdapter:
    """Read a PEFT AdaLoRA directory (ours, or PEFT's sliced or unsliced save) into a ``CompactAdapter``.

    Bad input (wrong peft_type, missing tensors, inconsistent shapes, NaN/Inf, corrupt files, a pickle
    without ``allow_pickle``) raises UserError naming the file and module.
    """
    path = Path(path)
    config_path = path / ADAPTER_CONFIG
    raw = read_json(config_path)
    if not isinstance(raw, dict):
        raise UserError(f"{config_path} does not hold a JSON object")
    if raw.get("peft_type") != "ADALORA":
        raise UserError(f"{config_path}: peft_type {raw.get('peft_type')!r} is not ADALORA; only AdaLoRA is read")
    manifest = _read_manifest(path / MANIFEST)
    config = _read_config(manifest.get("config", raw), config_path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file() and (path / ADAPTER_WEIGHTS_PICKLE).is_file():
        weights = path / ADAPTER_WEIGHTS_PICKLE
    tensors = load_tensors(weights, allow_pickle=allow_pickle)

    groups, extra = _split_tensors(tensors, weights)
    keep_lists = _read_keep_lists(raw.get("rank_pattern"), config.init_r, config_path)
    unknown = sorted(keep_lists.keys() - groups.keys())
    if unknown:
        raise UserError(f"{config_path}: rank_pattern names module {unknown[0]}, which has no tensors in {weights}")
    if not groups:
        raise UserError(f"{weights} holds no AdaLoRA tensors (lora_A, lora_E, lora_B)")

    info = {m["module"]: m for m in manifest.get("modules", [])}
    modules = {}
    for module in _model_order(groups, [*info, *keep_lists]):
        parts = groups[module]
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise UserError(f"{weights} is missing tensor {PREFIX}{module}.{missing[0]}")
        a, e, b = (parts[p].float() for p in PARTS)
        _check_module(module, a, e, b, config.init_r, str(weights))
        keep = _keep_mask(module, e, keep_lists.get(module), weights)
        kept = e.shape[0] if keep is None else int(keep.sum())
        modules[module] = ModuleAdapter.from_triplets(
            a,
            e,
            b,
            keep,
            fan_in_fan_out=bool(info.get(module, {}).get("fan_in_fan_out", raw.get("fan_in_fan_out", False))),
            importance=_read_importance(info.get(module), kept, module, path / MANIFEST),
        )
    task_type = task_from_peft(raw.get("task_type"))
    task_info = TaskInfo.from_json(manifest.get("task_info"), str(path / MANIFEST))
    if task_type == SEQ_CLS and task_info.id2label is None and raw.get("modules_to_save"):
        task_info = TaskInfo.for_head(raw["modules_to_save"], extra)  # PEFT's save: the head's size, no names
    return CompactAdapter(
        config=config,
        modules=modules,
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        task_type=task_type,
        extra_weights=extra,
        task_info=task_info,
    )


def _split_tensors(
    tensors: dict[str, torch.Tensor], weights: Path
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """({module path: {part: tensor}}, {extra weight name: tensor}) from PEFT's keys."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    extra = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise UserError(f"{weights}: unexpected tensor {key} (PEFT names start with {PREFIX})")
        name = key[len(PREFIX) :]
        module, _, part = name.rpartition(".")
        if part in PARTS:
            groups.setdefault(module, {})[part] = value
        elif part != "ranknum":  # older PEFT versions saved ranknum; it is always init_r
            extra[name] = value.float() if value.is_floating_point() else value
    return groups, extra


def _model_order(groups: dict[str, Any], known_order: list[str]) -> list[str]:
    """Module paths in model order: as the manifest (or PEFT's rank_pattern) lists them, the rest in
    natural order (layer 10 after layer 9); safetensors files keep their keys sorted as strings."""

    def natural(path: str) -> list:
        return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.split(".")]

    order = list(dict.fromkeys(p for p in known_order if p in groups))
    return order + sorted(groups.keys() - set(order), key=natural)


def _read_manifest(path: Path) -> dict[str, Any]:
    """Our manifest beside a compact adapter ({} for PEFT's own directories, which have none)."""
    if not path.is_file():
        return {}
    manifest = read_json(path)
    modules = manifest.get("modules", []) if isinstance(manifest, dict) else None
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "module" in m for m in modules):
        raise UserError(f"{path} is not an adapter manifest (expected an object with a list of modules)")
    return manifest


def _read_config(data: Any, where: Path) -> AdaLoraConfig:
    if not isinstance(data, dict):
        raise UserError(f"{where}: the adapter config is not a JSON object")
    try:
        return AdaLoraConfig.from_dict(data)
    except (UserError, TypeError) as exc:
        raise UserError(f"{where}: {exc}") from None


def _read_keep_lists(raw: Any, init_r: int, where: Path) -> dict[str, list[bool]]:
    """``{module path: keep list}`` from PEFT's AdaLoRA ``rank_pattern``,
    ``{"<path>.lora_E[.<adapter>]": [bool] * init_r}`` (our ``rank_pattern`` elsewhere is ranks)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: rank_pattern is not an object")
    keep_lists = {}
    for key, keep in raw.items():
        module, sep, _ = key.rpartition(".lora_E")
        if not sep:
            raise UserError(f"{where}: rank_pattern key {key!r} does not name a lora_E")
        if not isinstance(keep, list) or not all(isinstance(k, (bool, int)) and k in (0, 1) for k in keep):
            raise UserError(f"{where}: rank_pattern entry for {module} is not a list of booleans")
        if len(keep) != init_r:
            raise UserError(f"{where}: rank_pattern entry for {module} has {len(keep)} entries, init_r is {init_r}")
        keep_lists[module] = [bool(k) for k in keep]
    return keep_lists


def _keep_mask(module: str, e: torch.Tensor, keep: list[bool] | None, where: Path) -> torch.Tensor | None:
    """Which stored triplets to keep: none to drop when already sliced to the pattern; the pattern's
    True entries when stored at init_r; without a pattern, those with a nonzero E (PEFT's unsliced save)."""
    rows = e.shape[0]
    if keep is None:
        nonzero = e.view(-1) != 0
        return None if bool(nonzero.all()) else nonzero
    kept = sum(keep)
    if rows == kept:
        return None
    if rows == len(keep):
        return torch.tensor(keep, dtype=torch.bool)
    raise UserError(
        f"{where}: module {module} stores rank {rows}, inconsistent with its rank_pattern ({kept} kept of {len(keep)})"
    )


def _read_importance(info: dict | None, rank: int, module: str, where: Path) -> torch.Tensor | None:
    """The manifest's importance of a module's kept triplets, checked against the stored rank."""
    if info is None:
        return None
    if info.get("rank") != rank:
        raise UserError(f"{where}: manifest gives module {module} rank {info.get('rank')}, the tensors have {rank}")
    values = info.get("importance")
    if values is None:
        return None
    if len(values) != rank:
        raise UserError(f"{where}: manifest has {len(values)} importance values for module {module} of rank {rank}")
    return torch.tensor(values, dtype=torch.float32)


def _check_module(path: str, a: torch.Tensor, e: torch.Tensor, b: torch.Tensor, init_r: int | None, where: str) -> None:
    """A (r x in), E (r x 1), B (out x r), finite, r <= init_r; else a UserError naming the module."""
    if a.dim() != 2 or b.dim() != 2 or e.dim() != 2 or e.shape[1] != 1:
        raise UserError(
            f"{where}: module {path} has lora_A {tuple(a.shape)}, lora_E {tuple(e.shape)}, lora_B {tuple(b.shape)}; "
            "expected (r, in), (r, 1), (out, r)"
        )
    r = e.shape[0]
    if a.shape[0] != r or b.shape[1] != r:
        raise UserError(
            f"{where}: module {path} has inconsistent ranks: lora_A {tuple(a.shape)}, lora_E {tuple(e.shape)}, "
            f"lora_B {tuple(b.shape)}"
        )
    if init_r is not None and r > init_r:
        raise UserError(f"{where}: module {path} has rank {r}, above init_r {init_r}")
    for name, t in zip(PARTS, (a, e, b)):
        if not t.is_floating_point() or (t.numel() and not torch.isfinite(t).all()):
            raise UserError(f"{where}: module {path}.{name} is not a finite floating-point tensor")
