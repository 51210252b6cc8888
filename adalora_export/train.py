"""The AdaLoRA training loop behind ``adalora-export train``. Read it top to bottom.

One call, ``train(output, model=..., data=..., **options)``, does the whole run:

1. resolve the options (on ``resume``: the run's own options, and a check that nothing changed);
2. start torch.distributed when launched by torchrun (gloo on the CPU, NCCL on GPUs);
3. read the tokenizer and the data, derive total_step, check the AdaLoRA schedule (before any
   heavy work), then load the model and inject the SVD adapters;
4. build the RankAllocator and AdamW; on resume restore adapter, allocator, optimizer, RNG states
   from the latest checkpoint (the data position follows from the step);
5. the loop, per optimizer step (SPEC §2's step contract):
      forward -> loss = task loss + orth_reg_weight * R -> backward (micro-batches summed)
      -> clip -> optimizer.step -> allocator.update_and_allocate(step) -> zero_grad,
   then metrics, evaluation and checkpoints;
6. write ``final/`` (the finished state), ``adapter/`` (the compact adapter), ``rank_pattern.json``
   and the rank heat map.

The task loss of a step is the sum over every loss token (causal LM) or example (classification)
of the step, over all micro-batches and ranks, divided by their global count. So gradient
accumulation and DDP give the gradient of the same global batch, up to float rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import checkpoint as ckpt
from .adapter import CompactAdapter
from .allocator import Allocation, RankAllocator
from .config import PRESETS, AdaLoraConfig, recommended_schedule
from .data import CAUSAL_LM, IGNORE, SEQ_CLS, Dataset, collate, detect_task, load_dataset, shard, step_indices
from .data import steps_per_epoch as count_steps_per_epoch
from .errors import UserError
from .hf import check_model_dir, infer_task, load_pretrained
from .io import atomic_output_dir, atomic_output_file, check_output_path, read_json, write_json
from .model import adapted_layers, inject_adapters, orthogonal_regularizer
from .state import restore_model, save_adapter_state

RUN_ARGS = "run_args.json"
METRICS = "metrics.jsonl"
HEAD_MODULES = ["classifier", "score", "pre_classifier"]  # fresh classification heads stay fully trainable
# Options that only change what is logged or kept, so a resumed run may change them.
RESUME_MAY_CHANGE = {"save_steps", "eval_steps", "keep_checkpoints", "validation"}


@dataclass
class TrainArgs:
    """Every option of a run (the CLI flags, underscore spelling). Paths are stored absolute."""

    model: str
    data: str
    output: str
    validation: str | None = None
    task: str | None = None  # causal_lm | seq_cls; default: seq_cls when the data has labels, else the model's
    target_modules: list[str] | str | None = None  # default: the architecture family's
    epochs: int | None = None  # default 1 unless max_steps is given
    max_steps: int | None = None
    lr: float = 5e-4
    batch_size: int = 8  # per rank and micro-batch
    grad_accum: int = 1
    max_length: int = 512
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    seed: int = 42
    save_steps: int = 500  # 0: no intermediate checkpoints
    eval_steps: int | None = None  # default: evaluate before and after training only
    keep_checkpoints: int = 3  # 0 keeps all
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast, GPU only)
    train_type: str = "adalora"
    adalora_target_r: int = 8
    adalora_init_r: int = 12
    adalora_tinit: int = 0
    adalora_tfinal: int = 0
    adalora_deltaT: int = 1
    adalora_beta1: float = 0.85
    adalora_beta2: float = 0.85
    adalora_orth_reg_weight: float = 0.5
    adalora_final_orth_reg_weight: float | None = None  # option beyond the paper (BENCHMARKS.md)
    adalora_preset: str = "paper"  # paper | recommended (config.recommended_schedule)

    def adalora_config(self, total_step: int | None = None) -> AdaLoraConfig:
        """The AdaLoRA config of these options (validated: bad values are UserErrors). Given the run's
        ``total_step``, the preset's schedule is applied and checked against it."""
        if self.adalora_preset not in PRESETS:
            raise UserError(f"--adalora_preset must be one of {', '.join(PRESETS)}, got {self.adalora_preset!r}")
        preset = {}
        if self.adalora_preset == "recommended":
            if self.adalora_tinit or self.adalora_tfinal:
                raise UserError(
                    "--adalora_preset recommended sets tinit and tfinal itself; drop --adalora_tinit/tfinal"
                )
            preset = recommended_schedule(total_step or 1)
            if self.adalora_final_orth_reg_weight is not None:  # an explicit weight wins over the preset's
                preset["final_orth_reg_weight"] = self.adalora_final_orth_reg_weight
        if self.train_type != "adalora":
            raise UserError(
                f"train_type {self.train_type!r} is not trained here: use adalora (for a fixed-rank baseline, "
                "set --adalora_target_r equal to --adalora_init_r)"
            )
        options = {
            "tinit": self.adalora_tinit,
            "tfinal": self.adalora_tfinal,
            "final_orth_reg_weight": self.adalora_final_orth_reg_weight,
            **preset,
        }
        return AdaLoraConfig(
            target_r=self.adalora_target_r,
            init_r=self.adalora_init_r,
            deltaT=self.adalora_deltaT,
            beta1=self.adalora_beta1,
            beta2=self.adalora_beta2,
            orth_reg_weight=self.adalora_orth_reg_weight,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            train_type=self.train_type,
            total_step=total_step,
            **options,
        )

    def check(self) -> None:
        """Clear errors for impossible training options (the AdaLoRA ones are checked by the config)."""
        positive = ("batch_size", "grad_accum", "max_length")
        for name in positive:
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
        if self.save_steps < 0 or self.keep_checkpoints < 0:
            raise UserError("--save_steps and --keep_checkpoints must be >= 0")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise UserError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.task not in (None, CAUSAL_LM, SEQ_CLS):
            raise UserError(f"--task must be {CAUSAL_LM} or {SEQ_CLS}, got {self.task!r}")


@dataclass
class TrainResult:
    """What a finished run reports (the CLI prints it)."""

    run_dir: Path
    total_step: int
    loss_start: float  # mean task loss of the first 10% of steps
    loss_end: float  # ... and of the last 10%
    ranks: dict[str, int]
    budget: int
    wall_time: float
    eval_start: dict = field(default_factory=dict)
    eval_end: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    is_main: bool = True  # False on the other ranks of a torchrun job

    def summary(self) -> str:
        """A few lines for the terminal: losses, evaluation, ranks, files."""
        lines = [
            f"trained {self.total_step} steps in {self.wall_time:.1f}s; loss {self.loss_start:.4f} -> "
            f"{self.loss_end:.4f} (mean of the first and last 10% of steps)"
        ]
        for key in sorted(set(self.eval_start) | set(self.eval_end)):
            lines.append(
                f"{key}: {self.eval_start.get(key, float('nan')):.4f} -> {self.eval_end.get(key, float('nan')):.4f}"
            )
        kept = sum(self.ranks.values())
        lines.append(f"final ranks: {kept} triplets kept (budget {self.budget}) over {len(self.ranks)} matrices")
        lines += [f"  {path} {rank}" for path, rank in self.ranks.items()]
        lines += [f"wrote {path}" for path in self.files]
        return "\n".join(lines)


def train(
    output: str | os.PathLike,
    model: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> TrainResult:
    """Train an AdaLoRA adapter on a local HF model; see the module docstring and ``TrainArgs``.

    ``resume=True`` continues the run in ``output`` from its latest checkpoint with the run's own
    options; options passed as well must equal them (except ``RESUME_MAY_CHANGE``).
    ``overwrite=True`` replaces an existing run directory. Bad input raises UserError before
    anything is written; a non-finite loss raises UserError with the last good checkpoint intact.
    """
    started = time.time()
    # ---------------------------------------------------------------- 1. options
    run_dir = Path(output).absolute()
    args = resolve_args(run_dir, model, data, options, resume)
    args.check()
    config = args.adalora_config()
    if not resume and run_dir.exists() and not overwrite:
        raise UserError(f"output {run_dir} already exists; pass --resume to continue it or --overwrite to start over")
    if not resume:
        check_output_path(run_dir, overwrite=True, make_parents=True)  # creatable (not under a file, writable)

    # ----------------------------------------------------------- 2. distributed
    dist = Distributed.start()
    metrics_file = bar = None
    try:
        if resume:
            started_on = read_json(run_dir / RUN_ARGS).get("world_size", 1)
            if started_on != dist.world_size:
                raise UserError(f"{run_dir} was trained on {started_on} ranks; resume it on as many")
        device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
        amp_dtype = autocast_dtype(args.precision, device)
        seed_everything(args.seed)

        # ------------------------------------------------- 3. data, schedule, model
        model_config = check_model_dir(args.model)
        tokenizer = load_tokenizer(args.model)
        task = args.task or detect_task(args.data) or infer_task(model_config)
        if task not in (CAUSAL_LM, SEQ_CLS):
            raise UserError(
                f"{args.model} is a bare encoder: pass --task seq_cls with labelled data, or use a causal LM"
            )
        train_set = load_dataset(args.data, tokenizer, task, args.max_length)
        val_set = None
        if args.validation:
            val_set = load_dataset(
                args.validation,
                tokenizer,
                task,
                args.max_length,
                label_names=train_set.label_names,
                num_labels=train_set.meta["num_labels"],
            )
        global_batch = args.batch_size * args.grad_accum * dist.world_size
        per_epoch = count_steps_per_epoch(len(train_set), global_batch)
        if per_epoch == 0:
            raise UserError(
                f"{args.data} has {len(train_set)} examples, fewer than one optimizer step takes "
                f"(batch_size x grad_accum x ranks = {global_batch}); lower --batch_size or --grad_accum"
            )
        total_step = args.max_steps or (args.epochs or 1) * per_epoch
        config = args.adalora_config(total_step)  # the preset's schedule, checked against the run's length
        warmup = math.ceil(args.warmup_ratio * total_step)

        net = load_model(args.model, task, train_set, device, amp_dtype)
        pad_id = pad_token_id(tokenizer)
        if task == SEQ_CLS:
            net.config.pad_token_id = pad_id  # decoder classifiers find the last real token by it
        inject_adapters(net, config, trainable=HEAD_MODULES if task == SEQ_CLS else None)
        net.to(device)
        for module in net.modules():  # a fresh head of a half-precision base trains in fp32
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    p.data = p.data.float()
        name_groups = optimizer_param_names(net)
        param_names = [name for group in name_groups for name in group]  # the optimizer's order

        # ------------------------------------------- 4. allocator, optimizer, resume
        allocator = RankAllocator(net, config, total_step)
        start_step = 0
        latest = ckpt.latest_checkpoint(run_dir) if resume else None
        if latest is not None:
            state = ckpt.load_checkpoint(latest)
            if state.trainer_state.get("data_fingerprint") != train_set.fingerprint:
                raise UserError(f"{args.data} is not the file this run was trained on; cannot resume {run_dir}")
            restore_model(net, state.adapter, allocator)
            start_step = state.step
        optimizer = build_optimizer(net, name_groups, args)
        if latest is not None:
            ckpt.load_optimizer_state(optimizer, param_names, state.optimizer_tensors, state.trainer_state["optimizer"])
            ckpt.set_rng_state(*ckpt.rank_rng(state, dist.rank))
        freeze_empty_adapters(net)
        model = dist.wrap(net, device)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

        # Only now, with every input checked, does anything get written.
        if dist.is_main:
            prepare_run_dir(run_dir, args, dist.world_size, resume, overwrite, start_step)
            say(f"resuming {run_dir} at step {start_step}" if latest is not None else f"training into {run_dir}")
            say(describe_run(net, allocator, train_set, task, total_step, per_epoch, global_batch, device, amp_dtype))
        metrics_file = open(run_dir / METRICS, "a", encoding="utf-8") if dist.is_main else None

        eval_start = {}
        if val_set is not None and start_step == 0:
            eval_start = evaluate(net, val_set, task, args.batch_size, pad_id, dist, device, amp_dtype)
            log_metrics(metrics_file, {"step": 0, **eval_start})

        # ---------------------------------------------------------------- 5. the loop
        bar = tqdm(
            total=total_step,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not (progress and dist.is_main),
            dynamic_ncols=True,
        )
        trainable = [p for p in net.parameters() if p.requires_grad]
        eval_end = {}
        for step in range(start_step + 1, total_step + 1):
            step_started = time.time()
            lr = args.lr * lr_factor(step, warmup, total_step)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # This rank's micro-batches of the step, and the global count of loss items.
            indices = step_indices(step, len(train_set), global_batch, args.seed)
            micro = [
                collate([train_set.examples[i] for i in ids], pad_id)
                for ids in shard(indices, dist.rank, dist.world_size, args.batch_size)
            ]
            items = dist.sum(torch.tensor(float(sum(count_items(b, task) for b in micro))))
            loss_sum = torch.zeros((), device=device)
            for i, batch in enumerate(micro):
                batch = {k: v.to(device) for k, v in batch.items()}
                last = i == len(micro) - 1
                with dist.no_sync(model, not last), autocast(device, amp_dtype):
                    task_sum, _ = task_loss(model, batch, task)
                    # DDP averages gradients over ranks; the loss is normalized globally, so undo that.
                    loss = task_sum * (dist.world_size / items.clamp(min=1))
                    if i == 0:  # the orthogonal term enters each optimizer step once (fp32, outside autocast)
                        with torch.autocast(device.type, enabled=False):
                            orth = orthogonal_regularizer(net)
                        loss = loss + allocator.orth_reg_weight * orth
                    (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += task_sum.detach().float()
            step_loss = (dist.sum(loss_sum) / items.clamp(min=1)).item()

            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm or float("inf")).item()
            if not math.isfinite(step_loss) or (scaler is None and not math.isfinite(grad_norm)):
                raise non_finite_error(step, step_loss, grad_norm, run_dir)
            if scaler is not None:
                scale = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                if scaler.get_scale() < scale:  # fp16 overflow: step skipped; keep inf out of the importance
                    for p in trainable:
                        p.grad = None
            else:
                optimizer.step()
            was_final = allocator.rank_pattern is not None
            alloc = allocator.update_and_allocate(step, optimizer)
            if alloc.masked:
                dist.check_masks_agree(allocator, step)
            if alloc.final and not was_final:
                # The shrink replaced lora_A/E/B by new, smaller Parameters (the optimizer was updated
                # by the allocator); everything else holding parameters is rebuilt.
                freeze_empty_adapters(net)
                trainable = [p for p in net.parameters() if p.requires_grad]
                model = dist.wrap(net, device)
            optimizer.zero_grad(set_to_none=True)

            record = step_record(step, per_epoch, step_loss, orth, lr, grad_norm, alloc, items, step_started)
            if val_set is not None and (step == total_step or (args.eval_steps and step % args.eval_steps == 0)):
                eval_end = evaluate(net, val_set, task, args.batch_size, pad_id, dist, device, amp_dtype)
                record.update(eval_end)
            log_metrics(metrics_file, record)
            bar.set_postfix(loss=f"{step_loss:.4f}", budget=alloc.budget, kept=alloc.kept, lr=f"{lr:.2e}")
            bar.update(1)
            if args.save_steps and (step % args.save_steps == 0 or step == total_step):
                rng = dist.gather(ckpt.rng_state())
                if dist.is_main:
                    ckpt.save_checkpoint(
                        run_dir,
                        step,
                        net,
                        config,
                        allocator,
                        optimizer,
                        param_names,
                        rng,
                        {"data_fingerprint": train_set.fingerprint, "epoch": step / per_epoch},
                        meta=adapter_meta(args, task, net),
                        keep=args.keep_checkpoints,
                    )
        bar.close()

        # ------------------------------------------------------------- 6. outputs
        files: list[Path] = []
        if dist.is_main:
            metrics_file.close()
            files = write_outputs(run_dir, net, config, allocator, args, task, total_step)
        dist.barrier()
        losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r] if dist.is_main else []
        tenth = max(1, len(losses) // 10)
        return TrainResult(
            run_dir=run_dir,
            total_step=total_step,
            loss_start=float(np.mean(losses[:tenth])) if losses else float("nan"),
            loss_end=float(np.mean(losses[-tenth:])) if losses else float("nan"),
            ranks={path: layer.rank for path, layer in adapted_layers(net)},
            budget=allocator.target_budget,
            wall_time=time.time() - started,
            eval_start=eval_start or first_eval(run_dir, dist.is_main),
            eval_end=eval_end,
            files=files,
            is_main=dist.is_main,
        )
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if bar is not None:  # ends the bar's line, so that an error message gets its own
            bar.close()
        dist.close()


# ============================================================================ options
def resolve_args(run_dir: Path, model, data, options: dict, resume: bool) -> TrainArgs:
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
    saved = read_json(run_dir / RUN_ARGS)
    saved = {k: v for k, v in saved.items() if k in names}
    saved["output"] = str(run_dir)
    for key, value in given.items():
        if key not in RESUME_MAY_CHANGE and saved.get(key) != value:
            raise UserError(
                f"cannot resume {run_dir} with --{key} {value!r}: the run was started with {saved.get(key)!r}"
            )
    return TrainArgs(**{**saved, **given})


def prepare_run_dir(run_dir: Path, args: TrainArgs, world_size: int, resume: bool, overwrite: bool, step: int) -> None:
    """Create (or on --overwrite replace) the run directory; on resume drop metrics past the checkpoint."""
    if resume:
        keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        tmp = run_dir / f".{METRICS}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, run_dir / METRICS)
        return
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: a kill leaves the old run (with --overwrite) or a new one that --resume continues, never half of either.
    with atomic_output_dir(run_dir, overwrite=overwrite) as tmp:
        write_json(tmp / RUN_ARGS, {**dataclasses.asdict(args), "world_size": world_size})


# ============================================================================= setup
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. Autocast is for GPUs; the CPU trains in fp32."""
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise UserError(f"--precision {precision} needs a CUDA GPU; this machine trains in fp32")
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"cannot load a tokenizer from {model_dir}: {str(exc).splitlines()[0]}") from None


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def load_model(model_dir: str, task: str, train_set: Dataset, device: torch.device, amp_dtype) -> nn.Module:
    """The base model in fp32 (CPU) or the autocast dtype (GPU); a classifier gets the data's classes."""
    kwargs = {"dtype": amp_dtype or torch.float32}
    if task == SEQ_CLS:
        num_labels = train_set.meta["num_labels"]
        names = train_set.label_names or [str(i) for i in range(num_labels)]
        kwargs.update(
            num_labels=num_labels,
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
        )
    model = load_pretrained(model_dir, task, **kwargs)
    model.train()
    return model


def optimizer_param_names(model: nn.Module) -> list[list[str]]:
    """The trainable parameters by name, in two groups: with weight decay (matrices) and without (biases,
    norms, E). Taken once before any shrink; checkpoints name the optimizer state by these names."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [n for n, p in named if p.dim() >= 2 and not n.endswith("lora_E")]
    return [decay, [n for n, _ in named if n not in set(decay)]]


def build_optimizer(model: nn.Module, groups: list[list[str]], args: TrainArgs) -> torch.optim.AdamW:
    """AdamW over the model's current parameters of those names."""
    params = dict(model.named_parameters())
    decays = (args.weight_decay, 0.0)
    param_groups = [{"params": [params[n] for n in g], "weight_decay": d} for g, d in zip(groups, decays) if g]
    return torch.optim.AdamW(param_groups, lr=args.lr)


def freeze_empty_adapters(model: nn.Module) -> None:
    """Rank-0 layers have nothing to train; freezing their empty tensors keeps DDP from waiting for them."""
    for _, layer in adapted_layers(model):
        if layer.rank == 0:
            for p in (layer.lora_A, layer.lora_E, layer.lora_B):
                p.requires_grad_(False)


def describe_run(model, allocator, train_set, task, total_step, per_epoch, global_batch, device, amp_dtype) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (
        f"{task}: {len(train_set)} examples ({train_set.truncated} truncated), {per_epoch} steps/epoch at global "
        f"batch {global_batch}, total_step {total_step}; {len(allocator.layers)} adapted matrices, budget "
        f"{allocator.init_budget} -> {allocator.target_budget}; {trainable:,} of {total:,} parameters trainable; "
        f"{device}{' autocast ' + str(amp_dtype).replace('torch.', '') if amp_dtype else ' fp32'}"
    )


def say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


# ============================================================================= steps
def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then linear decay to 1/(total-warmup) at the last step."""
    if step <= warmup:
        return step / warmup
    return (total - step + 1) / (total - warmup)


def count_items(batch: dict[str, torch.Tensor], task: str) -> int:
    """Loss items of a micro-batch: predicted tokens (causal LM) or examples (classification)."""
    if task == CAUSAL_LM:
        return int((batch["labels"][:, 1:] != IGNORE).sum())
    return len(batch["labels"])


def task_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of correct predictions) of a micro-batch, computed in fp32."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if task == CAUSAL_LM:
        inputs["use_cache"] = False
    logits = model(**inputs).logits.float()
    labels = batch["labels"]
    if task == CAUSAL_LM:  # position t predicts token t+1
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    correct = ((logits.argmax(-1) == labels) & (labels != IGNORE)).sum()
    return loss, correct


@torch.no_grad()
def evaluate(model, dataset, task, batch_size, pad_id, dist, device, amp_dtype) -> dict[str, float]:
    """Validation loss (and accuracy for classification) over this rank's shard, summed over ranks."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, items, correct
    mine = list(range(dist.rank, len(dataset), dist.world_size))
    for start in range(0, len(mine), batch_size):
        batch = collate([dataset.examples[i] for i in mine[start : start + batch_size]], pad_id)
        items = count_items(batch, task)
        with autocast(device, amp_dtype):
            loss, correct = task_loss(model, {k: v.to(device) for k, v in batch.items()}, task)
        totals += torch.tensor([loss.item(), items, correct.item()], dtype=torch.float64)
    model.train()
    totals = dist.sum(totals)
    result = {"eval_loss": float(totals[0] / max(totals[1], 1))}
    if task == SEQ_CLS:
        result["eval_accuracy"] = float(totals[2] / max(totals[1], 1))
    return result


def non_finite_error(step: int, loss: float, grad_norm: float, run_dir: Path) -> UserError:
    last = ckpt.latest_checkpoint(run_dir)
    where = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written yet"
    return UserError(
        f"training stopped at step {step}: loss {loss}, gradient norm {grad_norm} (not finite) before the "
        f"optimizer step; {where}. Lower --lr or check the data"
    )


def step_record(step, per_epoch, loss, orth, lr, grad_norm, alloc: Allocation, items, started) -> dict:
    return {
        "step": step,
        "epoch": round(step / per_epoch, 4),
        "loss": loss,
        "orth": float(orth.detach()),
        "lr": lr,
        "grad_norm": grad_norm,
        "budget": alloc.budget,
        "kept": alloc.kept,
        "masked": alloc.masked,
        "final": alloc.final,
        "items": int(items),
        "seconds": round(time.time() - started, 4),
    }


def log_metrics(handle, record: dict) -> None:
    if handle is not None:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def first_eval(run_dir: Path, is_main: bool) -> dict:
    """The step-0 evaluation of a resumed run, from its metrics."""
    if not is_main:
        return {}
    for record in read_metrics(run_dir):
        if record.get("step") == 0:
            return {k: v for k, v in record.items() if k.startswith("eval_")}
    return {}


# =========================================================================== outputs
def adapter_meta(args: TrainArgs, task: str, model: nn.Module) -> dict:
    """What a state directory records about its base, so that pruning and exports find it."""
    meta = {"base_model_name_or_path": args.model, "task_type": task}
    if task == SEQ_CLS:
        meta["id2label"] = {str(k): v for k, v in model.config.id2label.items()}
    return meta


def write_outputs(run_dir: Path, model, config, allocator, args: TrainArgs, task: str, step: int) -> list[Path]:
    """final/ (the finished state), adapter/ (compact, PEFT-loadable), rank_pattern.json, the heat map."""
    from .formats import save_adapter
    from .report import plot_rank_heatmap

    with atomic_output_dir(run_dir / "final", overwrite=True) as tmp:
        save_adapter_state(model, config, allocator, step, tmp, meta=adapter_meta(args, task, model))
    adapter = CompactAdapter.from_model(
        model,
        config,
        mask=allocator.current_mask,
        importance=allocator.final_importance,
        base_model_name_or_path=args.model,
        task_type=task,
    )
    save_adapter(adapter, run_dir / "adapter", overwrite=True)
    pattern = {
        "init_r": config.init_r,
        "target_r": config.target_r,
        "budget": allocator.target_budget,
        "ranks": adapter.rank_pattern,
        "rank_pattern": allocator.rank_pattern,
    }
    with atomic_output_file(run_dir / "rank_pattern.json", overwrite=True) as tmp:
        write_json(tmp, pattern)
    plot_rank_heatmap(adapter, run_dir / "rank_heatmap.png", overwrite=True)
    return [run_dir / "final", run_dir / "adapter", run_dir / "rank_pattern.json", run_dir / "rank_heatmap.png"]


# ======================================================================= distributed
@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without one) and the few collectives we use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # started the process group here (so ends it), rather than found it running

    @classmethod
    def start(cls) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        import torch.distributed as td

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        owns_group = not td.is_initialized()
        if owns_group:
            td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(td.get_rank(), td.get_world_size(), local_rank, owns_group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DistributedDataParallel over the current parameters (call again after they are replaced)."""
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def no_sync(self, model: nn.Module, skip: bool):
        """DDP's no_sync for the micro-batches before the last one of a step."""
        return model.no_sync() if skip and self.world_size > 1 else contextlib.nullcontext()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        import torch.distributed as td

        device = torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        out = tensor.detach().to(device).clone()
        td.all_reduce(out)
        return out.to(tensor.device)

    def gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def check_masks_agree(self, allocator: RankAllocator, step: int) -> None:
        """Every rank must have chosen the same mask; a difference means the ranks' gradients differ."""
        if self.world_size == 1:
            return
        digest = hashlib.sha256(json.dumps(allocator.current_mask, sort_keys=True).encode()).hexdigest()
        hashes = self.gather(digest[:16])
        if len(set(hashes)) != 1:
            raise RuntimeError(
                f"ranks disagree on the AdaLoRA mask at step {step} (mask hashes by rank: {hashes}); "
                "their gradients differ, so every rank must run the same code, model and data"
            )

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as td

            td.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()
