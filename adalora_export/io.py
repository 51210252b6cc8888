"""Safe file handling shared by every command: atomic outputs and guarded tensor loading.

Rules (README "Safety"): outputs are written to a temporary sibling and renamed into place only
when complete; an existing output is never replaced without ``overwrite``; pickle files are read
only when the user allowed it, and then with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import UserError


def check_output_path(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any work) if ``path`` exists and may not be replaced, or cannot be created."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"output {path} already exists; pass --overwrite to replace it")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {path}: directory {parent} is not writable")
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success rename it to ``path``, else delete it.

    The old output (with ``overwrite``) is moved aside first and removed only after the new one is
    in place, so a failure at any point leaves either the old complete output or the new one.
    """
    path = check_output_path(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.absolute().parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the output gets the usual permissions
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it into place only on success."""
    path = check_output_path(path, overwrite)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.absolute().parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())


def write_json(path: str | os.PathLike, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None


def load_tensors(path: str | os.PathLike, allow_pickle: bool = False, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a whole tensor file: safetensors always; ``.bin``/``.pt`` only with ``allow_pickle``.

    Truncated or corrupt files, and NaN/Inf values, are UserErrors naming the file (and tensor).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path), device=device)
        except Exception as exc:  # safetensors raises several types for bad headers and offsets
            raise UserError(f"{path} is not a valid safetensors file ({str(exc).splitlines()[0]})") from None
    else:
        if not allow_pickle:
            raise UserError(f"{path} is a pickle file; pass --allow-pickle to read it (loaded with weights_only=True)")
        try:
            tensors = torch.load(str(path), map_location=device, weights_only=True)
        except Exception as exc:
            raise UserError(f"{path} could not be read safely ({str(exc).splitlines()[0]})") from None
        if not isinstance(tensors, dict) or not all(torch.is_tensor(v) for v in tensors.values()):
            raise UserError(f"{path} does not hold a flat dict of tensors")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() and not torch.isfinite(tensor).all():
            raise UserError(f"{path}: tensor {name} holds NaN or Inf values")
    return tensors
