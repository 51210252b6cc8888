"""Files as tests damage and compare them: copies of shared inputs, safetensors corrupted the ways
downloads and tools do it, pickled weights, digests of whole trees (an input must stay byte-identical),
and the hidden siblings that atomic writes leave behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import torch


def copy_tree(src: Path, dst: Path) -> Path:
    """A copy of ``src`` at ``dst`` (links kept as links), to damage without touching a shared fixture."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


# --------------------------------------------------------------------------- corrupt files
def _split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def corrupt_safetensors(path: Path, kind: str) -> None:
    """Damage a safetensors file the way downloads and tools do.

    cut_header: the file ends inside its JSON header; past_end: the header length points past the
    end of the file; bad_offsets: a tensor's byte range overlaps another's and runs past the data;
    wrong_dtype: a dtype string safetensors does not know; cut_data: the last bytes of the data are missing.
    """
    if kind == "cut_header":
        raw = path.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        path.write_bytes(raw[: 8 + length // 2])
    elif kind == "past_end":
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", len(raw) + 4096) + raw[8:])
    elif kind in ("bad_offsets", "wrong_dtype"):
        header, data = _split_safetensors(path)
        name = next(k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > 0)
        if kind == "bad_offsets":
            begin, end = header[name]["data_offsets"]
            header[name]["data_offsets"] = [begin + 4, end + len(data)]
        else:
            header[name]["dtype"] = "F31"
        _write_safetensors(path, header, data)
    elif kind == "cut_data":
        raw = path.read_bytes()
        path.write_bytes(raw[:-16])
    else:
        raise ValueError(kind)


def pickle_weights(src: Path, dst: Path) -> None:
    """Write ``src``'s tensors as a pickle file (torch.save), the way older checkpoints ship."""
    from safetensors.torch import load_file

    torch.save(load_file(str(src)), str(dst))


# ------------------------------------------------------------------------------- snapshots
def tree_digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or directories), keyed by path; links by target."""
    out = {}
    for root in paths:
        root = Path(root)
        items = [root] if not root.is_dir() else sorted(p for p in root.rglob("*"))
        for p in items:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


def leftovers(path: Path) -> list[str]:
    """Hidden siblings that atomic outputs create beside ``path`` (``.NAME.tmp-*``, ``.NAME.old-*``)."""
    parent = Path(path).absolute().parent
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{Path(path).name}."))


def hidden_temps(root: Path) -> list[str]:
    """Every ``.*.tmp-*`` / ``.*.old-*`` entry below ``root`` (stale pieces of atomic writes)."""
    if not root.is_dir():
        return []
    return sorted(
        str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name or ".tmp" in p.name
    )
