"""AdaLoRA inside ``transformers.Trainer``: the allocator on every optimizer step, the orthogonal term in the loss.

Use ``AdaLoraTrainer`` in place of ``Trainer`` on a model that ``inject_adapters`` prepared::

    config = AdaLoraConfig(init_r=12, target_r=8, tinit=50, tfinal=100, deltaT=10)
    inject_adapters(model, config)
    trainer = AdaLoraTrainer(model=model, args=TrainingArguments(...), train_dataset=..., adalora_config=config)
    trainer.train()
    trainer.save_adapter("adapter_dir")  # the compact adapter, PEFT-loadable

The ``recommended`` preset of ``adalora-export train`` is ``AdaLoraConfig(..., **recommended_schedule(max_steps))``.

Or keep your own Trainer subclass: add ``AdaLoraCallback(config)`` to its callbacks and add
``config.orth_reg_weight * orthogonal_regularizer(model)`` to its loss (``adalora_loss`` does it
with Trainer's gradient-accumulation scaling).

How it fits Trainer's loop (transformers 5): ``on_optimizer_step`` runs after ``optimizer.step()``
and before ``model.zero_grad()``, so the allocator sees this step's (clipped) gradients, as the step
contract wants; Trainer's ``global_step`` is the number of steps done before it, so the allocator
gets ``global_step + 1``. At the final step the allocator replaces lora_A/E/B by smaller
Parameters and points Trainer's optimizer (accelerate's wrapper delegates ``param_groups`` and
``state``) at them; Trainer clips ``model.parameters()`` afresh every step, so nothing else holds the
old ones. A DistributedDataParallel wrapper would, so multi-process Trainer runs are refused: use
``adalora-export train`` under torchrun for those.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..adapter import CompactAdapter
from ..allocator import Allocation, RankAllocator
from ..config import AdaLoraConfig
from ..errors import UserError
from ..formats.peft import save_adapter
from ..model import orthogonal_regularizer


class AdaLoraCallback(TrainerCallback):
    """Builds the RankAllocator when training starts and calls it once per optimizer step."""

    def __init__(self, config: AdaLoraConfig):
        self.config = config
        self.allocator: RankAllocator | None = None
        self.last: Allocation | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(args, "fsdp", None):  # TrainingArguments.fsdp: [] when unset
            raise UserError(
                "AdaLoraTrainer does not run under FSDP; use `torchrun --nproc_per_node N cli.py train ... --fsdp`"
            )
        if args.world_size > 1:
            raise UserError(
                "AdaLoRA's final shrink replaces parameters under DistributedDataParallel; "
                "use `adalora-export train` under torchrun for multi-process runs"
            )
        if state.global_step > 0:
            raise UserError("resuming a Trainer checkpoint is not supported here; use `adalora-export train --resume`")
        self.config.total_step = state.max_steps
        self.allocator = RankAllocator(model, self.config, state.max_steps)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.last = self.allocator.update_and_allocate(state.global_step + 1, optimizer)


def adalora_loss(trainer: Trainer, model: torch.nn.Module, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """``loss`` plus the orthogonal term, scaled so that each optimizer step counts it once.

    Trainer divides a micro-batch loss by the accumulation steps unless the loss is already
    normalized over the whole accumulated batch; the term follows the same rule.
    """
    scaled = trainer.loss_is_scaled_for_ga
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            trainer.compute_loss_func is not None
        )
    orth = orthogonal_regularizer(trainer.accelerator.unwrap_model(model)).to(loss.device)
    if scaled:
        orth = orth / trainer.current_gradient_accumulation_steps
    callback = getattr(trainer, "adalora", None)  # the allocator knows the weight in force (final phase option)
    allocator = getattr(callback, "allocator", None)
    weight = allocator.orth_reg_weight if allocator is not None else trainer.adalora_config.orth_reg_weight
    return loss + weight * orth


class AdaLoraTrainer(Trainer):
    """``transformers.Trainer`` with AdaLoRA's allocator and orthogonal regularizer applied."""

    def __init__(self, *args, adalora_config: AdaLoraConfig, **kwargs):
        self.adalora_config = adalora_config
        self.adalora = AdaLoraCallback(adalora_config)
        callbacks = list(kwargs.pop("callbacks", None) or []) + [self.adalora]
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            loss = adalora_loss(self, model, loss, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def compact_adapter(self, task_type: str | None = None) -> CompactAdapter:
        """The trained adapter with the masked triplets dropped (every layer at its own rank)."""
        allocator = self.adalora.allocator
        model = self.accelerator.unwrap_model(self.model)
        mask = allocator.current_mask if allocator is not None else None
        base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        return CompactAdapter.from_model(
            model, self.adalora_config, mask=mask, base_model_name_or_path=base, task_type=task_type
        )

    def save_adapter(self, path: str | os.PathLike, task_type: str | None = None, overwrite: bool = False) -> Path:
        """Write the compact adapter (a PEFT AdaLoRA directory) with ``adalora_export.formats.save_adapter``."""
        return save_adapter(self.compact_adapter(task_type), path, overwrite=overwrite)
