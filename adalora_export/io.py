"""Safe file handling shared by every command: atomic outputs and guarded tensor loading.

Rules (README "Safety"): outputs are written to a temporary sibling and renamed into place only
when complete; an existing output is never replaced without ``overwrite``; an output never is,
contains or replaces part of its command's inputs, even with ``overwrite`` (``check_output_spares_inputs``,
called through ``check_output_path`` by every command before any work); missing parent directories
of an output are created by the writer, and removed again if it fails; pickle files are read only
when the user allowed it, and then with ``torch.load(weights_only=True)``.

Temporary siblings carry the writer's pid (``.NAME.tmp-PID-XXXX``): a process killed mid-write
(SIGKILL runs no cleanup) leaves one behind, and the next successful write of NAME removes those
whose process is gone. Running out of space (a full disk, a quota, a file-size limit) while writing
an output is a UserError naming it, with the temporary sibling removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are read: the runtime and --help never load it
    import torch

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_STALE = re.compile(r"(?:tmp|old)-(\d+)(?:-|$)")  # after ".NAME.": what atomic outputs name their siblings


def check_output_path(
    path: str | os.PathLike,
    overwrite: bool,
    make_parents: bool = True,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
) -> Path:
    """Fail early (before any work) if ``path`` is refused by ``check_output_spares_inputs`` (``inputs``: what
    the command reads), exists and may not be replaced, or cannot be created (with ``make_parents``, every
    command's rule: missing parent directories will be created, by the atomic writers, so their nearest
    existing one counts)."""
    check_output_spares_inputs(path, inputs or {})
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"output {path} already exists; pass --overwrite to replace it")
    parent = path.absolute().parent
    while make_parents and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"cannot write {path}: {parent} is a file, not a directory")
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {path}: directory {parent} is not writable")
    return path


def check_output_spares_inputs(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """The one rule for every command's output: it may not be one of the command's inputs, contain one (be
    an ancestor directory of it), or replace an existing part of one (an existing path inside an input
    directory), with or without --overwrite. A new path inside an input directory is allowed
    (``export RUN/adapter --onnx --output RUN/onnx``). ``inputs`` maps what each input is ("the base
    model") to its path (None: not given; a path that does not exist holds nothing to lose and is left
    to the command's own checks). Paths compare absolute with symlinks resolved: both the entry that
    would be replaced (its directory resolved) and, when the output is a link, where it points."""
    given = Path(os.path.abspath(output))
    entry = given.parent.resolve() / given.name if given.name else given
    targets = dict.fromkeys([entry, entry.resolve()])
    for what, path in inputs.items():
        if path is None or not Path(path).exists():
            continue
        source = Path(path).resolve()
        for target in targets:
            if target == source:
                problem = "would replace the input"
            elif source.is_relative_to(target):
                problem = "contains the input"
            elif target.is_relative_to(source) and os.path.lexists(target):
                problem = "would replace part of the input"
            else:
                continue
            raise UserError(f"the output {output} {problem} {path} ({what}); choose another output")


@contextlib.contextmanager
def output_parents(path: str | os.PathLike) -> Iterator[None]:
    """Create the missing parent directories of the output ``path`` for the block; if the block fails,
    remove again those it created (still empty), so that a refused or failed write leaves no new directory."""
    created = []
    parent = Path(path).absolute().parent
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    for directory in reversed(created):
        directory.mkdir(exist_ok=True)
    try:
        yield
    except BaseException:
        for directory in created:  # deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success rename it to ``path``, else delete it
    (missing parent directories are created first, and removed again on failure: ``output_parents``).

    The old output (with ``overwrite``) is moved aside first and removed only after the new one is
    in place, so a failure at any point leaves either the old complete output or the new one.
    """
    path = check_output_path(path, overwrite)
    with output_parents(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.absolute().parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the output gets the usual permissions
        try:
            yield tmp
            _fsync_tree(tmp)
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
                os.replace(tmp, path)
                _remove(old)
            else:
                os.replace(tmp, path)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            _raise_if_disk_full(exc, path)
            raise
    remove_stale_siblings(path)


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it into place only on success (parents as
    ``atomic_output_dir``)."""
    path = check_output_path(path, overwrite)
    with output_parents(path):
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.absolute().parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
        try:
            yield tmp
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            _raise_if_disk_full(exc, path)
            raise
    remove_stale_siblings(path)


def remove_stale_siblings(path: str | os.PathLike) -> list[Path]:
    """Remove the ``.NAME.tmp-PID-*`` / ``.NAME.old-PID`` siblings of ``path`` whose process is gone.

    Only a writer killed mid-write leaves them (every other exit removes its own); a sibling of a
    live process (another writer of the same name, or a reused pid) is left alone. Returns the removed.
    """
    path = Path(path).absolute()
    prefix = f".{path.name}."
    removed = []
    for sibling in path.parent.iterdir():
        match = _STALE.match(sibling.name[len(prefix) :]) if sibling.name.startswith(prefix) else None
        if match is not None and not _alive(int(match.group(1))):
            _remove(sibling)
            removed.append(sibling)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def disk_full(exc: BaseException | None) -> OSError | None:
    """The out-of-space error (a full disk, a quota, a file-size limit) behind ``exc``, or None.

    Follows the cause/context chain, since libraries wrap the OSError (PIL raises another error
    while handling it); safetensors' Rust writer reports it only as text ("... (os error 28)").
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        match = re.search(r"\(os error (\d+)\)", str(exc))
        if match and int(match.group(1)) in DISK_FULL_ERRNOS:
            return OSError(int(match.group(1)), os.strerror(int(match.group(1))))
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_message(error: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for the user: what could not be written, and why."""
    where = path or error.filename
    return f"cannot write{f' {where}' if where else ''}: {error.strerror} (disk full, quota or file-size limit)"


def _raise_if_disk_full(exc: BaseException, path: Path) -> None:
    error = disk_full(exc)
    if error is not None:
        raise UserError(disk_full_message(error, path) + "; nothing was written") from exc


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync_tree(root: Path) -> None:
    """Flush every file of an output to disk, and give each the usual permissions: libraries that
    write through temporary files (onnx's external data, for one) leave them 0600, which another
    account (a serving user) could not read."""
    mode = 0o666 & ~_umask()
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            os.chmod(path, mode)
            with open(path, "rb") as fh:
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


def check_safetensors(path: str | os.PathLike) -> None:
    """Validate a safetensors file's header against the file (no tensor is read); a UserError naming it if damaged."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:  # safetensors raises several types for bad headers and offsets
        raise UserError(f"{path} is not a valid safetensors file ({str(exc).splitlines()[0]})") from None


def load_tensors(path: str | os.PathLike, allow_pickle: bool = False, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a whole tensor file: safetensors always; ``.bin``/``.pt`` only with ``allow_pickle``.

    Truncated or corrupt files, and NaN/Inf values, are UserErrors naming the file (and tensor).
    """
    import torch

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


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system (glibc's ``malloc_trim``).

    Why: torch's CPU tensors come from malloc, and glibc keeps large freed blocks in the heap once its
    mmap threshold has grown, so a freed model still counts in the process's memory while the next
    stage (an onnxruntime session of the same size) allocates its own.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
