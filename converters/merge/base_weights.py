"""Reading the base's weight files from their headers: weight files, index, each tensor's place, tied weights.

safetensors' own reader (``safe_open``) validates every shard; the byte offsets, which it does not
expose, come from the header itself (8-byte length + JSON, the documented format). A pickled base
has no header: its shards are loaded one at a time to learn shapes and dtypes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from adalora_export.errors import UserError
from adalora_export.io import load_tensors, read_json

ST_INDEX = "model.safetensors.index.json"
ST_SINGLE = "model.safetensors"
PT_INDEX = "pytorch_model.bin.index.json"
PT_SINGLE = "pytorch_model.bin"

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


@dataclass
class Entry:
    """One tensor of the base: its file, dtype code, shape and (safetensors) absolute byte range."""

    name: str
    file: int
    dtype: str
    shape: list[int]
    start: int = 0
    nbytes: int = 0


@dataclass
class BaseWeights:
    """The base's weight files and every tensor's place in them, read from headers only."""

    directory: Path
    files: list[Path]
    entries: dict[str, Entry]  # in file order, then offset order
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


def open_base_weights(base_dir: Path, allow_pickle: bool) -> BaseWeights:
    """Find the base's weights (safetensors, sharded or not; pickle only when allowed) and read their headers."""
    index, files = _find_weight_files(base_dir)
    pickled = files[0].suffix != ".safetensors"
    entries: dict[str, Entry] = {}
    metadata = []
    for i, path in enumerate(files):
        if pickled:
            meta, found = {}, _read_pickled_entries(path, i, allow_pickle)
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
    return BaseWeights(base_dir, files, entries, pickled, index, metadata)


def _find_weight_files(base_dir: Path) -> tuple[dict | None, list[Path]]:
    """(the index if sharded, the weight files), safetensors preferred over pickle."""
    for index_name, single in ((ST_INDEX, ST_SINGLE), (PT_INDEX, PT_SINGLE)):
        if (base_dir / index_name).is_file():
            index = _read_index(base_dir / index_name)
            return index, [base_dir / name for name in sorted(set(index["weight_map"].values()))]
        if (base_dir / single).is_file():
            return None, [base_dir / single]
    raise UserError(
        f"no weights in {base_dir}: expected {ST_SINGLE}, {ST_INDEX} with its shards, "
        f"or {PT_SINGLE}[.index.json] (with --allow-pickle)"
    )


def _read_index(path: Path) -> dict:
    index = read_json(path)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict) or not index["weight_map"]:
        raise UserError(f"{path} has no weight_map")
    for file in index["weight_map"].values():
        if not isinstance(file, str) or "/" in file or not (path.parent / file).is_file():
            raise UserError(f"{path} names shard {file!r}, which is missing")
    return index


def _read_pickled_entries(path: Path, file: int, allow_pickle: bool) -> list[Entry]:
    """Shapes and dtypes of a pickle file need the whole file: one shard in memory at a time."""
    tensors = load_tensors(path, allow_pickle=allow_pickle)
    return [
        Entry(n, file, dtype_code(t.dtype, path, n), list(t.shape), nbytes=t.numel() * t.element_size())
        for n, t in tensors.items()
    ]


def _read_safetensors_header(path: Path, file: int) -> tuple[dict, list[Entry]]:
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
        entries.append(Entry(name, file, info["dtype"], list(info["shape"]), data_start + begin, end - begin))
    entries.sort(key=lambda e: e.start)
    return meta, entries


def dtype_code(dtype: torch.dtype, path: object, name: str) -> str:
    """The safetensors dtype code of a torch dtype; a UserError for one that cannot be written."""
    if dtype not in TORCH_TO_CODE:
        raise UserError(f"{path}: tensor {name} has dtype {dtype}, which adalora-export cannot write")
    return TORCH_TO_CODE[dtype]


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


def tied_weights(base_dir: Path, config: dict) -> dict[str, str]:
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
