"""The compact adapter: module path -> (A, E, B) at that module's own final rank.

This is the one in-memory object that pruning produces and every converter consumes
(merge, ONNX, LoRA export). Rank 0 is a module whose A is (0 x in), E (0 x 1) and B (out x 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import AdaLoraConfig
from .layer import SVDLinear
from .model import adapted_layers, strip_wrapper_prefix


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

    def delta(self, scale: float) -> torch.Tensor:
        """The update (out x in) in fp32: B @ (A * E) * scale."""
        return (self.B.float() @ (self.A.float() * self.E.float())) * scale


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
        delta = module.delta(self.scale)
        return delta.T if module.fan_in_fan_out else delta

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
            keep = None
            if mask is not None and path in mask and len(mask[path]) == layer.rank:
                keep = torch.tensor(mask[path], dtype=torch.bool, device=layer.lora_E.device)
            a, e, b = layer.lora_A.detach(), layer.lora_E.detach(), layer.lora_B.detach()
            if keep is not None:
                a, e, b = a[keep], e[keep], b[:, keep]
            modules[path] = ModuleAdapter(
                a.float().cpu().contiguous(),
                e.float().cpu().contiguous(),
                b.float().cpu().contiguous(),
                fan_in_fan_out=layer.fan_in_fan_out,
            )
            scores = (importance or {}).get(path)
            if scores is not None and len(scores) == modules[path].rank:
                modules[path].importance = torch.tensor(scores, dtype=torch.float32)
        extra = {
            strip_wrapper_prefix(name): p.detach().cpu().clone()
            for name, p in model.named_parameters()
            if p.requires_grad and name.rpartition(".")[2] not in ("lora_A", "lora_E", "lora_B")
        }
        return cls(config=config, modules=modules, extra_weights=extra, **meta)

    @torch.no_grad()
    def apply_to(self, model: nn.Module) -> nn.Module:
        """Wrap the model's matching layers in ``SVDLinear`` at this adapter's ranks (unmerged)."""
        for path, module in self.modules.items():
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            base = getattr(parent, child)
            cfg = self.config
            layer = SVDLinear(base, module.rank, cfg.lora_alpha, cfg.init_r, 0.0)
            if (layer.in_features, layer.out_features) != (module.in_features, module.out_features):
                raise ValueError(
                    f"adapter module {path} is {module.out_features}x{module.in_features}, "
                    f"the base layer is {layer.out_features}x{layer.in_features}"
                )
            device = base.weight.device
            layer.lora_A.copy_(module.A.to(device))
            layer.lora_E.copy_(module.E.to(device))
            layer.lora_B.copy_(module.B.to(device))
            layer.requires_grad_(False)
            setattr(parent, child, layer)
        params = dict(model.named_parameters())
        for name, value in self.extra_weights.items():
            if name not in params or params[name].shape != value.shape:
                raise ValueError(f"adapter weight {name} {tuple(value.shape)} does not fit the base model")
            params[name].data.copy_(value.to(params[name].device, params[name].dtype))
        return model
