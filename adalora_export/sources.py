"""The one door from a path to a ``CompactAdapter``: whatever the path holds, it is read here.

A source is a compact adapter directory (ours or PEFT's AdaLoRA save), a training state directory (a
checkpoint or a run's ``final/``), or a training run (its ``final/``, else its latest checkpoint).
Converters never read paths: they take the ``CompactAdapter`` this module returns, and the base
directory ``resolve_base_dir`` picks (loading that base is ``CompactAdapter.load_base``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .adapter import CompactAdapter, TaskInfo
from .errors import UserError
from .formats.peft import ADAPTER_CONFIG, is_adapter_dir, read_adapter_dir
from .formats.state import compact_from_state, is_state_dir, latest_checkpoint, read_state_dir

FINAL_STATE = "final"


def find_adapter_source(path: str | os.PathLike) -> Path:
    """The directory to read for ``path``: an adapter or state directory itself, or a training run's
    final state, else its latest ``checkpoint-<step>``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is not a directory (expected an adapter directory, a checkpoint or a training run)")
    for candidate in (path, path / FINAL_STATE):
        if is_state_dir(candidate) or is_adapter_dir(candidate):
            return candidate
    checkpoint = latest_checkpoint(path)
    if checkpoint is not None:
        return checkpoint
    raise UserError(
        f"{path} holds no adapter: expected {ADAPTER_CONFIG}, a training state, "
        f"or a training run with {FINAL_STATE}/ or checkpoint-<step>/"
    )


def load_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> CompactAdapter:
    """Read any adapter source into a ``CompactAdapter`` (fp32, CPU, every module at its kept rank).

    A state directory gives the triplets its mask in force keeps. Bad input raises UserError naming
    the file and module.
    """
    source = find_adapter_source(path)
    if is_state_dir(source):
        state = read_state_dir(source)
        meta = {k: state.meta[k] for k in ("base_model_name_or_path", "task_type") if state.meta.get(k)}
        task_info = TaskInfo.from_json(state.meta.get("task_info"), str(source))
        return compact_from_state(state, task_info=task_info, **meta)
    return read_adapter_dir(source, allow_pickle)


def resolve_base_dir(adapter: CompactAdapter, base: str | os.PathLike | None) -> Path:
    """``base`` when given, else the adapter's ``base_model_name_or_path`` when that is a local directory."""
    if base is not None:
        return Path(base)
    recorded = adapter.base_model_name_or_path
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    raise UserError(
        f"no base model: pass --base BASE_DIR (the adapter names {recorded!r}, which is not a local directory)"
        if recorded
        else "no base model: pass --base BASE_DIR (the adapter does not name one)"
    )
