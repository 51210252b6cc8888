"""Everything a run builds before its first step: seeds, tokenizer, task, data, the adapted model, AdamW.

``prepare_run`` does it in order (the data and the schedule are checked before the model is loaded)
and returns a ``Run``. Each step checks its own input and raises a UserError naming it, so that a
bad run fails here, before ``loop.train`` writes anything.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..allocator import RankAllocator
from ..config import AdaLoraConfig
from ..errors import UserError
from ..formats.state import latest_checkpoint
from ..hf import CAUSAL_LM, SEQ_CLS, check_model_dir, infer_task, load_pretrained, load_tokenizer
from ..layer import is_adapter_parameter
from ..model import inject_adapters
from .args import TrainArgs
from .checkpoint import restore_adapter, restore_optimizer
from .data import Dataset, detect_task, load_dataset, steps_per_epoch
from .distributed import Distributed
from .fsdp import shard_model
from .step import Stepper, autocast_dtype

HEAD_MODULES = ["classifier", "score", "pre_classifier"]  # fresh classification heads stay fully trainable


@dataclass
class Run:
    """What a run built before its first step; every input is checked, nothing is written yet."""

    task: str
    train_set: Dataset
    val_set: Dataset | None
    pad_id: int
    global_batch: int  # batch_size x grad_accum x ranks
    per_epoch: int  # optimizer steps per epoch
    total_step: int
    warmup: int  # steps of linear warm-up
    config: AdaLoraConfig  # with the run's total_step (and the preset's schedule)
    net: nn.Module  # the adapted model, unwrapped
    allocator: RankAllocator
    optimizer: torch.optim.Optimizer
    param_names: list[str]  # the optimizer's parameters in order (checkpoints name its state by them)
    stepper: Stepper
    start_step: int  # 0, or the checkpoint's step on resume
    amp_dtype: torch.dtype | None


def prepare_run(args: TrainArgs, run_dir: Path, dist: Distributed, resume: bool) -> Run:
    """Read and check the data, fix the run's length and schedule, then build the model and optimizer;
    on resume restore adapter, allocator, optimizer and RNG states from the latest checkpoint."""
    amp_dtype = autocast_dtype(args.precision, dist.device)
    seed_everything(args.seed)
    model_config = check_model_dir(args.model)
    tokenizer = load_tokenizer(args.model)
    task = choose_task(args, model_config)
    train_set, val_set = load_datasets(args, tokenizer, task)
    global_batch = args.batch_size * args.grad_accum * dist.world_size
    per_epoch = count_steps_per_epoch(args, train_set, global_batch)
    total_step = args.max_steps or (args.epochs or 1) * per_epoch
    config = args.adalora_config(total_step)  # the preset's schedule, checked against the run's length

    pad_id = pad_token_id(tokenizer, task, args.model)
    # Under FSDP the whole model is built on the CPU and only each rank's shard moves to its device.
    load_device = torch.device("cpu") if dist.fsdp else dist.device
    net = load_model(args.model, task, train_set, config, load_device, amp_dtype, pad_id)
    name_groups = optimizer_param_names(net)
    param_names = [name for group in name_groups for name in group]
    allocator = RankAllocator(net, config, total_step)
    latest = latest_checkpoint(run_dir) if resume else None
    checkpoint = restore_adapter(latest, net, allocator, train_set) if latest else None
    if dist.fsdp:  # after the restore (a shrink replaces A, E, B), before AdamW takes the parameters
        shard_model(net, dist, amp_dtype)
    optimizer = build_optimizer(net, name_groups, args.lr, args.weight_decay, args.head_lr)  # restored parameters
    if checkpoint:
        restore_optimizer(checkpoint, optimizer, param_names, dist.rank)
    stepper = Stepper(net, optimizer, allocator, task, args.max_grad_norm, dist, amp_dtype)
    warmup = math.ceil(args.warmup_ratio * total_step)
    start_step = checkpoint.step if checkpoint else 0
    return Run(
        task=task,
        train_set=train_set,
        val_set=val_set,
        pad_id=pad_id,
        global_batch=global_batch,
        per_epoch=per_epoch,
        total_step=total_step,
        warmup=warmup,
        config=config,
        net=net,
        allocator=allocator,
        optimizer=optimizer,
        param_names=param_names,
        stepper=stepper,
        start_step=start_step,
        amp_dtype=amp_dtype,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pad_token_id(tokenizer, task: str, model_dir: str) -> int:
    """The padding id: the tokenizer's pad token, else its EOS (GPT-2 has no pad token; the choice is
    recorded in the adapter, because decoder classifiers find each text's last token by it)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    if task == SEQ_CLS:
        raise UserError(f"the tokenizer of {model_dir} has neither a pad nor an EOS token; a classifier needs one")
    return 0  # causal LM: padding carries no loss and no attention, any id does


def choose_task(args: TrainArgs, model_config: dict) -> str:
    """--task, else seq_cls when the data has labels, else the model's own task."""
    task = args.task or detect_task(args.data) or infer_task(model_config)
    if task not in (CAUSAL_LM, SEQ_CLS):
        raise UserError(f"{args.model} is a bare encoder: pass --task seq_cls with labelled data, or use a causal LM")
    return task


def load_datasets(args: TrainArgs, tokenizer, task: str) -> tuple[Dataset, Dataset | None]:
    """The training set and the optional validation set, with the training set's classes."""
    train_set = load_dataset(args.data, tokenizer, task, args.max_length)
    if not args.validation:
        return train_set, None
    val_set = load_dataset(
        args.validation,
        tokenizer,
        task,
        args.max_length,
        label_names=train_set.label_names,
        num_labels=train_set.meta["num_labels"],
    )
    return train_set, val_set


def count_steps_per_epoch(args: TrainArgs, train_set: Dataset, global_batch: int) -> int:
    """Optimizer steps per epoch; a data set smaller than one step is an error."""
    per_epoch = steps_per_epoch(len(train_set), global_batch)
    if per_epoch == 0:
        raise UserError(
            f"{args.data} has {len(train_set)} examples, fewer than one optimizer step takes "
            f"(batch_size x grad_accum x ranks = {global_batch}); lower --batch_size or --grad_accum"
        )
    return per_epoch


def load_model(
    model_dir: str,
    task: str,
    train_set: Dataset,
    config: AdaLoraConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    pad_id: int,
) -> nn.Module:
    """The base in fp32 (CPU) or the autocast dtype (GPU) with the SVD adapters injected, on ``device``.

    A classifier gets the data's classes and a fresh head, trained in full and in fp32.
    """
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
    if task == SEQ_CLS:
        model.config.pad_token_id = pad_id  # decoder classifiers find the last real token by it
    inject_adapters(model, config, trainable=HEAD_MODULES if task == SEQ_CLS else None)
    model.to(device)
    for module in model.modules():  # a fresh head of a half-precision base trains in fp32
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                p.data = p.data.float()
    model.train()
    return model


def optimizer_param_names(model: nn.Module) -> list[list[str]]:
    """The trainable parameters by name, in four groups: the adapters' with weight decay (matrices) and
    without (E), then a fresh head's (fully trained weights) with and without (biases). Taken once
    before any shrink; checkpoints name the optimizer state by these names."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decays = {n for n, p in named if p.dim() >= 2 and not n.endswith("lora_E")}
    adapter = {n for n, _ in named if is_adapter_parameter(n)}
    return [
        [n for n, _ in named if n in adapter and n in decays],
        [n for n, _ in named if n in adapter and n not in decays],
        [n for n, _ in named if n not in adapter and n in decays],
        [n for n, _ in named if n not in adapter and n not in decays],
    ]


def build_optimizer(
    model: nn.Module, groups: list[list[str]], lr: float, weight_decay: float, head_lr: float | None = None
) -> torch.optim.AdamW:
    """AdamW over the model's current parameters of those names. Each group's ``lr_scale`` is what the
    step multiplies the scheduled rate by: 1 for the adapters, ``head_lr / lr`` for a fresh head."""
    params = dict(model.named_parameters())
    head_scale = (head_lr / lr) if head_lr else 1.0
    settings = ((weight_decay, 1.0), (0.0, 1.0), (weight_decay, head_scale), (0.0, head_scale))
    param_groups = [
        {"params": [params[n] for n in g], "weight_decay": d, "lr_scale": s} for g, (d, s) in zip(groups, settings) if g
    ]
    return torch.optim.AdamW(param_groups, lr=lr)


def describe_run(run: Run) -> str:
    """The one line a run prints before its first step."""
    trainable = sum(p.numel() for p in run.net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in run.net.parameters())
    device = next(run.net.parameters()).device
    precision = f"autocast {str(run.amp_dtype).replace('torch.', '')}" if run.amp_dtype else "fp32"
    if any(getattr(p, "placements", None) is not None for p in run.net.parameters()):  # DTensors: FSDP2
        precision += ", base sharded with FSDP2"
    return (
        f"{run.task}: {len(run.train_set)} examples ({run.train_set.truncated} truncated), {run.per_epoch} "
        f"steps/epoch at global batch {run.global_batch}, total_step {run.total_step}; "
        f"{len(run.allocator.layers)} adapted matrices, budget {run.allocator.init_budget:,} -> "
        f"{run.allocator.target_budget:,} {run.config.budget_unit}; {trainable:,} of {total:,} parameters "
        f"trainable; {device} {precision}"
    )
