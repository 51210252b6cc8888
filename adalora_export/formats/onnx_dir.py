"""The one definition of an exported ONNX directory, shared by both exporters and the runtime.

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
GENAI_CONFIG = "genai_config.json"  # onnxruntime-genai's description of a causal LM with a KV cache
MANIFEST_FORMAT = "adalora-export-onnx"
MANIFEST_VERSION = 1
# What a manifest's dtype, target and opset may be (the export command's choices, read without torch):
DTYPES = ("fp32", "fp16")  # TorchScript graphs
OPTIMIZED_DTYPES = ("fp32", "fp16", "int4")  # the builder's optimized graphs
TARGETS = ("cpu", "cuda")  # the execution provider an optimized graph is built for
# The builder's int4 settings an export takes (--int4-*), and what each may be:
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)  # weights per quantization block (one scale each)
INT4_ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits' compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
INT4_HEADS = ("int4", "int8", "float")  # the output head (and a tied embedding with it)
INT4_SENSITIVE = ("int4", "int8")  # the most quantization-sensitive projections (llama.cpp's mixed layers)
MIN_OPSET, MAX_OPSET = 14, 20  # TorchScript graphs
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
    OPTIMIZED = "optimized"  # built by onnxruntime-genai's model builder (fused attention, int4)


def rank_axis(path: str) -> str:
    """The symbolic name of one layer's rank axis in an adapter-input graph (one name per layer:
    onnxruntime's memory planner fails when layers of different ranks share one)."""
    return "rank_" + path.replace(".", "_")


def branch_entry(path: str, down: str, up: str, in_features: int, out_features: int) -> dict:
    """The manifest's entry for one adapter-input branch: its two input names (``down``: in x rank,
    ``up``: rank x out), the layer's sizes and its rank axis. Both exporters write it; ``.onnx_adapter``
    files and the runtime read it."""
    return {"down": down, "up": up, "in": in_features, "out": out_features, "rank_axis": rank_axis(path)}


@dataclass
class Manifest:
    """``onnx_manifest.json``: what a server (and a person) needs to know about an exported graph.

    Both exporters fill it; ``to_dict`` is the file's content, fields in this order. ``adapter_inputs``
    says whether the graph takes ``.onnx_adapter`` files (``takes_adapters`` reads it).
    """

    kind: OnnxKind
    task: str
    model_type: str
    dtype: str
    exporter: str
    base_model_name_or_path: str
    rank_pattern: dict[str, int]  # module path -> final rank
    adapter_inputs: bool = False
    opset: int | None = None  # TorchScript graphs; the builder chooses its own
    target: str | None = None  # optimized graphs: the execution provider the builder targeted
    with_past: bool = False  # a KV cache (``cache``); every optimized graph has one
    init_r: int | None = None
    lora_alpha: float | None = None
    scale: float | None = None
    # rank_compact: module path -> rank; adapter inputs: module path -> ``branch_entry``
    branches: dict = field(default_factory=dict)
    extra_inputs: dict[str, list[int]] = field(default_factory=dict)  # swappable head weights -> shape
    eos_token_ids: list[int] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # seq_cls: class index -> label
    # seq_cls: whether the base had a classification head of its own. When it had none, an adapter-input
    # graph's default head weights are untrained, and the server answers only with an adapter active.
    head_in_base: bool | None = None
    max_length: int | None = None  # tokens per example in training: the server truncates to it
    pad_token_id: int | None = None
    inputs: list[dict] = field(default_factory=list)  # the graph's data inputs: name, dtype, shape
    outputs: list[dict] = field(default_factory=list)
    cache: dict | None = None  # with_past: cache input/output names, layers, kv heads, head size
    adapter_file: str | None = None  # adapter inputs: the exported adapter beside the graph
    genai_config: str | None = None  # onnxruntime-genai's config beside the graph, when written
    quantization: dict | None = None  # int4 optimized graphs: the builder's settings (block size, head...)
    parity: dict = field(default_factory=dict)  # the check's figures against torch

    def to_dict(self) -> dict:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        fields["kind"] = OnnxKind(self.kind).value
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **fields}


def takes_adapters(manifest: dict) -> bool:
    """True for a graph whose branch weights are inputs (``.onnx_adapter`` files swap into it)."""
    return bool(manifest.get("adapter_inputs")) or manifest.get("kind") == OnnxKind.ADAPTER_INPUTS.value


def genai_config(manifest: dict, config: dict) -> dict:
    """onnxruntime-genai's ``genai_config.json`` for a causal-LM graph with a KV cache (``manifest``:
    ours, ``config``: the model's config.json), so that ``onnxruntime_genai.Model(ONNX_DIR)`` runs it.

    Written by hand because onnxruntime-genai's builder writes it only for graphs it builds itself.
    Our graph concatenates the cache (present = past + new), so the cache buffer is not shared.
    """
    text = config.get("text_config") or config
    eos = manifest.get("eos_token_ids") or []
    context = text.get("max_position_embeddings") or text.get("n_positions") or 2048
    model = {
        # onnxruntime-genai picks its model class by type; "gpt2" selects its legacy class with one
        # combined cache tensor per layer, while every graph of ours has the generic decoder-only
        # signature (separate key and value per layer), which its llama class reads.
        "type": "llama" if manifest["model_type"] == "gpt2" else manifest["model_type"],
        "bos_token_id": text.get("bos_token_id") if text.get("bos_token_id") is not None else (eos or [0])[0],
        "eos_token_id": eos if len(eos) != 1 else eos[0],
        "pad_token_id": text.get("pad_token_id") if text.get("pad_token_id") is not None else (eos or [0])[0],
        "context_length": context,
        "vocab_size": text.get("vocab_size"),
        "decoder": _genai_decoder(manifest, text),
    }
    search = {
        "do_sample": False,
        "max_length": context,
        "min_length": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": False,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
    }
    return {"model": model, "search": search}


def _genai_decoder(manifest: dict, text: dict) -> dict:
    """The ``decoder`` section: the graph's file, sizes, and its input and output names."""
    cache = manifest["cache"]
    expected = [f"past_key_values.{i}.{kv}" for i in range(cache["num_layers"]) for kv in ("key", "value")]
    if cache["inputs"] != expected:
        raise ValueError(f"cache inputs {cache['inputs'][:2]}... do not follow past_key_values.%d.key/value")
    inputs = {i["name"] for i in manifest["inputs"]}
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in inputs:
        names["position_ids"] = "position_ids"
    return {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": MODEL_FILE,
        "head_size": cache["head_dim"],
        "hidden_size": text.get("hidden_size") or text.get("n_embd"),
        "inputs": {**names, "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
        "num_attention_heads": text.get("num_attention_heads") or text.get("n_head"),
        "num_hidden_layers": cache["num_layers"],
        "num_key_value_heads": cache["num_kv_heads"],
    }


def import_onnxruntime_genai():
    """The ``onnxruntime_genai`` module, or a UserError saying how to install it (optimized graphs
    are built and run by it; ``run.sh`` installs it)."""
    try:
        import onnxruntime_genai
    except ImportError:
        raise UserError(
            "onnxruntime-genai is not installed: pip install --no-deps onnxruntime-genai (see README)"
        ) from None
    return onnxruntime_genai


def open_onnx_dir(onnx_dir: str | os.PathLike) -> tuple[Path, dict]:
    """(path of ``model.onnx``, manifest) of an exported directory; a UserError when either is missing.

    Also refuses a config that asks for remote code (``check_model_dir``). The runtime adds its own
    check of the graph's external data before it lets onnxruntime read it.
    """
    onnx_dir = Path(onnx_dir)
    if onnx_dir.is_dir() and not (onnx_dir / MANIFEST).is_file() and not (onnx_dir / MODEL_FILE).is_file():
        what = "an adapter directory" if (onnx_dir / "adapter_config.json").is_file() else "a directory"
        raise UserError(
            f"{onnx_dir} is {what}, not an exported ONNX directory (no {MANIFEST}); "
            "make one with adalora-export export ... --onnx"
        )
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
