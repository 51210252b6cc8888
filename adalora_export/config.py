"""AdaLoRA configuration: the seed parameters, their defaults (PEFT's) and their validation (docs/design.md)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .errors import UserError

# adalora: init_r -> target_r by importance. lora: LoRA at target_r in the same SVD container (LoRA's start,
# nothing allocated; ``AdaLoraConfig.__post_init__``). A fixed-rank SVD baseline is adalora with target_r == init_r.
TRAIN_TYPES = ("adalora", "lora")
PRESETS = ("paper", "recommended")
BUDGET_UNITS = ("triplets", "params")
# The paper's seed parameters: fields of AdaLoraConfig, of PEFT's AdaLoraConfig, and train's --adalora_<name>.
SEED_PARAMETERS = ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight")
BEYOND_PAPER = ("final_orth_reg_weight", "budget_unit")  # our options; a preset sets them (train's --adalora_<name>)


def lora_scale(lora_alpha: float, init_r: int) -> float:
    """The AdaLoRA scale lora_alpha / (init_r + 1e-5); ranknum stays init_r after pruning (as PEFT)."""
    return lora_alpha / (init_r + 1e-5)


def recommended_schedule(total_step: int) -> dict[str, Any]:
    """The ``recommended`` preset: tinit at 10% and a final phase of 50% of ``total_step``, no orthogonal
    term once the ranks are frozen, and the budget counted in parameters.

    Why (BENCHMARKS.md §1 and §4): a pretrained model's adapter converges slowly and gains from a
    long stretch at its final ranks, and the frozen pattern no longer needs orthogonal P and Q (on
    MiniLM this cut the paper settings' planted-rank error by 25-38%; on a tiny random-init Llama,
    which learns fast, the shorter budget phase cost accuracy in one variant). A budget in
    parameters ends the adapter no larger than LoRA at target_r, where a triplet budget ended it
    10% larger on the real task at the same accuracy. The ``paper`` preset leaves everything as given.
    """
    return {
        "tinit": round(0.1 * total_step),
        "tfinal": round(0.5 * total_step),
        "final_orth_reg_weight": 0.0,
        "budget_unit": "params",
    }


def preset_schedule(preset: str, total_step: int) -> dict[str, Any]:
    """What ``preset`` sets for a run of ``total_step`` steps: the one definition of both presets.

    ``paper`` is PEFT's algorithm with PEFT's defaults (no warm-up, no final phase, triplets);
    ``recommended`` is ``recommended_schedule``. Explicit options win over either (``TrainArgs``).
    """
    if preset == "paper":
        return {"tinit": 0, "tfinal": 0, "budget_unit": "triplets"}
    if preset == "recommended":
        return recommended_schedule(total_step)
    raise UserError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")


@dataclass
class AdaLoraConfig:
    """Everything that defines an AdaLoRA run's adapter and schedule.

    Step counts (tinit, tfinal, deltaT, total_step) are optimizer steps, like PEFT.
    ``target_modules`` is a list of exact module names or name suffixes, or a single regex string
    matched against the full module path; ``None`` means the architecture family's default.
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    total_step: int | None = None
    train_type: str = "adalora"
    # Options beyond the paper (None = the paper's behaviour); each is measured in BENCHMARKS.md.
    final_orth_reg_weight: float | None = None  # orthogonal weight once the rank pattern is frozen
    # What the budget counts. "triplets" (the paper, PEFT): target_r x matrices triplets, whatever
    # their shapes. "params": the parameters LoRA at rank target_r has on the same matrices, so the
    # final adapter is never larger than that LoRA (docs/design.md, "Budget in parameters").
    budget_unit: str = "triplets"

    def __post_init__(self) -> None:
        if self.train_type == "lora":
            # LoRA in the SVD container: every matrix at target_r from the first step (so the scale is
            # lora_alpha / r, LoRA's), no orthogonal term (LoRA has none; it would pull LoRA's Kaiming A
            # to unit rows) and a triplet budget equal to the start, so nothing is ever masked; the
            # allocator fixes the pattern at step 1 (``rank_fix_step``). BENCHMARKS.md §6.
            self.init_r, self.tinit, self.tfinal, self.budget_unit = self.target_r, 0, 0, "triplets"
            self.orth_reg_weight, self.final_orth_reg_weight = 0.0, 0.0
        self.validate()

    def validate(self) -> None:
        """Check every parameter that can be checked without knowing the run's length."""
        if self.train_type not in TRAIN_TYPES:
            raise UserError(f"unknown train_type {self.train_type!r}: expected one of {', '.join(TRAIN_TYPES)}")
        if self.train_type == "lora" and (not isinstance(self.target_r, int) or self.target_r < 1):
            raise UserError(f"train_type lora needs adalora_target_r (its rank) >= 1, got {self.target_r!r}")
        if not isinstance(self.init_r, int) or self.init_r < 1:
            raise UserError(f"adalora_init_r must be an integer >= 1, got {self.init_r!r}")
        if not isinstance(self.target_r, int) or self.target_r < 0:
            raise UserError(f"adalora_target_r must be an integer >= 0, got {self.target_r!r}")
        if self.target_r > self.init_r:
            raise UserError(f"adalora_target_r ({self.target_r}) must not exceed adalora_init_r ({self.init_r})")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise UserError(f"adalora_{name} must lie strictly between 0 and 1, got {value}")
        if self.orth_reg_weight < 0:
            raise UserError(f"adalora_orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.final_orth_reg_weight is not None and self.final_orth_reg_weight < 0:
            raise UserError(f"adalora_final_orth_reg_weight must be >= 0, got {self.final_orth_reg_weight}")
        if self.budget_unit not in BUDGET_UNITS:
            raise UserError(f"adalora_budget_unit must be one of {', '.join(BUDGET_UNITS)}, got {self.budget_unit!r}")
        if self.tinit < 0 or self.tfinal < 0:
            raise UserError(f"adalora_tinit and adalora_tfinal must be >= 0, got {self.tinit} and {self.tfinal}")
        if not isinstance(self.deltaT, int) or self.deltaT < 1:
            raise UserError(f"adalora_deltaT must be an integer >= 1, got {self.deltaT!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.total_step is not None:
            self.check_schedule(self.total_step)

    def rank_fix_step(self, total_step: int) -> int:
        """The optimizer step at which the rank pattern is fixed: total_step - tfinal, or 1 for LoRA."""
        return 1 if self.train_type == "lora" else total_step - self.tfinal

    def check_schedule(self, total_step: int) -> None:
        """Fail unless the schedule leaves a budget phase: tinit < total_step - tfinal (LoRA has none)."""
        if total_step < 1:
            raise UserError(f"total_step must be >= 1, got {total_step}")
        if self.train_type != "lora" and self.tinit >= total_step - self.tfinal:
            raise UserError(
                f"no budget phase: adalora_tinit ({self.tinit}) must be below total_step ({total_step}) "
                f"- adalora_tfinal ({self.tfinal}); lower tinit/tfinal or train longer"
            )

    def triplet_cost(self, in_features: int, out_features: int) -> int:
        """What one triplet of an (out x in) matrix costs in the budget's unit: 1, or in + out + 1 parameters."""
        return 1 if self.budget_unit == "triplets" else in_features + out_features + 1

    def budgets(self, shapes: list[tuple[int, int]]) -> tuple[int, int]:
        """(initial, final) budget over matrices of (in, out) features: init_r and target_r triplets
        each, or in parameters init_r triplets each and LoRA's own size at rank target_r (r (in + out)
        per matrix), so an adapter within it is never larger than that LoRA."""
        initial = sum(self.init_r * self.triplet_cost(i, o) for i, o in shapes)
        if self.budget_unit == "triplets":
            return initial, self.target_r * len(shapes)
        return initial, self.target_r * sum(i + o for i, o in shapes)

    @property
    def scale(self) -> float:
        """The AdaLoRA scale lora_alpha / (init_r + 1e-5); ranknum stays init_r after pruning."""
        return lora_scale(self.lora_alpha, self.init_r)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaLoraConfig:
        """Build from a dict, ignoring keys we do not know (PEFT's configs carry many)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if isinstance(kwargs.get("target_modules"), (set, tuple)):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
