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

import functools
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from ..model import adapted_layers
from ..report import lora_comparison
from .args import TrainArgs, resolve_args
from .checkpoint import rng_state, save_checkpoint
from .data import micro_batches
from .distributed import Distributed
from .prepare import Run, describe_run, prepare_run
from .run_dir import (
    MetricsLog,
    adapter_meta,
    check_run_dir,
    check_world_size,
    first_eval,
    non_finite_error,
    prepare_run_dir,
    read_metrics,
    run_inputs,
    step_record,
    write_outputs,
)
from .step import NonFiniteStep, evaluate, lr_factor


@dataclass
class TrainResult:
    """What a finished run reports (the CLI prints it)."""

    run_dir: Path
    total_step: int
    loss_start: float  # mean task loss of the first 10% of steps
    loss_end: float  # ... and of the last 10%
    ranks: dict[str, int]
    budget: int
    budget_unit: str
    wall_time: float
    eval_start: dict = field(default_factory=dict)
    eval_end: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    size: str = ""  # the final adapter's parameters next to LoRA at each uniform rank
    is_main: bool = True  # False on the other ranks of a torchrun job
    start_step: int = 0  # the step a resumed run continued from (0: a fresh run)

    def summary(self) -> str:
        """A few lines for the terminal: losses, evaluation, ranks, files."""
        ran = self.total_step - self.start_step
        what = f"trained {ran} steps in {self.wall_time:.1f}s"
        if self.start_step:  # a resumed run: this process ran the steps after the checkpoint
            steps = f"{self.start_step + 1}-{self.total_step}"
            what = f"resumed at step {self.start_step}: trained steps {steps} in {self.wall_time:.1f}s"
        lines = [
            f"{what}; loss {self.loss_start:.4f} -> {self.loss_end:.4f} (mean of the first and last 10% of all steps)"
        ]
        for key in sorted(set(self.eval_start) | set(self.eval_end)):
            lines.append(
                f"{key}: {self.eval_start.get(key, float('nan')):.4f} -> {self.eval_end.get(key, float('nan')):.4f}"
            )
        kept = sum(self.ranks.values())
        lines.append(
            f"final ranks: {kept} triplets kept (budget {self.budget:,} {self.budget_unit}) over {len(self.ranks)} "
            "matrices"
        )
        lines += [f"  {path} {rank}" for path, rank in self.ranks.items()]
        if self.size:
            lines.append(self.size)
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
    check_run_dir(run_dir, resume=resume, overwrite=overwrite, inputs=run_inputs(args))
    dist = Distributed.start()
    try:
        check_world_size(run_dir, dist.world_size, resume)
        dist.fsdp = check_fsdp(args, dist.world_size)
        run = prepare_run(args, run_dir, dist, resume)
        # Only now, with every input checked, does anything get written.
        if dist.is_main:
            prepare_run_dir(run_dir, args, dist.world_size, resume, overwrite, run.start_step)
            say(f"resuming {run_dir} at step {run.start_step}" if run.start_step else f"training into {run_dir}")
            say(describe_run(run))
        eval_start, eval_end = run_steps(run, args, dist, run_dir, progress)
        files, size = [], ""
        if dist.is_main:
            files, adapter = write_outputs(run_dir, run.net, run.config, run.allocator, args, run.task)
            params = adapter.num_parameters()
            size = f"adapter: {params:,} parameters. " + lora_comparison(params, adapter.lora_parameters())
        dist.barrier()
        losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r] if dist.is_main else []
        tenth = max(1, len(losses) // 10)
        return TrainResult(
            run_dir=run_dir,
            total_step=run.total_step,
            loss_start=float(np.mean(losses[:tenth])) if losses else float("nan"),
            loss_end=float(np.mean(losses[-tenth:])) if losses else float("nan"),
            ranks={path: layer.rank for path, layer in adapted_layers(run.net)},
            budget=run.allocator.target_budget,
            budget_unit=run.config.budget_unit,
            wall_time=time.time() - started,
            eval_start=eval_start or (first_eval(run_dir) if dist.is_main else {}),
            eval_end=eval_end,
            files=files,
            size=size,
            is_main=dist.is_main,
            start_step=run.start_step,
        )
    finally:
        dist.close()


def run_steps(run: Run, args: TrainArgs, dist: Distributed, run_dir: Path, progress: bool) -> tuple[dict, dict]:
    """Steps start_step+1 .. total_step, with metrics, evaluation and checkpoints.

    Returns the evaluation before the first step (on a fresh run) and after the last one.
    """
    log = MetricsLog(run_dir if dist.is_main else None)
    show = progress and dist.is_main
    bar = tqdm(
        total=run.total_step, initial=run.start_step, desc="train", unit="step", disable=not show, dynamic_ncols=True
    )
    evaluate_now = functools.partial(
        evaluate, run.net, run.val_set, run.task, args.batch_size, run.pad_id, dist, run.amp_dtype
    )
    try:
        eval_start, eval_end = {}, {}
        if run.val_set is not None and run.start_step == 0:
            eval_start = evaluate_now()
            log.write({"step": 0, **eval_start})
        for step in range(run.start_step + 1, run.total_step + 1):
            step_started = time.time()
            lr = args.lr * lr_factor(step, run.warmup, run.total_step)
            batches = micro_batches(
                run.train_set,
                step,
                run.global_batch,
                dist.rank,
                dist.world_size,
                args.batch_size,
                args.seed,
                run.pad_id,
            )
            try:
                result = run.stepper.step(step, batches, lr)
            except NonFiniteStep as error:
                raise non_finite_error(error, run_dir) from None
            record = step_record(step, run.per_epoch, lr, result, step_started)
            last = step == run.total_step
            if run.val_set is not None and (last or (args.eval_steps and step % args.eval_steps == 0)):
                eval_end = evaluate_now()
                record.update(eval_end)
            log.write(record)
            alloc = result.allocation
            bar.set_postfix(loss=f"{result.loss:.4f}", budget=f"{alloc.budget:,}", kept=f"{alloc.kept:,}")
            bar.update(1)
            if args.save_steps and (last or step % args.save_steps == 0):
                save_run_checkpoint(run, args, dist, run_dir, step)
        return eval_start, eval_end
    finally:
        log.close()
        bar.close()  # ends the bar's line, so that an error message gets its own


def save_run_checkpoint(run: Run, args: TrainArgs, dist: Distributed, run_dir: Path, step: int) -> None:
    """Every rank's RNG state gathered, then rank 0 writes checkpoint-<step> (and prunes old ones)."""
    rng = dist.gather(rng_state())
    if dist.is_main:
        state = {"data_fingerprint": run.train_set.fingerprint, "epoch": step / run.per_epoch}
        meta = adapter_meta(args, run.task, run.net)
        save_checkpoint(
            run_dir,
            step,
            run.net,
            run.config,
            run.allocator,
            run.optimizer,
            run.param_names,
            rng,
            state,
            meta=meta,
            keep=args.keep_checkpoints,
        )


def check_fsdp(args: TrainArgs, world_size: int) -> bool:
    """--fsdp shards over torchrun's ranks; a lone process has nothing to shard over, so it is refused."""
    if args.fsdp and world_size == 1:
        raise UserError(
            "--fsdp shards the base over torchrun's ranks, and this process runs alone; launch it with "
            "`torchrun --nproc_per_node N cli.py train ... --fsdp` (N >= 2), or drop --fsdp"
        )
    return args.fsdp


def say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)
