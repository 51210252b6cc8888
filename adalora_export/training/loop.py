"""The AdaLoRA training loop behind ``adalora-export train``. Read it top to bottom.

``train(output, model=..., data=..., **options)`` does the whole run:

1. resolve the options (``args.py``; on resume: the run's own, and a check that nothing changed);
2. start torch.distributed when launched by torchrun (``distributed.py``);
3. read the tokenizer and the data, derive total_step, check the AdaLoRA schedule (before any heavy
   work), then load the model with its SVD adapters, the RankAllocator and AdamW (``prepare.py``);
   on resume restore adapter, allocator, optimizer and RNG states from the latest checkpoint (the
   data position follows from the step);
4. per optimizer step: one ``Stepper.step`` (``step.py``: micro-batches, loss, orthogonal term,
   clipping, the non-finite check, the allocator), then metrics, evaluation and checkpoints;
5. write ``final/``, ``adapter/``, ``rank_pattern.json`` and the rank heat map (``run_dir.py``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..allocator import RankAllocator
from ..hf import check_model_dir
from ..model import adapted_layers
from ..state import latest_checkpoint
from .args import resolve_args
from .checkpoint import restore_adapter, restore_optimizer, rng_state, save_checkpoint
from .data import micro_batches
from .distributed import Distributed
from .prepare import (
    build_optimizer,
    choose_task,
    count_steps_per_epoch,
    describe_run,
    load_datasets,
    load_model,
    load_tokenizer,
    optimizer_param_names,
    pad_token_id,
    seed_everything,
)
from .run_dir import (
    MetricsLog,
    adapter_meta,
    check_run_dir,
    check_world_size,
    first_eval,
    non_finite_error,
    prepare_run_dir,
    read_metrics,
    step_record,
    write_outputs,
)
from .step import NonFiniteStep, Stepper, autocast_dtype, evaluate, lr_factor


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
    """Train an AdaLoRA adapter on a local HF model; ``options`` are ``TrainArgs`` fields.

    ``resume=True`` continues the run in ``output`` from its latest checkpoint with the run's own
    options; options passed as well must equal them (except ``args.RESUME_MAY_CHANGE``).
    ``overwrite=True`` replaces an existing run directory. Bad input raises UserError before
    anything is written; a non-finite loss raises UserError with the last good checkpoint intact.
    """
    started = time.time()
    run_dir = Path(output).absolute()
    args = resolve_args(run_dir, model, data, options, resume)
    args.check()
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    dist = Distributed.start()
    log, bar = MetricsLog(None), tqdm(disable=True)
    try:
        check_world_size(run_dir, dist.world_size, resume)
        amp_dtype = autocast_dtype(args.precision, dist.device)
        seed_everything(args.seed)

        # Data, the run's length and the schedule: all checked before the model is loaded.
        model_config = check_model_dir(args.model)
        tokenizer = load_tokenizer(args.model)
        task = choose_task(args, model_config)
        train_set, val_set = load_datasets(args, tokenizer, task)
        global_batch = args.batch_size * args.grad_accum * dist.world_size
        per_epoch = count_steps_per_epoch(args, train_set, global_batch)
        total_step = args.max_steps or (args.epochs or 1) * per_epoch
        config = args.adalora_config(total_step)
        warmup = math.ceil(args.warmup_ratio * total_step)

        # The adapted model, the allocator and AdamW; on resume, the latest checkpoint's states.
        pad_id = pad_token_id(tokenizer)
        net = load_model(args.model, task, train_set, config, dist.device, amp_dtype, pad_id)
        name_groups = optimizer_param_names(net)
        param_names = [name for group in name_groups for name in group]  # the optimizer's order
        allocator = RankAllocator(net, config, total_step)
        latest = latest_checkpoint(run_dir) if resume else None
        checkpoint = restore_adapter(latest, net, allocator, train_set) if latest else None
        optimizer = build_optimizer(net, name_groups, args.lr, args.weight_decay)
        if checkpoint:
            restore_optimizer(checkpoint, optimizer, param_names, dist.rank)
        start_step = checkpoint.step if checkpoint else 0
        stepper = Stepper(net, optimizer, allocator, task, args.max_grad_norm, dist, amp_dtype)

        # Only now, with every input checked, does anything get written.
        if dist.is_main:
            prepare_run_dir(run_dir, args, dist.world_size, resume, overwrite, start_step)
            say(f"resuming {run_dir} at step {start_step}" if checkpoint else f"training into {run_dir}")
            say(describe_run(net, allocator, train_set, task, total_step, per_epoch, global_batch, amp_dtype))
        log = MetricsLog(run_dir if dist.is_main else None)
        eval_start, eval_end = {}, {}
        if val_set is not None and start_step == 0:
            eval_start = evaluate(net, val_set, task, args.batch_size, pad_id, dist, amp_dtype)
            log.write({"step": 0, **eval_start})

        show = progress and dist.is_main
        bar = tqdm(
            total=total_step, initial=start_step, desc="train", unit="step", dynamic_ncols=True, disable=not show
        )
        for step in range(start_step + 1, total_step + 1):
            step_started = time.time()
            lr = args.lr * lr_factor(step, warmup, total_step)
            batches = micro_batches(
                train_set, step, global_batch, dist.rank, dist.world_size, args.batch_size, args.seed, pad_id
            )
            try:
                result = stepper.step(step, batches, lr)
            except NonFiniteStep as error:
                raise non_finite_error(error, run_dir) from None
            record = step_record(step, per_epoch, lr, result, step_started)
            if val_set is not None and (step == total_step or (args.eval_steps and step % args.eval_steps == 0)):
                eval_end = evaluate(net, val_set, task, args.batch_size, pad_id, dist, amp_dtype)
                record.update(eval_end)
            log.write(record)
            bar.set_postfix(loss=f"{result.loss:.4f}", budget=result.allocation.budget, kept=result.allocation.kept)
            bar.update(1)
            if args.save_steps and (step % args.save_steps == 0 or step == total_step):
                rng = dist.gather(rng_state())  # every rank's, saved by rank 0
                if dist.is_main:
                    state = {"data_fingerprint": train_set.fingerprint, "epoch": step / per_epoch}
                    meta = adapter_meta(args, task, net)
                    save_checkpoint(
                        run_dir,
                        step,
                        net,
                        config,
                        allocator,
                        optimizer,
                        param_names,
                        rng,
                        state,
                        meta,
                        args.keep_checkpoints,
                    )
        bar.close()
        log.close()

        files = write_outputs(run_dir, net, config, allocator, args, task) if dist.is_main else []
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
            eval_start=eval_start or (first_eval(run_dir) if dist.is_main else {}),
            eval_end=eval_end,
            files=files,
            is_main=dist.is_main,
        )
    finally:
        log.close()
        bar.close()  # ends the bar's line, so that an error message gets its own
        dist.close()


def say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)
