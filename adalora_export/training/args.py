"""A run's options: ``TrainArgs``, the one definition behind ``train()`` and ``adalora-export train``.

Each field carries its help text and choices as metadata, and the AdaLoRA fields take their
defaults from ``AdaLoraConfig``, so the library, the config and the command line cannot drift apart
(``cli.py`` builds its options from these fields). ``resolve_args`` applies the resume rule: a
resumed run keeps its own options, and any option passed again must equal them, except those that
only change what is logged or kept.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import BEYOND_PAPER, BUDGET_UNITS, PRESETS, SEED_PARAMETERS, TRAIN_TYPES, AdaLoraConfig, preset_schedule
from ..errors import UserError
from ..hf import CAUSAL_LM, SEQ_CLS
from ..io import read_json

RUN_ARGS = "run_args.json"


def _parse_target_modules(value: str) -> list[str] | str:
    """``model.parse_target_modules``, imported when a value is parsed (model loads torch; --help does not)."""
    from ..model import parse_target_modules

    return parse_target_modules(value)


TRAIN_TASKS = (CAUSAL_LM, SEQ_CLS)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESUME_MAY_CHANGE = {"save_steps", "eval_steps", "keep_checkpoints", "validation"}
_ADALORA_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AdaLoraConfig)}


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    path: bool = False,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A TrainArgs field with what the command line shows for it (``parse``: how it reads the flag's text)."""
    return field(default=default, metadata={"help": help, "choices": choices, "path": path, "parse": parse})


def adalora_option(name: str, help: str) -> Any:
    """A field whose default is AdaLoraConfig's ``name``."""
    return option(_ADALORA_DEFAULTS[name], help)


@dataclass
class TrainArgs:
    """Every option of a run (the CLI flags, underscore spelling). Paths are stored absolute."""

    output: str = option(None, "Run directory to write (RUN_DIR).", path=True)
    model: str = option(None, "Base model: a local Hugging Face directory.", path=True)
    data: str = option(None, "Training data: .jsonl or .txt (see README).", path=True)
    validation: str | None = option(None, "Validation file: eval loss (+accuracy).", path=True)
    task: str | None = option(None, "Default: seq_cls when the data has labels, else the model's.", choices=TRAIN_TASKS)
    target_modules: list[str] | str | None = option(
        None,
        "Comma-separated module names, or 're:REGEX' over full paths (default: the family's).",
        parse=_parse_target_modules,
    )
    epochs: int | None = option(None, "Passes over the data (default 1).")
    max_steps: int | None = option(None, "Optimizer steps (instead of --epochs).")
    lr: float = option(5e-4, "Peak learning rate (AdamW).")
    head_lr: float | None = option(None, "Peak learning rate of a classifier's fresh head (default: --lr).")
    batch_size: int = option(8, "Examples per micro-batch and rank.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    max_length: int = option(
        512,
        "Tokens per example; longer records are truncated: text keeps its start; prompt+completion keeps the "
        "completion's start (at least half the budget) and the prompt's end.",
    )
    warmup_ratio: float = option(0.06, "Share of steps of linear warm-up.")
    weight_decay: float = option(0.0, "AdamW weight decay (matrices).")
    max_grad_norm: float = option(1.0, "Gradient clipping; 0 disables.")
    lora_alpha: float = adalora_option("lora_alpha", "Scale = alpha / init_r.")
    lora_dropout: float = adalora_option("lora_dropout", "Dropout on the adapter input.")
    seed: int = option(42, "Seed of initialisation, data order, dropout.")
    save_steps: int = option(500, "Checkpoint every N steps and at the end (0: none).")
    eval_steps: int | None = option(None, "Evaluate every N steps (default: before and after).")
    keep_checkpoints: int = option(3, "Checkpoints kept (0: all).")
    fsdp: bool = option(
        False,
        "Under torchrun: shard the frozen base with FSDP2 over the ranks (models larger than one GPU); the adapters "
        "and a fresh head stay whole on every rank.",
    )
    precision: str = option(
        "auto", "Autocast on GPUs (auto: bf16 where supported, else fp16); the CPU trains in fp32.", choices=PRECISIONS
    )
    train_type: str = option(
        "adalora",
        "adalora: init_r -> target_r by importance. lora: LoRA at rank --adalora_target_r (LoRA's start, nothing "
        "pruned, no orthogonal term; the schedule options do not apply): ahead in short LLM fine-tunes "
        "(BENCHMARKS.md §6).",
        choices=TRAIN_TYPES,
    )
    adalora_target_r: int = adalora_option("target_r", "Target average rank.")
    adalora_init_r: int = adalora_option("init_r", "Initial rank of every matrix.")
    adalora_tinit: int | None = option(None, "Warm-up steps before pruning (default: the preset's; paper: 0).")
    adalora_tfinal: int | None = option(None, "Final steps at the fixed budget (default: the preset's; paper: 0).")
    adalora_deltaT: int = adalora_option("deltaT", "Mask every deltaT steps.")
    adalora_beta1: float = adalora_option("beta1", "EMA factor of sensitivity.")
    adalora_beta2: float = adalora_option("beta2", "EMA factor of uncertainty.")
    adalora_orth_reg_weight: float = adalora_option("orth_reg_weight", "Orthogonal term weight.")
    adalora_final_orth_reg_weight: float | None = adalora_option(
        "final_orth_reg_weight",
        "Orthogonal weight once ranks are frozen (default: the preset's: recommended 0, paper the same weight).",
    )
    adalora_budget_unit: str | None = option(
        None,
        "What the budget counts (default: the preset's). triplets: target_r x matrices (paper, PEFT). params: "
        "LoRA's parameters at rank target_r on the same matrices, so the adapter ends no larger than that LoRA.",
        choices=BUDGET_UNITS,
    )
    adalora_preset: str = option(
        "recommended",
        "paper: PEFT's algorithm, the schedule as given. recommended: tinit 10%, tfinal 50% of the steps, no "
        "orthogonal term once ranks are frozen, budget in parameters (BENCHMARKS.md); explicit flags win.",
        choices=PRESETS,
    )

    def adalora_config(self, total_step: int | None = None) -> AdaLoraConfig:
        """The AdaLoRA config of these options (validated: bad values are UserErrors). Given the run's
        ``total_step``, the preset fills the schedule options left unset, and it is checked."""
        preset = preset_schedule(self.adalora_preset, total_step or 1)
        given = {name: getattr(self, f"adalora_{name}") for name in (*SEED_PARAMETERS, *BEYOND_PAPER)}
        options = {**preset, **{k: v for k, v in given.items() if v is not None}}  # explicit flags win
        return AdaLoraConfig(
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            train_type=self.train_type,
            total_step=total_step,
            **options,
        )

    def check(self) -> None:
        """Clear errors for impossible options, before anything is read or written."""
        for name in ("batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "max_steps", "eval_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be >= 1, got {value}")
        if self.epochs is not None and self.max_steps is not None:
            raise UserError("give --epochs or --max_steps, not both")
        if not self.lr > 0 or not 0 <= self.warmup_ratio < 1 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise UserError("need --lr > 0, 0 <= --warmup_ratio < 1, --weight_decay >= 0 and --max_grad_norm >= 0")
        if self.head_lr is not None and not self.head_lr > 0:
            raise UserError(f"--head_lr must be > 0, got {self.head_lr}")
        if self.save_steps < 0 or self.keep_checkpoints < 0:
            raise UserError("--save_steps and --keep_checkpoints must be >= 0")
        self.adalora_config()  # the AdaLoRA options, with the config's own messages
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise UserError(f"--{f.name} must be one of {', '.join(choices)}, got {value!r}")


def option_types() -> dict[str, type]:
    """Each TrainArgs field's value type without ``None`` (what the command line parses it as)."""
    hints = typing.get_type_hints(TrainArgs)
    plain = {}
    for name, hint in hints.items():
        kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
        plain[name] = next((k for k in kinds if k in (bool, int, float)), str)
    return plain


def resolve_args(run_dir: Path, model: Any, data: Any, options: dict[str, Any], resume: bool) -> TrainArgs:
    """The run's options: fresh from the arguments, or on resume the saved ones (checked against these)."""
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    unknown = set(options) - names
    if unknown:
        raise TypeError(f"train() got unknown options: {', '.join(sorted(unknown))}")
    given = {k: v for k, v in {**options, "model": model, "data": data}.items() if v is not None}
    for key in ("model", "data", "validation"):
        if key in given:
            given[key] = str(Path(given[key]).absolute())
    if isinstance(given.get("target_modules"), tuple):
        given["target_modules"] = list(given["target_modules"])
    given["output"] = str(run_dir)
    if not resume:
        for key in ("model", "data"):
            if key not in given:
                raise UserError(f"--{key} is required (unless --resume continues an existing run)")
        return TrainArgs(**given)
    if not (run_dir / RUN_ARGS).is_file():
        raise UserError(f"cannot resume: {run_dir} holds no run ({RUN_ARGS} missing)")
    saved = {k: v for k, v in read_json(run_dir / RUN_ARGS).items() if k in names}
    saved["output"] = str(run_dir)
    for key, value in given.items():
        if key not in RESUME_MAY_CHANGE and saved.get(key) != value:
            raise UserError(
                f"cannot resume {run_dir} with --{key} {value!r}: the run was started with {saved.get(key)!r}"
            )
    return TrainArgs(**{**saved, **given})
