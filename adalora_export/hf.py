"""Loading local Hugging Face model directories safely: no hub, no remote code."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .errors import UserError
from .io import read_json

CAUSAL_LM = "causal_lm"
SEQ_CLS = "seq_cls"
ENCODER = "encoder"
TASKS = (CAUSAL_LM, SEQ_CLS, ENCODER)


def check_model_dir(path: str | os.PathLike) -> dict:
    """Validate a base directory and return its config.json; refuses configs that need remote code."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist or is not a directory")
    config = read_json(path / "config.json")
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{path / 'config.json'} has no model_type")
    if config.get("auto_map"):
        raise UserError(f"{path / 'config.json'} asks for remote code (auto_map); adalora-export never runs it")
    return config


def infer_task(config: dict) -> str:
    """causal_lm, seq_cls or encoder, from the config's architectures."""
    archs = " ".join(config.get("architectures") or [])
    if "ForCausalLM" in archs or "LMHeadModel" in archs:
        return CAUSAL_LM
    if "ForSequenceClassification" in archs:
        return SEQ_CLS
    return ENCODER


def load_pretrained(path: str | os.PathLike, task: str | None = None, **kwargs) -> nn.Module:
    """Load a local HF model for ``task`` (default: from its architectures), offline, without remote code."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = check_model_dir(path)
    task = task or infer_task(config)
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    cls = {CAUSAL_LM: AutoModelForCausalLM, SEQ_CLS: AutoModelForSequenceClassification, ENCODER: AutoModel}[task]
    try:
        return cls.from_pretrained(str(path), trust_remote_code=False, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load model from {path}: {str(exc).splitlines()[0]}") from None
