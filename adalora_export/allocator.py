"""The RankAllocator: importance EMAs, triplet scores, the cubic budget schedule and masking (docs/design.md).

Call ``update_and_allocate(step)`` once per optimizer step, after ``optimizer.step()`` and before
the gradients are cleared, with step = 1, 2, ..., total_step. Up to the final phase this is PEFT's
algorithm exactly; at step T - tfinal (the last step when tfinal = 0) the rank pattern is fixed and
the masked triplets are physically removed, optimizer state included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import AdaLoraConfig
from .errors import UserError
from .layer import PARTS, SVDLinear
from .model import adapted_layers


@dataclass
class Allocation:
    """What one call of ``update_and_allocate`` did. ``budget`` and ``kept`` (what the triplets in force
    cost) are in the config's ``budget_unit``, so they compare; ``kept_triplets`` counts the triplets."""

    budget: int
    masked: bool
    kept: int
    final: bool
    kept_triplets: int = 0


class RankAllocator:
    """Tracks importance of every triplet and keeps the globally best ``budget`` of them."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig, total_step: int):
        config.check_schedule(total_step)
        self.config = config
        self.total_step = total_step
        self.layers: list[tuple[str, SVDLinear]] = list(adapted_layers(model))
        shapes = [(layer.in_features, layer.out_features) for _, layer in self.layers]
        self.triplet_costs = [config.triplet_cost(*shape) for shape in shapes]  # in the budget's unit
        self.init_budget, self.target_budget = config.budgets(shapes)
        self.frozen_mask: dict[str, list[bool]] | None = None  # set at the final phase, then frozen
        self.current_mask: dict[str, list[bool]] | None = None  # the mask in force (None: all kept)
        self.final_importance: dict[str, list[float]] | None = None  # scores of the kept triplets, at the final mask
        self.reset_importance()

    @property
    def orth_reg_weight(self) -> float:
        """The orthogonal term's weight now: the paper's throughout, unless an option changes the final phase."""
        final = self.config.final_orth_reg_weight
        if final is not None and self.frozen_mask is not None:
            return final
        return self.config.orth_reg_weight

    # ----------------------------------------------------------------- schedule
    @property
    def final_step(self) -> int:
        """The step at which the rank pattern is fixed."""
        return self.config.rank_fix_step(self.total_step)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, mask now?) at optimizer step ``step``: warm-up, cubic decrease, final phase."""
        cfg = self.config
        if step <= cfg.tinit:
            return self.init_budget, False
        if step > self.final_step:
            return self.target_budget, True
        progress = 1 - (step - cfg.tinit) / (self.final_step - cfg.tinit)
        budget = int((self.init_budget - self.target_budget) * progress**3 + self.target_budget)
        return budget, step % cfg.deltaT == 0

    # --------------------------------------------------------------- importance
    def reset_importance(self) -> None:
        self.params = [p for _, layer in self.layers for p in (layer.lora_A, layer.lora_E, layer.lora_B)]
        self.exp_avg_ipt = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_unc = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def update_importance(self) -> None:
        """Ibar = b1 Ibar + (1-b1) |p g|;  Ubar = b2 Ubar + (1-b2) |I - Ibar|, for every element."""
        b1, b2 = self.config.beta1, self.config.beta2
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        ipt = torch._foreach_mul(self.params, grads)
        torch._foreach_abs_(ipt)
        torch._foreach_mul_(self.exp_avg_ipt, b1)
        torch._foreach_add_(self.exp_avg_ipt, torch._foreach_mul(ipt, 1 - b1))
        dev = torch._foreach_sub(ipt, self.exp_avg_ipt)
        torch._foreach_abs_(dev)
        torch._foreach_mul_(self.exp_avg_unc, b2)
        torch._foreach_add_(self.exp_avg_unc, torch._foreach_mul(dev, 1 - b2))

    @torch.no_grad()
    def triplet_scores(self) -> list[torch.Tensor]:
        """S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki), s = Ibar * Ubar; one vector per layer."""
        scores = torch._foreach_mul(self.exp_avg_ipt, self.exp_avg_unc)
        out = []
        for i in range(len(self.layers)):
            s_a, s_e, s_b = scores[3 * i : 3 * i + 3]
            out.append(s_e.view(-1) + (s_a.mean(dim=1) + s_b.mean(dim=0)))
        return out

    # ------------------------------------------------------------------ masking
    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, torch.Tensor]:
        """Zero E of the lowest-scoring triplets over all layers together, keeping the best that fit ``budget``.

        In triplets that masks exactly ``init_budget - budget`` of them (PEFT). In parameters the
        triplets are kept best first while their summed cost fits, so a large matrix's triplet must
        outscore the small ones it displaces only by rank order, and the total never exceeds the
        budget. Ties go to the later triplet in model order (a stable sort), so the choice is
        deterministic.
        """
        scores = self.triplet_scores()
        flat = torch.cat(scores)
        sizes = [s.numel() for s in scores]
        order = torch.sort(flat, stable=True).indices
        if self.config.budget_unit == "triplets":
            keep = torch.ones_like(flat, dtype=torch.bool)
            n_mask = self.init_budget - budget
            if n_mask > 0:
                keep[order[:n_mask]] = False
        else:
            costs = torch.cat([torch.full((n,), c, device=flat.device) for n, c in zip(sizes, self.triplet_costs)])
            best_first = order.flip(0)
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[best_first[costs[best_first].cumsum(0) <= budget]] = True
        masks = {}
        for (name, layer), layer_keep in zip(self.layers, keep.split(sizes)):
            layer.lora_E.masked_fill_(~layer_keep.view(-1, 1), 0.0)
            masks[name] = layer_keep
        flat_keep, start = keep.tolist(), 0  # the one host synchronisation of a masking step
        self.current_mask = {}
        for (name, _), size in zip(self.layers, sizes):
            self.current_mask[name] = flat_keep[start : start + size]
            start += size
        return masks

    def update_and_allocate(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> Allocation:
        """The per-optimizer-step call (after ``optimizer.step()``, before ``zero_grad()``)."""
        if self.frozen_mask is not None:  # final phase: ranks are frozen and already physical
            return self._allocation(self.target_budget, False, True)
        if step < self.final_step:
            self.update_importance()
            budget, mask_now = self.budget_schedule(step)
            if mask_now:
                self.mask_to_budget(budget)
            return self._allocation(budget, mask_now, False)
        # step == final_step (or later, when resuming a run that stopped right there): fix the pattern.
        scores = self.triplet_scores()
        masks = self.mask_to_budget(self.target_budget)
        self.frozen_mask = dict(self.current_mask)
        kept_scores = torch.cat([s[masks[name]] for (name, _), s in zip(self.layers, scores)]).tolist()
        self.final_importance, start = {}, 0
        for name, _ in self.layers:
            rank = sum(self.frozen_mask[name])
            self.final_importance[name] = kept_scores[start : start + rank]
            start += rank
        for name, layer in self.layers:
            layer.prune(masks[name], optimizer)
        self.params, self.exp_avg_ipt, self.exp_avg_unc = [], [], []  # importance is no longer needed
        return self._allocation(self.target_budget, True, True)

    def kept_triplets(self) -> int:
        """Number of triplets currently in force."""
        if self.current_mask is None:
            return self.config.init_r * len(self.layers)
        return sum(sum(m) for m in self.current_mask.values())

    def kept(self) -> int:
        """What the triplets in force cost, in the budget's unit (triplets or parameters)."""
        if self.current_mask is None:
            return self.init_budget
        return sum(cost * sum(self.current_mask[name]) for (name, _), cost in zip(self.layers, self.triplet_costs))

    def _allocation(self, budget: int, masked: bool, final: bool) -> Allocation:
        return Allocation(budget, masked, self.kept(), final, self.kept_triplets())

    # ------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """Everything needed to resume: EMAs (as tensors keyed by layer path), masks and the pattern."""
        tensors = {}
        for i, (name, _) in enumerate(self.layers):
            if self.exp_avg_ipt:
                for j, part in enumerate(PARTS):
                    tensors[f"{name}.{part}.exp_avg_ipt"] = self.exp_avg_ipt[3 * i + j].detach().cpu()
                    tensors[f"{name}.{part}.exp_avg_unc"] = self.exp_avg_unc[3 * i + j].detach().cpu()
        return {
            "tensors": tensors,
            "frozen_mask": self.frozen_mask,
            "current_mask": self.current_mask,
            "final_importance": self.final_importance,
            "total_step": self.total_step,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``. The model must already be at the saved ranks (see ``shrink_to_mask``)."""
        if state["total_step"] != self.total_step:
            raise UserError(f"allocator state is for total_step {state['total_step']}, not {self.total_step}")
        self.frozen_mask = state["frozen_mask"]
        self.current_mask = state["current_mask"]
        self.final_importance = state.get("final_importance")
        if self.frozen_mask is not None:
            self.params, self.exp_avg_ipt, self.exp_avg_unc = [], [], []
            return
        self.reset_importance()
        tensors = state["tensors"]
        for i, (name, _) in enumerate(self.layers):
            for j, part in enumerate(PARTS):
                key = f"{name}.{part}"
                if f"{key}.exp_avg_ipt" in tensors:
                    self.exp_avg_ipt[3 * i + j].copy_(tensors[f"{key}.exp_avg_ipt"])
                    self.exp_avg_unc[3 * i + j].copy_(tensors[f"{key}.exp_avg_unc"])


def shrink_to_mask(model: nn.Module, frozen_mask: dict[str, list[bool]]) -> None:
    """Prune a freshly built model's layers to a saved pattern, so a pruned checkpoint can be loaded."""
    for name, layer in adapted_layers(model):
        keep = frozen_mask.get(name)
        if keep is None:
            raise UserError(f"the frozen mask has no entry for adapted layer {name}")
        if layer.rank == len(keep):
            layer.prune(torch.tensor(keep, dtype=torch.bool))
