"""The compact adapter: module path -> (A, E, B) at that module's own final rank.

This is the one in-memory object that pruning produces and every converter consumes
(merge, ONNX, LoRA export). Rank 0 is a module whose A is (0 x in), E (0 x 1) and B (out x 0).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .config import AdaLoraConfig
from .errors import UserError
from .hf import SEQ_CLS, check_head_size, load_base, sequence_classifier_class
from .layer import SVDLinear, is_adaptable, is_adapter_parameter, svd_delta, svd_factors, weight_layout_factors
from .model import adapted_layers, replace_module, strip_wrapper_prefix


@dataclass
class ModuleAdapter:
    """One adapted matrix: A (r x in), E (r x 1), B (out x r), fp32 on the CPU unless moved."""

    A: torch.Tensor
    E: torch.Tensor
    B: torch.Tensor
    fan_in_fan_out: bool = False  # True for Conv1D: the base weight is stored in x out
    importance: torch.Tensor | None = None  # score of each kept triplet at the final mask, if known

    @property
    def rank(self) -> int:
        return self.E.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    def num_parameters(self) -> int:
        return self.rank * (self.in_features + self.out_features + 1)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) = (A * E, B) in fp32, out x in layout: the update is ``up @ down * scale``."""
        return svd_factors(self.A.float(), self.E.float(), self.B.float())

    def delta(self, scale: float) -> torch.Tensor:
        """The update (out x in) in fp32: B @ (A * E) * scale."""
        return svd_delta(self.A.float(), self.E.float(), self.B.float(), scale)

    @classmethod
    def from_triplets(
        cls,
        A: torch.Tensor,
        E: torch.Tensor,
        B: torch.Tensor,
        keep: torch.Tensor | list[bool] | None = None,
        *,
        fan_in_fan_out: bool = False,
        importance: torch.Tensor | list[float] | None = None,
    ) -> ModuleAdapter:
        """fp32 CPU copies of A, E, B, keeping only the triplets where ``keep`` is True (all when None).

        ``importance`` is taken when it has one score per kept triplet, else dropped.
        """
        A, E, B = (t.detach().float().cpu() for t in (A, E, B))
        if keep is not None:
            keep = torch.as_tensor(keep, dtype=torch.bool).view(-1)
            A, E, B = A[keep], E[keep], B[:, keep]
        if importance is not None:
            importance = torch.as_tensor(importance, dtype=torch.float32).view(-1)
            importance = importance if importance.numel() == E.shape[0] else None
        return cls(A.contiguous(), E.contiguous(), B.contiguous(), fan_in_fan_out, importance)


@dataclass
class TaskInfo:
    """What an adapter knows of the task it was trained for, beyond its weights.

    A classifier's labels and head travel with the adapter, so every consumer (merge, verify, ONNX
    export, the server) builds the same head on a bare encoder or a causal LM base.
    """

    id2label: dict[int, str] | None = None  # classifiers: class id -> name
    head_modules: list[str] | None = None  # classifiers: the fully trained head (PEFT's modules_to_save)
    problem_type: str | None = None  # transformers' problem_type (single_label_classification)
    max_length: int | None = None  # tokens per example in training: servers truncate to it
    pad_token_id: int | None = None  # the padding id training used (decoder classifiers need one)

    @property
    def num_labels(self) -> int | None:
        return len(self.id2label) if self.id2label else None

    @classmethod
    def for_head(cls, head_modules: list[str], extra_weights: dict[str, torch.Tensor], **known: Any) -> TaskInfo:
        """A classifier's task info when only its head weights are known (PEFT's own save): the output
        layer is the head's 2-D weight with the fewest rows, its labels transformers' LABEL_i."""
        names = {f"{m}.weight" for m in head_modules} | {f"{m}.out_proj.weight" for m in head_modules}
        rows = [w.shape[0] for n, w in extra_weights.items() if n in names and w.dim() == 2]
        labels = {i: f"LABEL_{i}" for i in range(min(rows))} if rows else None
        return cls(id2label=labels, head_modules=list(head_modules), **known)

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if v is not None}
        if self.id2label:
            data["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, where: str) -> TaskInfo:
        if not data:
            return cls()
        if not isinstance(data, dict):
            raise UserError(f"{where}: task_info is not an object")
        try:
            id2label = data.get("id2label")
            labels = {int(k): str(v) for k, v in id2label.items()} if id2label else None
            names = {f.name for f in cls.__dataclass_fields__.values()} - {"id2label"}
            return cls(id2label=labels, **{k: v for k, v in data.items() if k in names})
        except (AttributeError, TypeError, ValueError):
            raise UserError(f"{where}: task_info has malformed labels") from None


@dataclass
class CompactAdapter:
    """A pruned AdaLoRA adapter whose modules keep their own ranks."""

    config: AdaLoraConfig
    modules: dict[str, ModuleAdapter] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    # Fully trained non-adapter weights (a fresh classification head, say), by parameter name in
    # the base model; converters put them in place of the base's. PEFT calls these modules_to_save.
    extra_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    task_info: TaskInfo = field(default_factory=TaskInfo)

    @property
    def scale(self) -> float:
        return self.config.scale

    @property
    def rank_pattern(self) -> dict[str, int]:
        return {path: m.rank for path, m in self.modules.items()}

    def num_parameters(self) -> int:
        return sum(m.num_parameters() for m in self.modules.values())

    def delta_weight(self, path: str) -> torch.Tensor:
        """The update of module ``path`` in the base weight's own layout, fp32."""
        module = self.modules[path]
        left, right = weight_layout_factors(*module.factors(), module.fan_in_fan_out)
        return (left @ right) * self.scale

    def summary(self) -> dict[str, Any]:
        """Ranks, parameters and budget of this adapter: the manifest's body and ``inspect --json``.

        ``share`` is a module's part of the final budget, in the config's ``budget_unit``: its rank over
        target_r x matrices, or its parameters over LoRA's at rank target_r. A finished adapter's shares
        sum to at most 1 (exactly 1 in triplets); a checkpoint taken during the budget phase is above it.
        """
        cfg = self.config
        n = len(self.modules)
        initial_budget, budget = cfg.budgets([(m.in_features, m.out_features) for m in self.modules.values()])
        modules = []
        for path, m in self.modules.items():
            entry = {
                "module": path,
                "rank": m.rank,
                "in_features": m.in_features,
                "out_features": m.out_features,
                "fan_in_fan_out": m.fan_in_fan_out,
                "parameters": m.num_parameters(),
                "share": (m.rank if cfg.budget_unit == "triplets" else m.num_parameters()) / budget if budget else None,
            }
            if m.importance is not None:
                entry["importance"] = [float(x) for x in m.importance.view(-1)]
            modules.append(entry)
        return {
            "init_r": cfg.init_r,
            "target_r": cfg.target_r,
            "matrices": n,
            "budget_unit": cfg.budget_unit,
            "budget": budget,
            "initial_budget": initial_budget,
            "total_rank": sum(m.rank for m in self.modules.values()),
            "total_parameters": self.num_parameters(),
            "initial_parameters": sum(cfg.init_r * (m.in_features + m.out_features + 1) for m in self.modules.values()),
            "rank_zero_modules": sum(1 for m in self.modules.values() if m.rank == 0),
            "lora_parameters": self.lora_parameters(),
            "extra_weights": {name: list(t.shape) for name, t in self.extra_weights.items()},
            "modules": modules,
        }

    def lora_parameters(self, ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> dict[int, int]:
        """What a fixed-rank LoRA on the same matrices would hold at each uniform rank: r (in + out) each.

        The size users compare against: AdaLoRA's final adapter next to LoRA r = 1, 2, 4, ... on the same targets.
        """
        fan = sum(m.in_features + m.out_features for m in self.modules.values())
        return {r: r * fan for r in ranks}

    @classmethod
    @torch.no_grad()
    def from_model(
        cls,
        model: nn.Module,
        config: AdaLoraConfig,
        mask: dict[str, list[bool]] | None = None,
        importance: dict[str, list[float]] | None = None,
        **meta,
    ) -> CompactAdapter:
        """Read the adapters out of a model, dropping the triplets that ``mask`` marks False.

        ``mask`` is the mask in force (an allocator's ``current_mask``); layers already pruned to
        their final rank are taken as they are. ``importance`` (an allocator's ``final_importance``)
        records the score of each kept triplet.
        """
        modules = {}
        for path, layer in adapted_layers(model):
            keep = (mask or {}).get(path)
            modules[path] = ModuleAdapter.from_triplets(
                layer.lora_A,
                layer.lora_E,
                layer.lora_B,
                keep if keep is not None and len(keep) == layer.rank else None,
                fan_in_fan_out=layer.fan_in_fan_out,
                importance=(importance or {}).get(path),
            )
        extra = {
            strip_wrapper_prefix(name): p.detach().cpu().clone()
            for name, p in model.named_parameters()
            if p.requires_grad and not is_adapter_parameter(name)
        }
        return cls(config=config, modules=modules, extra_weights=extra, **meta)

    def check_fits(
        self, layer_shapes: dict[str, tuple[int, int]], param_shapes: dict[str, tuple[int, ...]], base: str
    ) -> None:
        """Fail unless every module and extra weight has its place in the base ``base``.

        ``layer_shapes``: module path -> (out_features, in_features) of the base's adaptable layers;
        ``param_shapes``: parameter name -> shape. The one definition of "this adapter fits that base".
        """
        for path, module in self.modules.items():
            shape = layer_shapes.get(path)
            if shape is None:
                raise UserError(f"adapter module {path} matches no nn.Linear or Conv1D layer of the base model {base}")
            if tuple(shape) != (module.out_features, module.in_features):
                raise UserError(
                    f"adapter module {path} has shape {module.out_features}x{module.in_features}, "
                    f"the layer of the base model {base} has shape {shape[0]}x{shape[1]}"
                )
        for name, value in self.extra_weights.items():
            shape = param_shapes.get(name)
            if shape is None or tuple(shape) != tuple(value.shape):
                found = "has no such weight" if shape is None else f"has {tuple(shape)}"
                raise UserError(
                    f"adapter weight {name} {tuple(value.shape)} does not fit the base model {base} ({found})"
                )

    def model_kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` keyword arguments that give a base the head this adapter was trained with."""
        info = self.task_info
        if self.task_type != SEQ_CLS or not info.id2label:
            return {}
        kwargs: dict[str, Any] = {
            "num_labels": info.num_labels,
            "id2label": dict(info.id2label),
            "label2id": {name: i for i, name in info.id2label.items()},
        }
        if info.problem_type:
            kwargs["problem_type"] = info.problem_type
        if info.pad_token_id is not None:
            kwargs["pad_token_id"] = info.pad_token_id
        return kwargs

    def check_head(self, base_config: dict[str, Any], base: str) -> None:
        """Fail when the base already has a classification head of another size than this adapter's."""
        if self.task_type == SEQ_CLS:
            check_head_size(base_config, self.task_info.num_labels, base)

    def load_base(self, base_dir: str | os.PathLike, *, allow_pickle: bool = False, dtype=torch.float32) -> nn.Module:
        """The base model as this adapter was trained on it (its task, a classifier's labels and head size),
        in eval mode, without the adapter applied (``hf.load_base``)."""
        return load_base(base_dir, self.task_type, self.model_kwargs(), allow_pickle=allow_pickle, dtype=dtype)

    def merged_config(self, base_config: dict[str, Any]) -> dict[str, Any]:
        """The config.json of base + this adapter: a classifier says what it is (architecture, labels, pad)."""
        kwargs = self.model_kwargs()
        if not kwargs:
            return base_config
        config = {**base_config, **kwargs, "architectures": [sequence_classifier_class(base_config["model_type"])]}
        config["id2label"] = {str(k): v for k, v in kwargs["id2label"].items()}
        return config

    @torch.no_grad()
    def apply_to(self, model: nn.Module, base: str = "the base model") -> nn.Module:
        """Wrap the model's matching layers in ``SVDLinear`` at this adapter's ranks (unmerged) and put
        the extra weights in place; a UserError (naming ``base``) when the adapter does not fit."""
        self.check_fits(*model_shapes(model), base=base)
        cfg = self.config
        for path, module in self.modules.items():
            base_layer = model.get_submodule(path)
            layer = SVDLinear(base_layer, module.rank, cfg.lora_alpha, cfg.init_r, 0.0)
            device = base_layer.weight.device
            layer.lora_A.copy_(module.A.to(device))
            layer.lora_E.copy_(module.E.to(device))
            layer.lora_B.copy_(module.B.to(device))
            layer.requires_grad_(False)
            replace_module(model, path, layer)
        params = dict(model.named_parameters())
        for name, value in self.extra_weights.items():
            params[name].data.copy_(value.to(params[name].device, params[name].dtype))
        return model


def model_shapes(model: nn.Module) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, ...]]]:
    """(adaptable layer path -> (out, in), parameter name -> shape) of a model, for ``check_fits``."""
    layers = {}
    for path, module in model.named_modules():
        if path and is_adaptable(module):
            layers[path] = SVDLinear.shape_of(module)
    return layers, {name: tuple(p.shape) for name, p in model.named_parameters()}
