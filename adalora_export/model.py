"""Model surgery: wrap the targeted layers in SVD adapters, freeze the rest, and the orthogonal term."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from .config import AdaLoraConfig
from .errors import UserError
from .layer import SVDLinear, is_adaptable

# Default targets per architecture family (config.model_type): every projection of attention and MLP.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}


def default_target_modules(model: nn.Module) -> list[str]:
    """The family default for a transformers model, or a clear error naming the model type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise UserError(f"no default target modules for model type {model_type!r}; pass --target_modules")
    return DEFAULT_TARGET_MODULES[model_type]


def parse_target_modules(value: str) -> list[str] | str:
    """The command line's target grammar: ``re:REGEX`` is a regex over full paths, else comma-separated names."""
    if value.startswith("re:"):
        return value[3:]
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise UserError(f"--target_modules {value!r} names no module")
    return names


def replace_module(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at the dotted ``path`` of ``model``; returns the module it replaced."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def matches_target(path: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole path; a list entry matches exactly or as a suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def find_target_paths(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Module paths of the adaptable layers that the target names select, in model order."""
    return [
        path
        for path, module in model.named_modules()
        if path and is_adaptable(module) and matches_target(path, targets) and not _inside_adapter(model, path)
    ]


def _inside_adapter(model: nn.Module, path: str) -> bool:
    return path.endswith(".base_layer")


def inject_adapters(model: nn.Module, config: AdaLoraConfig, *, trainable: list[str] | None = None) -> list[str]:
    """Replace every targeted layer by an ``SVDLinear`` at init_r and freeze all other parameters.

    ``trainable`` names extra modules (by suffix) that stay fully trainable, such as a fresh
    classification head. Returns the adapted module paths.
    """
    targets = config.target_modules if config.target_modules is not None else default_target_modules(model)
    paths = find_target_paths(model, targets)
    if not paths:
        raise UserError(f"target modules {targets!r} match no nn.Linear or Conv1D layer of the model")
    for param in model.parameters():
        param.requires_grad_(False)
    for path in paths:
        layer = SVDLinear(
            model.get_submodule(path),
            config.init_r,
            config.lora_alpha,
            config.init_r,
            config.lora_dropout,
            lora_start=config.train_type == "lora",
        )
        replace_module(model, path, layer)
    for name, module in model.named_modules():
        if trainable and any(name == t or name.endswith("." + t) for t in trainable):
            module.requires_grad_(True)
    return paths


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, SVDLinear]]:
    """(module path, layer) for every SVD adapter in the model, in model order."""
    for path, module in model.named_modules():
        if isinstance(module, SVDLinear):
            yield strip_wrapper_prefix(path), module


def strip_wrapper_prefix(path: str) -> str:
    # DDP and torch.compile wrap the model; report paths relative to the transformers model.
    for prefix in ("module.", "_orig_mod."):
        while path.startswith(prefix):
            path = path[len(prefix) :]
    return path


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, like PEFT's print_trainable_parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def orthogonal_regularizer(model: nn.Module) -> torch.Tensor:
    """R = mean over adapted A and B of ||A A^T - I||_F and ||B^T B - I||_F (rank-0 layers excluded).

    Matrices of one shape (A is r x in, B^T is r x out) are stacked and reduced in one batched
    product: a model has dozens of adapted layers but a handful of shapes, and on small matrices the
    per-layer products, subtractions and norms (and their backward) cost more in dispatch than in
    arithmetic. The value is the per-layer one up to float summation order.
    """
    groups: dict[tuple, list[torch.Tensor]] = {}
    for _, layer in adapted_layers(model):
        if layer.rank == 0:
            continue
        for m in (layer.lora_A, layer.lora_B.T):  # B^T B = (B^T)(B^T)^T
            groups.setdefault((m.shape, m.dtype, m.device), []).append(m)
    if not groups:
        return torch.zeros(())
    norms = []
    for (shape, dtype, device), mats in groups.items():
        stacked = torch.stack(mats)
        eye = torch.eye(shape[0], dtype=dtype, device=device)
        norms.append(torch.linalg.matrix_norm(stacked @ stacked.transpose(1, 2) - eye))
    return torch.cat(norms).mean()


def unwrap_adapters(model: nn.Module) -> nn.Module:
    """Merge, then replace every adapter by its base layer: a plain transformers model again."""
    for path, layer in list(adapted_layers(model)):
        layer.merge()
        replace_module(model, path, layer.base_layer)
    return model
