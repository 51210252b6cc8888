"""Merge a compact adapter into a base model's weights, one shard at a time (SPEC §3 "Merged model").

The model itself is never loaded. A plan phase reads only the checkpoint's headers, maps every
adapter module to the tensor that holds its weight and checks shapes and dtypes, so that bad input
fails before anything is written. Then the output shards are written one after another: the byte
ranges the adapter does not touch are copied in the kernel (``os.copy_file_range``, as ``cp``
does), and each adapted weight is read a block of rows at a time, merged in fp32
(``W += scale * L @ R``, the delta's two low-rank factors) and cast once to the base dtype. Each
finished shard is fsynced in the background while the next one is written. ``workers`` threads
share a shard's copies and blocks. Memory is two small blocks per worker plus the adapter,
whatever the size of a shard (a pickled base is the exception: its shard is loaded whole).

safetensors' own reader (``safe_open``) validates every shard; the byte offsets, which it does not
expose, come from the header itself (8-byte length + JSON, the documented format). Output shards
are written in the same format with the base's tensor order, dtypes and shapes.

Tied weights: when an adapted (or replaced) weight is tied to another in the base (``lm_head`` to
the input embedding with ``tie_word_embeddings``), the merged weight is written under its own name
next to its source, the source stays as it was, and the output config says
``tie_word_embeddings: false``: the merged model then computes exactly what base + adapter did.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from adalora_export.adapter import CompactAdapter
from adalora_export.errors import UserError
from adalora_export.hf import TASKS, check_model_dir, load_pretrained
from adalora_export.io import atomic_output_dir, check_output_path, load_tensors, read_json, write_json

ST_INDEX = "model.safetensors.index.json"
ST_SINGLE = "model.safetensors"
PT_INDEX = "pytorch_model.bin.index.json"
PT_SINGLE = "pytorch_model.bin"
# Files of these kinds are weights (of some format) and are never copied into the merged directory.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data")

FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
TORCH_TO_CODE = {
    **{v: k for k, v in FLOAT_DTYPES.items()},
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
ITEMSIZE |= {"F8_E4M3": 1, "F8_E5M2": 1}

BLOCK_ELEMENTS = 1 << 18  # elements per merge block: 1 MB of fp32, which stays in a core's cache
COPY_CHUNK = 64 << 20  # bytes per kernel copy call (the progress bar's granularity)


# ---------------------------------------------------------------- reading the base checkpoint
@dataclass
class _Entry:
    """One tensor of the base: its file, dtype code, shape and (safetensors) absolute byte range."""

    name: str
    file: int
    dtype: str
    shape: list[int]
    start: int = 0
    nbytes: int = 0


@dataclass
class _Checkpoint:
    """The base's weight files and every tensor's place in them, read from headers only."""

    directory: Path
    files: list[Path]
    entries: dict[str, _Entry]  # in file order, then offset order
    pickled: bool
    index: dict | None  # the base's index file, if sharded
    file_metadata: list[dict]

    def names_in(self, file: int) -> list[str]:
        return [name for name, e in self.entries.items() if e.file == file]

    def output_name(self, file: int) -> str:
        """pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors; safetensors keep theirs."""
        name = self.files[file].name
        if not self.pickled:
            return name
        return Path(name.replace("pytorch_model", "model", 1)).with_suffix(".safetensors").name


def _open_checkpoint(base_dir: Path, allow_pickle: bool) -> _Checkpoint:
    """Find the base's weights (safetensors, sharded or not; pickle only when allowed) and read their headers."""
    index = None
    if (base_dir / ST_INDEX).is_file():
        index = _read_index(base_dir / ST_INDEX)
    elif (base_dir / ST_SINGLE).is_file():
        files = [base_dir / ST_SINGLE]
    elif (base_dir / PT_INDEX).is_file():
        index = _read_index(base_dir / PT_INDEX)
    elif (base_dir / PT_SINGLE).is_file():
        files = [base_dir / PT_SINGLE]
    else:
        raise UserError(
            f"no weights in {base_dir}: expected {ST_SINGLE}, {ST_INDEX} with its shards, "
            f"or {PT_SINGLE}[.index.json] (with --allow-pickle)"
        )
    if index is not None:
        files = [base_dir / name for name in sorted(set(index["weight_map"].values()))]
    pickled = files[0].suffix != ".safetensors"
    entries: dict[str, _Entry] = {}
    metadata = []
    for i, path in enumerate(files):
        if pickled:  # shapes and dtypes need the whole file: one shard in memory at a time
            tensors = load_tensors(path, allow_pickle=allow_pickle)
            found = [
                _Entry(n, i, _dtype_code(t.dtype, path, n), list(t.shape), nbytes=t.numel() * t.element_size())
                for n, t in tensors.items()
            ]
            del tensors
            metadata.append({})
        else:
            meta, found = _read_safetensors_header(path, i)
            metadata.append(meta)
        for entry in found:
            if entry.name in entries:  # two shards claiming one tensor: which one would transformers take?
                raise UserError(f"tensor {entry.name} is in both {files[entries[entry.name].file]} and {path}")
            entries[entry.name] = entry
    if not entries:
        raise UserError(f"the weights in {base_dir} hold no tensors")
    if index is not None:
        for name, file in index["weight_map"].items():
            entry = entries.get(name)
            if entry is None or files[entry.file].name != file:
                raise UserError(f"{base_dir}: the index places {name} in {file}, which does not hold it")
    return _Checkpoint(base_dir, files, entries, pickled, index, metadata)


def _read_index(path: Path) -> dict:
    index = read_json(path)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict) or not index["weight_map"]:
        raise UserError(f"{path} has no weight_map")
    for file in index["weight_map"].values():
        if not isinstance(file, str) or "/" in file or not (path.parent / file).is_file():
            raise UserError(f"{path} names shard {file!r}, which is missing")
    return index


def _read_safetensors_header(path: Path, file: int) -> tuple[dict, list[_Entry]]:
    """Validate with safetensors' reader, then take each tensor's byte range from the header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
    except Exception as exc:  # safetensors raises several types for bad headers and offsets
        raise UserError(f"{path} is not a valid safetensors file ({str(exc).splitlines()[0]})") from None
    data_start = 8 + length
    meta = header.pop("__metadata__", None) or {}
    entries = []
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in ITEMSIZE:
            raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which adalora-export cannot copy")
        entries.append(_Entry(name, file, info["dtype"], list(info["shape"]), data_start + begin, end - begin))
    entries.sort(key=lambda e: e.start)
    return meta, entries


def _dtype_code(dtype: torch.dtype, path: object, name: str) -> str:
    if dtype not in TORCH_TO_CODE:
        raise UserError(f"{path}: tensor {name} has dtype {dtype}, which adalora-export cannot write")
    return TORCH_TO_CODE[dtype]


# ---------------------------------------------------------------- mapping adapter names to tensors
def resolve_tensor_name(name: str, names: set[str] | dict) -> str | None:
    """The checkpoint tensor that holds model parameter ``name``, or None.

    Exact names first. Checkpoints saved from a base model class, or converted from elsewhere, name
    tensors without (or with another) outer prefix: ``h.0.attn.c_attn.weight`` for GPT-2's
    ``transformer.h.0.attn.c_attn.weight``, ``layers.0...`` for Llama's ``model.layers.0...``. So the
    name's leading components are dropped one at a time (never past a layer index) and the unique
    checkpoint name ending with what is left is taken; two or more is an error naming them.
    """
    if name in names:
        return name
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if i > 0 and parts[i - 1].isdigit():
            break  # dropping a layer index would match another layer
        suffix = ".".join(parts[i:])
        matches = [n for n in names if n == suffix or n.endswith("." + suffix)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            shown = ", ".join(sorted(matches)[:3]) + (", ..." if len(matches) > 3 else "")
            raise UserError(
                f"{name} is ambiguous in the base checkpoint: {len(matches)} tensors end with {suffix} ({shown})"
            )
    return None


def _tied_weights(base_dir: Path, config: dict) -> dict[str, str]:
    """Tied parameter names (target -> source) of the base's model class, when its config ties them."""
    if config.get("tie_word_embeddings") is False:
        return {}  # the common case for large models; spares importing transformers' model classes
    import transformers

    try:
        hf_config = transformers.AutoConfig.from_pretrained(
            str(base_dir), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read {base_dir / 'config.json'}: {str(exc).splitlines()[0]}") from None
    tie = getattr(hf_config, "tie_word_embeddings", None)
    if tie is None:
        tie = getattr(hf_config.get_text_config(), "tie_word_embeddings", False)
    if not tie:
        return {}
    tied = {}
    for arch in config.get("architectures") or []:
        keys = getattr(getattr(transformers, arch, None), "_tied_weights_keys", None)
        if isinstance(keys, dict):  # transformers 5: {target: source}
            tied |= {k: v for k, v in keys.items() if isinstance(v, str)}
    return tied


# ---------------------------------------------------------------- the plan
@dataclass
class _Merge:
    """Write ``source`` + scale * L @ R (rows of the base layout) under ``name``."""

    name: str
    source: _Entry | torch.Tensor  # a base tensor, or an extra weight that replaced the tie source
    dtype: str
    shape: list[int]
    L: torch.Tensor
    R: torch.Tensor
    scale: float


@dataclass
class _Put:
    """Write an extra weight (already in ``dtype``) under ``name``."""

    name: str
    value: torch.Tensor
    dtype: str
    shape: list[int]


@dataclass
class _Copy:
    """Copy a base tensor unchanged."""

    name: str
    source: _Entry

    @property
    def dtype(self) -> str:
        return self.source.dtype

    @property
    def shape(self) -> list[int]:
        return self.source.shape


@dataclass
class _Plan:
    shards: list[list[_Copy | _Merge | _Put]] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)
    merged: int = 0
    replaced: int = 0
    added: list[str] = field(default_factory=list)


def _factors(adapter: CompactAdapter, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with scale * L @ R == adapter.delta_weight(path), in the base weight's layout."""
    m = adapter.modules[path]
    left, right = m.B.float(), m.A.float() * m.E.float()  # delta = B @ (A * E) * scale, out x in
    if m.fan_in_fan_out:  # Conv1D stores in x out: delta.T = (A * E).T @ B.T
        left, right = right.T, left.T
    return left.contiguous(), right.contiguous()


def _count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _cast(value: torch.Tensor, dtype: str) -> torch.Tensor:
    """An extra weight in the base tensor's dtype, contiguous, ready to write."""
    target = FLOAT_DTYPES.get(dtype)
    return (value.to(target) if target is not None else value).contiguous()


def _make_plan(adapter: CompactAdapter, ckpt: _Checkpoint, tied: dict[str, str]) -> _Plan:
    """Map every adapter module and extra weight to the base, checking everything before any write."""
    names = ckpt.entries
    where = f"the base {ckpt.directory}"
    merges: dict[str, _Merge] = {}
    puts: dict[str, _Put] = {}
    after: dict[str, list[_Merge | _Put]] = {}  # new tensors, written right after their tie source
    plan = _Plan()
    extra_sources = {}  # base tensors an extra weight replaces: a merge from one (a tie source) starts there

    def place(model_name: str, what: str) -> tuple[str, _Entry | None, _Entry, bool]:
        """(output name, the base tensor it replaces or None, the tensor holding its base value, tied)."""
        source_name = tied.get(model_name)
        if source_name is not None:
            source = resolve_tensor_name(source_name, names)
            if source is None:
                raise UserError(f"{what} is tied to {source_name}, which {where} does not hold")
            own = resolve_tensor_name(model_name, names)  # some checkpoints store the tied copy too
            return own or model_name, names[own] if own else None, names[source], True
        found = resolve_tensor_name(model_name, names)
        if found is None:
            raise UserError(f"{what} matches no tensor of {where} (looked for {model_name})")
        return found, names[found], names[found], False

    for path, module in adapter.modules.items():
        what = f"adapter module {path}"
        out_name, target, base, is_tied = place(path + ".weight", what)
        expected = [module.out_features, module.in_features]
        if module.fan_in_fan_out:
            expected.reverse()
        if base.shape != expected:
            raise UserError(f"{what} needs a weight of shape {expected}; {where} has {base.name} of shape {base.shape}")
        if base.dtype not in FLOAT_DTYPES:
            raise UserError(f"{what}: {base.name} in {where} is {base.dtype}; only float weights can take a merge")
        if out_name in merges:
            raise UserError(f"adapter modules {merges[out_name].name} and {path} map to the same tensor {out_name}")
        if module.rank == 0:
            continue  # nothing to add (and a tie may stay)
        compute = torch.float64 if base.dtype == "F64" else torch.float32
        left, right = (t.to(compute) for t in _factors(adapter, path))
        merges[out_name] = merge = _Merge(out_name, base, base.dtype, base.shape, left, right, adapter.scale)
        if is_tied:
            plan.untied.append(path + ".weight")
        if target is None:
            after.setdefault(base.name, []).append(merge)

    last = ckpt.names_in(len(ckpt.files) - 1)[-1]
    floats = [e for e in names.values() if e.dtype in FLOAT_DTYPES]
    model_dtype = max(floats, key=lambda e: e.nbytes).dtype if floats else None  # that of the largest tensor
    for model_name, value in adapter.extra_weights.items():
        what = f"extra weight {model_name}"
        if model_name not in tied and resolve_tensor_name(model_name, names) is None:
            # A weight the base lacks (a fresh classification head): added at the end, in the model's dtype.
            dtype = model_dtype if value.is_floating_point() and model_dtype else _dtype_code(value.dtype, "", "")
            after.setdefault(last, []).append(_Put(model_name, _cast(value, dtype), dtype, list(value.shape)))
            plan.added.append(model_name)
            continue
        out_name, target, base, is_tied = place(model_name, what)
        if list(value.shape) != base.shape:
            raise UserError(f"{what} has shape {list(value.shape)}; {where} has {base.name} of shape {base.shape}")
        if out_name in merges:
            raise UserError(f"{what} is also an adapted module's weight; the adapter is inconsistent")
        puts[out_name] = put = _Put(out_name, _cast(value, base.dtype), base.dtype, base.shape)
        if is_tied:
            plan.untied.append(model_name)
        if target is None:
            after.setdefault(base.name, []).append(put)
        else:
            extra_sources[target.name] = put.value
    for merge in merges.values():
        if isinstance(merge.source, _Entry) and merge.source.name in extra_sources:
            merge.source = extra_sources[merge.source.name]  # apply_to too puts extras in before the adapter adds

    for file in range(len(ckpt.files)):
        items: list[_Copy | _Merge | _Put] = []
        for name in ckpt.names_in(file):
            items.append(merges.get(name) or puts.get(name) or _Copy(name, names[name]))
            items.extend(after.get(name, []))
        plan.shards.append(items)
    plan.merged = sum(1 for m in merges.values() if m.L.shape[1] > 0)
    plan.replaced = len(puts)
    plan.added += [m.name for m in merges.values() if m.name not in ckpt.entries]
    return plan


# ---------------------------------------------------------------- writing the shards
class _Interrupted(Exception):
    """Another task failed: stop now (the whole output is discarded)."""


def _nbytes(item: _Copy | _Merge | _Put) -> int:
    return _count(item.shape) * ITEMSIZE[item.dtype]


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor (no copy when it is contiguous)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _header(items: list[_Copy | _Merge | _Put], metadata: dict) -> bytes:
    """A safetensors header for ``items`` in order, padded so the data starts 8-byte aligned."""
    header: dict = {"__metadata__": {**metadata, "format": "pt"}}
    offset = 0
    for item in items:
        size = _nbytes(item)
        header[item.name] = {"dtype": item.dtype, "shape": item.shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class _Base:
    """Read access to the base from any thread: file descriptors read at explicit offsets (safetensors),
    or, for pickle files, the loaded files that the shard being written needs."""

    def __init__(self, ckpt: _Checkpoint):
        self.ckpt = ckpt
        self.fds = [] if ckpt.pickled else [os.open(path, os.O_RDONLY) for path in ckpt.files]
        self.loaded: dict[int, dict[str, torch.Tensor]] = {}
        self.kernel_copy = hasattr(os, "copy_file_range")  # Linux; elsewhere plain reads and writes

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds, self.loaded = [], {}

    def prepare(self, items: list[_Copy | _Merge | _Put]) -> None:
        """Pickle bases: hold the files this shard reads (loaded whole) and no others."""
        if not self.ckpt.pickled:
            return
        needed = {item.source.file for item in items if isinstance(getattr(item, "source", None), _Entry)}
        self.loaded = {file: tensors for file, tensors in self.loaded.items() if file in needed}
        for file in sorted(needed - self.loaded.keys()):
            self.loaded[file] = load_tensors(self.ckpt.files[file], allow_pickle=True)

    def tensor(self, entry: _Entry) -> torch.Tensor:
        return self.loaded[entry.file][entry.name]

    def read(self, source: _Entry | torch.Tensor, offset: int, out: torch.Tensor) -> None:
        """Fill ``out`` (uint8) with a base weight's raw bytes from byte ``offset`` on."""
        if isinstance(source, torch.Tensor) or self.ckpt.pickled:
            tensor = source if isinstance(source, torch.Tensor) else self.tensor(source)
            out.copy_(_raw(tensor)[offset : offset + out.numel()])
            return
        view, pos = memoryview(out.numpy()), source.start + offset
        while view:
            n = os.preadv(self.fds[source.file], [view], pos)
            if n == 0:
                raise UserError(f"{self.ckpt.files[source.file]} ended early (truncated while being read?)")
            view, pos = view[n:], pos + n

    def copy(self, file: int, src: int, fd: int, dst: int, nbytes: int) -> int:
        """Copy base bytes to the output in the kernel, or by plain reads and writes where it cannot."""
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
                raise UserError(f"{self.ckpt.files[file]} ended early (truncated while being read?)")
            done += n
        return nbytes


def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    size = len(data)
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
    return size


def _tasks(base: _Base, items: list[_Copy | _Merge | _Put], offset: int) -> list[tuple]:
    """A shard's work as independent tasks at known output offsets, so that workers can share it:
    ("copy", file, src, dst, n) for runs of untouched base bytes (in COPY_CHUNK pieces),
    ("merge", item, row, rows, dst) for blocks of an adapted weight, ("put", tensor, dst) for the rest."""
    tasks: list[tuple] = []
    for item in items:
        size = _nbytes(item)
        if isinstance(item, _Copy) and not base.ckpt.pickled:
            src, last = item.source, tasks[-1] if tasks else ("",)
            if last[0] == "copy" and last[1] == src.file and last[2] + last[4] == src.start:
                tasks[-1] = (*last[:4], last[4] + size)  # neighbours in the base: one copy
            else:
                tasks.append(("copy", src.file, src.start, offset, size))
        elif isinstance(item, _Merge):
            rows, cols = item.shape
            row_bytes = cols * ITEMSIZE[item.dtype]
            block = max(1, BLOCK_ELEMENTS // max(cols, 1))
            tasks += [
                ("merge", item, row, min(block, rows - row), offset + row * row_bytes) for row in range(0, rows, block)
            ]
        else:
            tensor = item.value if isinstance(item, _Put) else base.tensor(item.source)
            tasks.append(("put", tensor, offset))
        offset += size
    return [piece for task in tasks for piece in _pieces(task)]


def _pieces(task: tuple) -> list[tuple]:
    """Long copies in COPY_CHUNK pieces: finer progress, and work that other workers can share."""
    if task[0] != "copy":
        return [task]
    _, file, src, dst, n = task
    return [("copy", file, src + k, dst + k, min(COPY_CHUNK, n - k)) for k in range(0, n, COPY_CHUNK)]


def _run(task: tuple, base: _Base, fd: int, stop: threading.Event, local: threading.local) -> int:
    """Do one task; returns the bytes it wrote."""
    if stop.is_set():
        raise _Interrupted
    kind = task[0]
    if kind == "copy":
        _, file, src, dst, n = task
        return base.copy(file, src, fd, dst, n)
    if kind == "put":
        _, tensor, dst = task
        return _pwrite(fd, memoryview(_raw(tensor).numpy()), dst)
    _, item, row, n, dst = task
    return _merge_block(base, item, row, n, fd, dst, local)


def _merge_block(base: _Base, item: _Merge, row: int, n: int, fd: int, dst: int, local: threading.local) -> int:
    """Rows ``row:row+n`` of an adapted weight: read, add scale * L @ R in fp32, cast once, write."""
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
    return _pwrite(fd, memoryview(raw.numpy()), dst)


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


def _write_shards(ckpt: _Checkpoint, plan: _Plan, out_dir: Path, workers: int) -> int:
    """Write the output shards one after another, ``workers`` threads sharing each shard's tasks
    (kernel copies, reads, writes and matrix products all release the GIL). Returns bytes written."""
    base = _Base(ckpt)
    stop, local = threading.Event(), threading.local()
    # Blocks are small: torch's own threads (OpenMP teams, set per thread) only add hand-offs, 10-50x
    # slower on a busy machine. The parallelism is the workers'.
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,))
    syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync")
    syncs, futures, fd, written = [], [], None, 0
    try:
        for file, items in enumerate(plan.shards):
            name = ckpt.output_name(file)
            header = _header(items, ckpt.file_metadata[file])
            total = len(header) + sum(_nbytes(item) for item in items)
            fd = os.open(out_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"merge {name}") as bar:
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


def _copy_small_files(base_dir: Path, out_dir: Path, untie: bool) -> None:
    """Copy config, generation config, tokenizer and other non-weight files; untie in config.json if needed."""
    for path in sorted(base_dir.iterdir()):
        name = path.name
        if not path.is_file() or name.startswith(".") or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            continue
        if name == "config.json" and untie:
            config = read_json(path)
            config["tie_word_embeddings"] = False
            write_json(out_dir / name, config)
        else:
            shutil.copyfile(path, out_dir / name)


def _write_index(ckpt: _Checkpoint, plan: _Plan, out_dir: Path) -> None:
    """The base's index with the output's shard names, tensors and total size."""
    weight_map = {}
    total_size = 0
    for file, items in enumerate(plan.shards):
        for item in items:
            weight_map[item.name] = ckpt.output_name(file)
            total_size += _nbytes(item)
    metadata = dict(ckpt.index.get("metadata") or {})
    metadata["total_size"] = total_size
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(_nbytes(i) // ITEMSIZE[i.dtype] for items in plan.shards for i in items)
    write_json(out_dir / ST_INDEX, {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})


# ---------------------------------------------------------------- public functions
def merge_adapter_into_base(
    adapter: CompactAdapter,
    base_dir: str | os.PathLike,
    output: str | os.PathLike,
    workers: int = 1,
    verify: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Write base + adapter as a plain HF model directory at ``output``, streaming shard by shard.

    The output keeps the base's dtype, shard layout and tensor order (safetensors; a pickled base
    becomes safetensors), with its config, generation config and tokenizer files. Every problem
    with the input is a UserError raised before anything is written. Returns a report: shards,
    tensors merged/replaced/added, weights untied, bytes written, seconds, and with ``verify`` the
    largest absolute difference between the merged model and base + adapter unmerged.
    """
    start = time.perf_counter()
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    base_dir, output = Path(base_dir), Path(output)
    config = check_model_dir(base_dir)
    if output.absolute().resolve() == base_dir.absolute().resolve():
        raise UserError(f"the output {output} is the base directory; choose another")
    check_output_path(output, overwrite)
    ckpt = _open_checkpoint(base_dir, allow_pickle)
    plan = _make_plan(adapter, ckpt, _tied_weights(base_dir, config))
    with atomic_output_dir(output, overwrite) as tmp:
        written = _write_shards(ckpt, plan, tmp, workers)
        if ckpt.index is not None:
            _write_index(ckpt, plan, tmp)
        _copy_small_files(base_dir, tmp, untie=bool(plan.untied))
    report = {
        "output": str(output),
        "shards": len(ckpt.files),
        "tensors_merged": plan.merged,
        "tensors_replaced": plan.replaced,
        "tensors_added": plan.added,
        "untied": plan.untied,
        "bytes": written,
        "seconds": time.perf_counter() - start,
        "verify_max_diff": None,
    }
    if verify:
        report["verify_max_diff"] = verify_merge(adapter, base_dir, output, allow_pickle=allow_pickle)
    return report


def merge_into_base(
    adapter_dir: str | os.PathLike,
    output: str | os.PathLike,
    base: str | os.PathLike | None = None,
    workers: int = 1,
    verify: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """``export ADAPTER_DIR --merge``: load the adapter, merge it into ``base`` (default: the adapter's own
    ``base_model_name_or_path`` when that is a local directory) and print a summary."""
    from adalora_export.formats import load_adapter

    check_output_path(output, overwrite)
    if Path(output).absolute().resolve() == Path(adapter_dir).absolute().resolve():
        raise UserError(f"the output {output} is the adapter directory; choose another")
    adapter = load_adapter(adapter_dir, allow_pickle=allow_pickle)
    if base is None:
        named = adapter.base_model_name_or_path
        if not named or not Path(named).is_dir():
            raise UserError(f"{adapter_dir} names base model {named!r}, which is not a local directory; pass --base")
        base = named
    report = merge_adapter_into_base(
        adapter, base, output, workers=workers, verify=verify, overwrite=overwrite, allow_pickle=allow_pickle
    )
    gib = report["bytes"] / 2**30
    print(
        f"merged {report['tensors_merged']} weights into {base} -> {output}: {report['shards']} shard(s), "
        f"{gib:.2f} GiB in {report['seconds']:.1f} s"
    )
    if report["untied"]:
        print(f"untied {', '.join(report['untied'])} from its tied source (config: tie_word_embeddings=false)")
    if report["tensors_added"]:
        print(f"added tensors the base lacks: {', '.join(report['tensors_added'])}")
    if verify:
        print(f"verify: largest |merged - (base + adapter)| = {report['verify_max_diff']:.3g} (fp32 forward)")
    return report


@torch.no_grad()
def verify_merge(
    adapter: CompactAdapter,
    base_dir: str | os.PathLike,
    merged_dir: str | os.PathLike,
    batches: int = 3,
    allow_pickle: bool = False,
) -> float:
    """Largest absolute difference of outputs (logits or hidden states) between base + adapter unmerged and
    the merged model, both run in fp32 on ``batches`` random sequences. One model in memory at a time."""
    task = adapter.task_type if adapter.task_type in TASKS else None  # else the base config's architecture
    base = adapter.apply_to(load_pretrained(base_dir, task, allow_pickle=allow_pickle, dtype=torch.float32).eval())
    text = base.config.get_text_config()
    length = min(16, getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 16)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, text.vocab_size, (1, length), generator=g) for _ in range(batches)]
    expected = [_output(base(input_ids=ids)) for ids in inputs]
    del base
    merged = load_pretrained(merged_dir, task, dtype=torch.float32).eval()
    return max((_output(merged(input_ids=ids)) - want).abs().max().item() for ids, want in zip(inputs, expected))


def _output(result) -> torch.Tensor:
    logits = getattr(result, "logits", None)
    return logits if logits is not None else result.last_hidden_state
