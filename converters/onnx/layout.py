"""The one definition of an exported ONNX directory, shared by the exporter and the runtime.

A directory holds ``model.onnx`` with every weight in ``model.onnx.data`` beside it, the base's
config (its ``architectures`` set to the task exported) and tokenizer files, ``onnx_manifest.json``
(what a server, and a person, needs to know about the graph) and, for adapter-input graphs, the
exported adapter as ``adapter.onnx_adapter``. Nothing here imports torch or onnxruntime: the
runtime reads directories through this module too.
"""

from __future__ import annotations

import enum
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from adalora_export.errors import UserError
from adalora_export.hf import check_model_dir
from adalora_export.io import read_json

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST = "onnx_manifest.json"
ADAPTER_FILE = "adapter.onnx_adapter"
MANIFEST_FORMAT = "adalora-export-onnx"
MANIFEST_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "generation_config.json",
)


class OnnxKind(str, enum.Enum):
    """Which graph an export writes; the manifest's ``kind`` is the value."""

    MERGED = "merged"  # the adapter merged into the base weights
    RANK_COMPACT = "rank_compact"  # base weights + one branch per adapted layer at its final rank
    ADAPTER_INPUTS = "adapter_inputs"  # branch weights are graph inputs: adapters swap per request


@dataclass
class Manifest:
    """The manifest's fields known before tracing, in their order in ``onnx_manifest.json``.

    The export adds ``inputs``, ``outputs``, ``cache`` (with_past), ``adapter_file`` (adapter
    inputs) and ``parity`` to the dict that ``to_dict`` returns.
    """

    kind: OnnxKind
    task: str
    model_type: str
    dtype: str
    opset: int
    with_past: bool
    exporter: str
    base_model_name_or_path: str
    init_r: int
    lora_alpha: float
    scale: float
    rank_pattern: dict[str, int]
    # rank_compact: module path -> rank; adapter_inputs: module path -> {down, up, in, out, rank_axis}
    branches: dict = field(default_factory=dict)
    extra_inputs: dict[str, list[int]] = field(default_factory=dict)  # swappable head weights -> shape
    eos_token_ids: list[int] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # seq_cls: class index -> label
    max_length: int | None = None  # tokens per example in training: the server truncates to it
    pad_token_id: int | None = None

    def to_dict(self) -> dict:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        fields["kind"] = OnnxKind(self.kind).value
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **fields}


def open_onnx_dir(onnx_dir: str | os.PathLike) -> tuple[Path, dict]:
    """(path of ``model.onnx``, manifest) of an exported directory; a UserError when either is missing.

    Also refuses a config that asks for remote code (``check_model_dir``). The runtime adds its own
    check of the graph's external data before it lets onnxruntime read it.
    """
    onnx_dir = Path(onnx_dir)
    check_model_dir(onnx_dir)
    model_path = onnx_dir / MODEL_FILE
    if not model_path.is_file():
        raise UserError(f"missing file {model_path}")
    return model_path, read_json(onnx_dir / MANIFEST)


def copy_tokenizer_files(base_dir: Path, directory: Path) -> None:
    """Copy the base's tokenizer (and generation config) files that exist into ``directory``."""
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, directory / name)
