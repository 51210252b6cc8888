"""Streaming the output: safetensors shards written one after another, then the index and small files.

The byte ranges the adapter does not touch are copied in the kernel (``os.copy_file_range``, as
``cp`` does); each adapted weight is read a block of rows at a time, merged in fp32
(``W += scale * L @ R``) and cast once to the base dtype. Each finished shard is fsynced in the
background while the next one is written. ``workers`` threads share a shard's tasks. Memory is two
small blocks per worker plus the adapter, whatever the size of a shard (a pickled base is the
exception: its shard is loaded whole).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from adalora_export.errors import UserError
from adalora_export.io import load_tensors, write_json

from .base_weights import FLOAT_DTYPES, ITEMSIZE, ST_INDEX, BaseWeights, Entry
from .plan import Item, Merge, Plan, Put, nbytes

# Files of these kinds are weights (of some format) and are never copied into the merged directory.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data")
# Subfolders holding the base in another format (exports of the unmerged weights): never copied.
EXPORT_FOLDERS = ("onnx", "openvino", "coreml", "tflite", "gguf")
# A byte bar in KiB / MiB / GiB, the summary's units (tqdm's own "B" with divisor 1024 would print M and G).
BINARY_BYTES = dict(
    unit="iB",
    unit_scale=True,
    unit_divisor=1024,
    bar_format="{l_bar}{bar}| {n_fmt}iB/{total_fmt}iB [{elapsed}<{remaining}, {rate_fmt}]",
)
BLOCK_ELEMENTS = 1 << 18  # elements per merge block: 1 MB of fp32, which stays in a core's cache
COPY_CHUNK = 64 << 20  # bytes per kernel copy call (the progress bar's granularity)


class _Interrupted(Exception):
    """Another task failed: stop now (the whole output is discarded)."""


@dataclass
class CopyTask:
    """Copy ``n`` untouched base bytes of file ``file`` from ``src`` to output offset ``dst``."""

    file: int
    src: int
    dst: int
    n: int


@dataclass
class BlockTask:
    """Merge rows ``row:row+rows`` of ``item`` and write them at output offset ``dst``."""

    item: Merge
    row: int
    rows: int
    dst: int


@dataclass
class PutTask:
    """Write ``tensor``'s bytes at output offset ``dst``."""

    tensor: torch.Tensor
    dst: int


Task = CopyTask | BlockTask | PutTask


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor (no copy when it is contiguous)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    size = len(data)
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
    return size


def _header(items: list[Item], metadata: dict) -> bytes:
    """A safetensors header for ``items`` in order, padded so the data starts 8-byte aligned."""
    header: dict = {"__metadata__": {**metadata, "format": "pt"}}
    offset = 0
    for item in items:
        size = nbytes(item)
        header[item.name] = {"dtype": item.dtype, "shape": item.shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class _Base:
    """Read access to the base from any thread: file descriptors read at explicit offsets (safetensors),
    or, for pickle files, the loaded files that the shard being written needs."""

    def __init__(self, base_weights: BaseWeights):
        self.base_weights = base_weights
        self.fds = [] if base_weights.pickled else [os.open(path, os.O_RDONLY) for path in base_weights.files]
        self.loaded: dict[int, dict[str, torch.Tensor]] = {}
        self.kernel_copy = hasattr(os, "copy_file_range")  # Linux; elsewhere plain reads and writes

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds, self.loaded = [], {}

    def prepare(self, items: list[Item]) -> None:
        """Pickle bases: hold the files this shard reads (loaded whole) and no others."""
        if not self.base_weights.pickled:
            return
        needed = {item.source.file for item in items if isinstance(getattr(item, "source", None), Entry)}
        self.loaded = {file: tensors for file, tensors in self.loaded.items() if file in needed}
        for file in sorted(needed - self.loaded.keys()):
            self.loaded[file] = load_tensors(self.base_weights.files[file], allow_pickle=True)

    def tensor(self, entry: Entry) -> torch.Tensor:
        return self.loaded[entry.file][entry.name]

    def read(self, source: Entry | torch.Tensor, offset: int, out: torch.Tensor) -> None:
        """Fill ``out`` (uint8) with a base weight's raw bytes from byte ``offset`` on."""
        if isinstance(source, torch.Tensor) or self.base_weights.pickled:
            tensor = source if isinstance(source, torch.Tensor) else self.tensor(source)
            out.copy_(_raw(tensor)[offset : offset + out.numel()])
            return
        view, pos = memoryview(out.numpy()), source.start + offset
        while view:
            n = os.preadv(self.fds[source.file], [view], pos)
            if n == 0:
                raise UserError(f"{self.base_weights.files[source.file]} ended early (truncated while being read?)")
            view, pos = view[n:], pos + n

    def copy(self, task: CopyTask, fd: int) -> int:
        """Copy base bytes to the output in the kernel, or by plain reads and writes where it cannot."""
        file, src, dst, nbytes = task.file, task.src, task.dst, task.n
        done = 0
        while done < nbytes:
            if self.kernel_copy:
                try:
                    n = os.copy_file_range(self.fds[file], fd, nbytes - done, src + done, dst + done)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    self.kernel_copy = False
                    continue
            else:
                data = os.pread(self.fds[file], nbytes - done, src + done)
                n = len(data)
                _pwrite(fd, memoryview(data), dst + done)
            if n == 0:
                raise UserError(f"{self.base_weights.files[file]} ended early (truncated while being read?)")
            done += n
        return nbytes


def _tasks(base: _Base, items: list[Item], offset: int) -> list[Task]:
    """A shard's work as independent tasks at known output offsets, so that workers can share it:
    copies of runs of untouched base bytes (in COPY_CHUNK pieces), blocks of rows of adapted weights,
    and puts for the rest."""
    tasks: list[Task] = []
    for item in items:
        size = nbytes(item)
        if isinstance(item, Merge):
            rows, cols = item.shape
            row_bytes = cols * ITEMSIZE[item.dtype]
            block = max(1, BLOCK_ELEMENTS // max(cols, 1))
            tasks += [
                BlockTask(item, row, min(block, rows - row), offset + row * row_bytes) for row in range(0, rows, block)
            ]
        elif isinstance(item, Put):
            tasks.append(PutTask(item.value, offset))
        elif base.base_weights.pickled:
            tasks.append(PutTask(base.tensor(item.source), offset))
        else:
            src, last = item.source, tasks[-1] if tasks else None
            if isinstance(last, CopyTask) and last.file == src.file and last.src + last.n == src.start:
                last.n += size  # neighbours in the base: one copy
            else:
                tasks.append(CopyTask(src.file, src.start, offset, size))
        offset += size
    return [piece for task in tasks for piece in _pieces(task)]


def _pieces(task: Task) -> list[Task]:
    """Long copies in COPY_CHUNK pieces: finer progress, and work that other workers can share."""
    if not isinstance(task, CopyTask):
        return [task]
    return [
        CopyTask(task.file, task.src + k, task.dst + k, min(COPY_CHUNK, task.n - k))
        for k in range(0, task.n, COPY_CHUNK)
    ]


def _run(task: Task, base: _Base, fd: int, stop: threading.Event, local: threading.local) -> int:
    """Do one task; returns the bytes it wrote."""
    if stop.is_set():
        raise _Interrupted
    if isinstance(task, CopyTask):
        return base.copy(task, fd)
    if isinstance(task, PutTask):
        return _pwrite(fd, memoryview(_raw(task.tensor).numpy()), task.dst)
    return _merge_block(base, task, fd, local)


def _merge_block(base: _Base, task: BlockTask, fd: int, local: threading.local) -> int:
    """Rows ``row:row+rows`` of an adapted weight: read, add scale * L @ R in fp32, cast once, write."""
    item, row, n = task.item, task.row, task.rows
    cols = item.shape[1]
    dtype = FLOAT_DTYPES[item.dtype]
    raw = _buffer(local, "raw", n * cols * ITEMSIZE[item.dtype], torch.uint8)
    base.read(item.source, row * cols * ITEMSIZE[item.dtype], raw)
    weight = raw.view(dtype).view(n, cols)
    if dtype == item.L.dtype:
        weight.addmm_(item.L[row : row + n], item.R, alpha=item.scale)
    else:  # bf16/fp16: the sum is formed in fp32 and rounded once
        acc = _buffer(local, "acc", n * cols, torch.float32).view(n, cols)
        acc.copy_(weight)
        acc.addmm_(item.L[row : row + n], item.R, alpha=item.scale)
        weight.copy_(acc)
    return _pwrite(fd, memoryview(raw.numpy()), task.dst)


def _buffer(local: threading.local, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch buffer of at least ``numel`` elements, reused across blocks."""
    buf = getattr(local, name, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        setattr(local, name, buf)
    return buf[:numel]


def _finish_shard(fd: int) -> None:
    """Flush a written shard to disk (in the background, while the next one is written) and close it."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shards(base_weights: BaseWeights, plan: Plan, out_dir: Path, workers: int) -> int:
    """Write the output shards one after another, ``workers`` threads sharing each shard's tasks
    (kernel copies, reads, writes and matrix products all release the GIL). Returns bytes written."""
    base = _Base(base_weights)
    stop, local = threading.Event(), threading.local()
    # Blocks are small: torch's own threads (OpenMP teams, set per thread) only add hand-offs, 10-50x
    # slower on a busy machine. The parallelism is the workers'.
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,))
    syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync")
    syncs, futures, fd, written = [], [], None, 0
    try:
        for file, items in enumerate(plan.shards):
            name = base_weights.output_name(file)
            header = _header(items, base_weights.file_metadata[file])
            total = len(header) + sum(nbytes(item) for item in items)
            fd = os.open(out_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            with tqdm(total=total, desc=f"merge {name}", **BINARY_BYTES) as bar:
                bar.update(_pwrite(fd, memoryview(header), 0))
                base.prepare(items)
                futures = [pool.submit(_run, t, base, fd, stop, local) for t in _tasks(base, items, len(header))]
                for future in as_completed(futures):
                    bar.update(future.result())
            syncs.append(syncer.submit(_finish_shard, fd))
            fd = None
            written += total
        for sync in syncs:
            sync.result()
        return written
    except BaseException:  # a failure or Ctrl-C: stop the remaining tasks now
        stop.set()
        for future in futures:
            future.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after this no task can touch ``fd``
        if fd is not None:
            os.close(fd)
        syncer.shutdown(wait=True)
        base.close()
        torch.set_num_threads(threads)


def copy_small_files(base_dir: Path, out_dir: Path, config: dict) -> None:
    """Copy generation config, tokenizer and other non-weight files; write ``config`` as config.json.

    Subfolders go along whole (sentence-transformers keeps its pipeline there: ``1_Pooling/``,
    ``2_Dense/``, which ``modules.json`` names), except other formats' copies of the base weights
    (``EXPORT_FOLDERS``), which the merged weights would contradict.
    """
    for path in sorted(base_dir.iterdir()):
        name = path.name
        if path.is_dir() and not path.is_symlink() and not name.startswith(".") and name not in EXPORT_FOLDERS:
            shutil.copytree(path, out_dir / name, symlinks=True)  # links stay links: nothing read from outside
            continue
        if not path.is_file() or name.startswith(".") or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            continue
        if name == "config.json":
            write_json(out_dir / name, config)
        else:
            shutil.copyfile(path, out_dir / name)


def write_index(base_weights: BaseWeights, plan: Plan, out_dir: Path) -> None:
    """The base's index with the output's shard names, tensors and total size."""
    weight_map = {}
    total_size = 0
    for file, items in enumerate(plan.shards):
        for item in items:
            weight_map[item.name] = base_weights.output_name(file)
            total_size += nbytes(item)
    metadata = dict(base_weights.index.get("metadata") or {})
    metadata["total_size"] = total_size
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(nbytes(i) // ITEMSIZE[i.dtype] for items in plan.shards for i in items)
    write_json(out_dir / ST_INDEX, {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})
