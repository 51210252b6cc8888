"""One AdaLoRA optimizer step, and the loss it and the evaluation are built on (docs/design.md, the step).

Per optimizer step, in this order:

    forward -> loss = task loss + orth_reg_weight * R -> backward (micro-batches summed)
    -> clip -> non-finite check -> optimizer.step -> allocator.update_and_allocate(step) -> zero_grad

The task loss of a step is the sum over every loss token (causal LM) or example (classification)
of the step, over all micro-batches and ranks, divided by their global count; so gradient
accumulation and DDP give the gradient of the same global batch, up to float rounding. The
orthogonal term enters once per step. The allocator sees the clipped gradients of this step, as
PEFT's AdaLoRA does.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..allocator import Allocation, RankAllocator
from ..errors import UserError
from ..hf import CAUSAL_LM, SEQ_CLS
from ..model import adapted_layers, orthogonal_regularizer
from .data import IGNORE, Dataset, collate
from .distributed import Distributed
from .fsdp import average_gradients


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then linear decay to 1/(total-warmup) at the last step."""
    if step <= warmup:
        return step / warmup
    return (total - step + 1) / (total - warmup)


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


def freeze_empty_adapters(model: nn.Module) -> None:
    """Rank-0 layers have nothing to train; freezing their empty tensors keeps DDP from waiting for them."""
    for _, layer in adapted_layers(model):
        if layer.rank == 0:
            for p in (layer.lora_A, layer.lora_E, layer.lora_B):
                p.requires_grad_(False)


class NonFiniteStep(UserError):
    """The loss or the gradient norm of a step is not finite; raised before the optimizer moves."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        super().__init__(f"training stopped at step {step}: loss {loss}, gradient norm {grad_norm} (not finite)")
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


@dataclass
class StepResult:
    loss: float  # the task loss of the global batch (mean per item)
    orth: float  # the orthogonal term R
    orth_weight: float  # its weight in this step's loss (the preset may change it once ranks are frozen)
    grad_norm: float  # before clipping
    items: int  # loss items of the global batch
    allocation: Allocation


@dataclass
class Stepper:
    """What every optimizer step of a run shares; ``step()`` runs one.

    After the allocator's final shrink replaces lora_A/E/B by smaller Parameters (the allocator
    points the optimizer at them), the DDP wrapper and the list of clipped parameters are rebuilt.
    """

    net: nn.Module  # the adapted model, unwrapped
    optimizer: torch.optim.Optimizer
    allocator: RankAllocator
    task: str
    max_grad_norm: float = 1.0  # 0 disables clipping
    dist: Distributed = field(default_factory=Distributed)
    amp_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.device = self.dist.device
        self._wrap()

    def _wrap(self) -> None:
        freeze_empty_adapters(self.net)
        self.model = self.dist.wrap(self.net, self.device)
        self.trainable = [p for p in self.net.parameters() if p.requires_grad]

    def step(self, step: int, micro_batches: list[dict[str, torch.Tensor]], lr: float) -> StepResult:
        """One optimizer step (1-based ``step``) over this rank's micro-batches at learning rate ``lr``."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # a fresh head may have its own rate
        items = self.dist.sum(torch.tensor(float(sum(count_items(b, self.task) for b in micro_batches))))
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            last = i == len(micro_batches) - 1
            with self.dist.no_sync(self.model, not last), autocast(self.device, self.amp_dtype):
                task_sum, _ = task_loss(self.model, batch, self.task)
                # DDP averages gradients over ranks; the loss is normalized globally, so undo that.
                loss = task_sum * (self.dist.world_size / items.clamp(min=1))
                if i == 0:  # the orthogonal term enters each optimizer step once (fp32, outside autocast)
                    with torch.autocast(self.device.type, enabled=False):
                        orth = orthogonal_regularizer(self.net)
                    orth_weight = self.allocator.orth_reg_weight
                    loss = loss + orth_weight * orth
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += task_sum.detach().float()
        step_loss = (self.dist.sum(loss_sum) / items.clamp(min=1)).item()
        if self.dist.fsdp:  # the trained parameters are whole on every rank: average their gradients as DDP does
            average_gradients(self.trainable, self.dist)

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm or float("inf")).item()
        if not math.isfinite(step_loss) or (self.scaler is None and not math.isfinite(grad_norm)):
            raise NonFiniteStep(step, step_loss, grad_norm)
        self._optimizer_step()
        was_final = self.allocator.frozen_mask is not None
        allocation = self.allocator.update_and_allocate(step, self.optimizer)
        if allocation.masked:
            self.dist.check_masks_agree(self.allocator, step)
        if allocation.final and not was_final:
            self._wrap()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(step_loss, float(orth.detach()), orth_weight, grad_norm, int(items), allocation)

    def _optimizer_step(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
            return
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() < scale:  # fp16 overflow: step skipped; keep inf out of the importance
            for p in self.trainable:
                p.grad = None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    task: str,
    batch_size: int,
    pad_id: int,
    dist: Distributed,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Validation loss (and accuracy for classification) over this rank's shard, summed over ranks."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, items, correct
    mine = list(range(dist.rank, len(dataset), dist.world_size))
    # Under FSDP every rank must run as many forwards as the others (each gathers the base with them):
    # a rank with fewer examples runs its last forwards on a stand-in example and counts nothing.
    most = -(-len(dataset) // dist.world_size) if dist.fsdp else len(mine)
    for start in range(0, most, batch_size):
        ids = mine[start : start + batch_size]
        batch = collate([dataset.examples[i] for i in ids or [0]], pad_id)
        items = count_items(batch, task)
        with autocast(dist.device, amp_dtype):
            loss, correct = task_loss(model, {k: v.to(dist.device) for k, v in batch.items()}, task)
        if ids:
            totals += torch.tensor([loss.item(), items, correct.item()], dtype=torch.float64)
    model.train()
    totals = dist.sum(totals)
    result = {"eval_loss": float(totals[0] / max(totals[1], 1))}
    if task == SEQ_CLS:
        result["eval_accuracy"] = float(totals[2] / max(totals[1], 1))
    return result
