"""Loading local Hugging Face model directories safely: no hub, no remote code."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .io import check_safetensors, read_json

if TYPE_CHECKING:  # torch is imported where models are loaded: the runtime and --help never load it
    from torch import nn

CAUSAL_LM = "causal_lm"
SEQ_CLS = "seq_cls"
ENCODER = "encoder"
TASKS = (CAUSAL_LM, SEQ_CLS, ENCODER)
PEFT_TASK_TYPES = {CAUSAL_LM: "CAUSAL_LM", SEQ_CLS: "SEQ_CLS", ENCODER: "FEATURE_EXTRACTION"}  # ours -> PEFT's


def peft_task_type(task: str | None) -> str | None:
    """PEFT's name for a task (ours or already PEFT's)."""
    return PEFT_TASK_TYPES.get(task, task) if task else None


def task_from_peft(peft_name: str | None) -> str | None:
    """Our name for a PEFT task type; types we have no name for are kept as PEFT spells them."""
    ours = {v: k for k, v in PEFT_TASK_TYPES.items()}
    return ours.get(peft_name, peft_name) if peft_name else None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


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


def sequence_classifier_class(model_type: str) -> str:
    """transformers' sequence-classification class name for ``model_type`` (BertForSequenceClassification)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type)
    if name is None:
        raise UserError(f"transformers has no sequence classifier for model type {model_type!r}")
    return name


@contextlib.contextmanager
def quiet_transformers():
    """No load reports or weight-loading bars from transformers while we load a model whose missing
    parts (a fresh head, the adapter's weights) we supply ourselves; errors still raise."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer of a local model directory, refused unless it can really tokenize for the model.

    transformers builds an empty tokenizer (its 5 special tokens) from a directory that has a config but
    no vocabulary file, and training then runs on [UNK]s without a word: a directory needs one of
    ``VOCABULARY_FILES``, and a vocabulary that fits ``config.vocab_size`` (no id past the embedding, and
    not under half of it, which is a tokenizer for another model).
    """
    from transformers import AutoTokenizer

    path = Path(model_dir)
    config = check_model_dir(path)
    if not any((path / name).is_file() for name in VOCABULARY_FILES):
        raise UserError(
            f"{path} has no tokenizer (none of {', '.join(VOCABULARY_FILES)}); copy the model's tokenizer files there"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    vocab_size = (config.get("text_config") or config).get("vocab_size")
    if vocab_size and not vocab_size / 2 <= len(tokenizer) <= vocab_size:
        raise UserError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens, the model's vocabulary {vocab_size}: "
            "it is not this model's tokenizer"
        )
    return tokenizer


def check_head_size(config: dict, num_labels: int | None, base: str) -> None:
    """Fail when the base at ``base`` already has a classification head of another size than ``num_labels``."""
    if num_labels is None or infer_task(config) != SEQ_CLS:
        return
    theirs = len(config.get("id2label") or {}) or config.get("num_labels", 2)  # transformers omits its default 2
    if theirs != num_labels:
        raise UserError(
            f"the adapter's classifier has {num_labels} labels, the head of the base model {base} has {theirs}; "
            f"use the base it was trained on (a bare encoder, or a head of {num_labels} labels)"
        )


def load_base(
    base_dir: str | os.PathLike,
    task: str | None = None,
    head: dict | None = None,
    *,
    allow_pickle: bool = False,
    dtype=None,
) -> nn.Module:
    """The base model an adapter was trained on, in eval mode: ``task`` (default: from the config's
    architectures) and, for a classifier, ``head`` (``from_pretrained`` keyword arguments: labels, pad id).
    A base whose own head has another size is a UserError."""
    import torch

    config = check_model_dir(base_dir)
    head = head or {}
    check_head_size(config, head.get("num_labels"), str(base_dir))
    task = task if task in TASKS else infer_task(config)
    dtype = torch.float32 if dtype is None else dtype
    return load_pretrained(base_dir, task, allow_pickle=allow_pickle, dtype=dtype, **head).eval()


def load_pretrained(
    path: str | os.PathLike, task: str | None = None, allow_pickle: bool = False, **kwargs
) -> nn.Module:
    """Load a local HF model for ``task`` (default: from its architectures), offline, without remote code.

    Weights are read from safetensors; pickled weights (``pytorch_model.bin``) only with ``allow_pickle``.
    """
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = check_model_dir(path)
    task = task or infer_task(config)
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    if not allow_pickle:
        names = [p.name for p in Path(path).iterdir() if p.suffix in PICKLE_SUFFIXES]
        pickles = sorted(names, key=lambda name: (not name.startswith("pytorch_model"), name))  # weights first
        if pickles and not any(p.suffix == ".safetensors" for p in Path(path).iterdir()):
            raise UserError(
                f"{Path(path) / pickles[0]} is a pickle file, read only with --allow-pickle "
                "(then with weights_only=True); train needs safetensors weights"
            )
        kwargs["use_safetensors"] = True  # never fall back to unpickling
    for weights in sorted(Path(path).glob("*.safetensors")):
        check_safetensors(weights)  # a damaged file is named here; transformers' error would not name it
    cls = {CAUSAL_LM: AutoModelForCausalLM, SEQ_CLS: AutoModelForSequenceClassification, ENCODER: AutoModel}[task]
    try:
        with quiet_transformers():
            return cls.from_pretrained(str(path), trust_remote_code=False, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # missing, truncated or corrupt weights
        raise UserError(f"cannot load model from {path}: {str(exc).splitlines()[0]}") from None


def eos_token_ids(model: nn.Module) -> list[int]:
    """The model's end-of-sequence ids (its generation config's, else its config's), recorded in
    every exported manifest."""
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
