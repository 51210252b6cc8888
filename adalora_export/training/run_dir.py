"""The run directory: its policy (new, --overwrite, --resume), its metrics log and its final outputs.

    RUN_DIR/run_args.json        the options (``TrainArgs``) and the world size
    RUN_DIR/metrics.jsonl        one record per optimizer step (and the step-0 evaluation)
    RUN_DIR/checkpoint-<step>/   training checkpoints (``checkpoint.py``)
    RUN_DIR/final/               the finished state (what ``prune`` reads)
    RUN_DIR/adapter/             the compact adapter (what every export reads)
    RUN_DIR/rank_pattern.json    the final ranks; RUN_DIR/rank_heatmap.png draws them

Nothing is written before every input is checked; each output is written to a temporary path and
renamed into place, so a kill leaves the old run or a complete new one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import IO

from torch import nn

from ..adapter import CompactAdapter, TaskInfo
from ..allocator import RankAllocator
from ..config import AdaLoraConfig
from ..errors import UserError
from ..formats.peft import save_adapter
from ..formats.state import latest_checkpoint
from ..hf import SEQ_CLS
from ..io import (
    atomic_output_dir,
    atomic_output_file,
    check_output_path,
    check_output_spares_inputs,
    read_json,
    write_json,
)
from ..layer import is_adapter_parameter
from ..model import strip_wrapper_prefix
from ..report import plot_rank_heatmap
from .args import RUN_ARGS, TrainArgs
from .checkpoint import save_adapter_state
from .step import NonFiniteStep, StepResult

METRICS = "metrics.jsonl"


def run_inputs(args: TrainArgs) -> dict[str, str | None]:
    """What a run reads (what each is -> its path), which its run directory may not be, contain or replace part of."""
    return {"the base model": args.model, "the training data": args.data, "the validation data": args.validation}


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, inputs: dict | None = None) -> None:
    """A new run needs a free (or --overwrite) and creatable directory; --resume needs the run (the one
    input that is also the output); either way the run directory spares the run's other ``inputs``."""
    check_output_spares_inputs(run_dir, inputs or {})
    if resume:
        return
    if run_dir.exists() and not overwrite:
        raise UserError(f"output {run_dir} already exists; pass --resume to continue it or --overwrite to start over")
    check_output_path(run_dir, overwrite=True, make_parents=True)  # creatable (not under a file, writable)


def check_world_size(run_dir: Path, world_size: int, resume: bool) -> None:
    if resume:
        started_on = read_json(run_dir / RUN_ARGS).get("world_size", 1)
        if started_on != world_size:
            raise UserError(f"{run_dir} was trained on {started_on} ranks; resume it on as many")


def prepare_run_dir(run_dir: Path, args: TrainArgs, world_size: int, resume: bool, overwrite: bool, step: int) -> None:
    """Create (or on --overwrite replace) the run directory; on resume drop metrics past the checkpoint."""
    if resume:
        keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        tmp = run_dir / f".{METRICS}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, run_dir / METRICS)
        return
    # Atomic: a kill leaves the old run (with --overwrite) or a new one that --resume continues, never half of
    # either; missing parent directories are created here, past every check.
    with atomic_output_dir(run_dir, overwrite=overwrite) as tmp:
        write_json(tmp / RUN_ARGS, {**dataclasses.asdict(args), "world_size": world_size})


def non_finite_error(error: NonFiniteStep, run_dir: Path) -> UserError:
    """The non-finite step's message, naming the checkpoint that is still good."""
    last = latest_checkpoint(run_dir)
    where = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written yet"
    return UserError(f"{error} before the optimizer step; {where}. Lower --lr or check the data")


# ----------------------------------------------------------------------- metrics
class MetricsLog:
    """Appends records to RUN_DIR/metrics.jsonl (rank 0 only: other ranks pass ``run_dir=None``)."""

    def __init__(self, run_dir: Path | None):
        self.handle: IO[str] | None = open(run_dir / METRICS, "a", encoding="utf-8") if run_dir else None

    def write(self, record: dict) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def step_record(step: int, per_epoch: int, lr: float, result: StepResult, started: float) -> dict:
    """One metrics.jsonl line."""
    alloc = result.allocation
    return {
        "step": step,
        "epoch": round(step / per_epoch, 4),
        "loss": result.loss,
        "orth": result.orth,
        "orth_weight": result.orth_weight,
        "lr": lr,
        "grad_norm": result.grad_norm,
        "budget": alloc.budget,
        "kept": alloc.kept,
        "kept_triplets": alloc.kept_triplets,
        "masked": alloc.masked,
        "final": alloc.final,
        "items": result.items,
        "seconds": round(time.time() - started, 4),
    }


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def first_eval(run_dir: Path) -> dict:
    """The step-0 evaluation of a run, from its metrics (a resumed run did it in an earlier process)."""
    for record in read_metrics(run_dir):
        if record.get("step") == 0:
            return {k: v for k, v in record.items() if k.startswith("eval_")}
    return {}


# ----------------------------------------------------------------------- outputs
def task_info(args: TrainArgs, task: str, model: nn.Module) -> TaskInfo:
    """What the adapter carries of its task: the training length; a classifier's labels, head and pad id."""
    if task != SEQ_CLS:
        return TaskInfo(max_length=args.max_length)
    trained = [strip_wrapper_prefix(n) for n, p in model.named_parameters() if p.requires_grad]
    head = sorted({n.rpartition(".")[0] for n in trained if not is_adapter_parameter(n)})
    return TaskInfo(
        id2label={int(k): v for k, v in model.config.id2label.items()},
        head_modules=head,
        problem_type="single_label_classification",
        max_length=args.max_length,
        pad_token_id=model.config.pad_token_id,
    )


def adapter_meta(args: TrainArgs, task: str, model: nn.Module) -> dict:
    """What a state directory records about its base and task, so that pruning and exports find them."""
    return {
        "base_model_name_or_path": args.model,
        "task_type": task,
        "task_info": task_info(args, task, model).to_json(),
    }


def write_outputs(
    run_dir: Path, model: nn.Module, config: AdaLoraConfig, allocator: RankAllocator, args: TrainArgs, task: str
) -> tuple[list[Path], CompactAdapter]:
    """final/ (the finished state), adapter/ (compact, PEFT-loadable), rank_pattern.json, the heat map;
    returns the files and the compact adapter."""
    with atomic_output_dir(run_dir / "final", overwrite=True) as tmp:
        save_adapter_state(model, config, allocator, config.total_step, tmp, meta=adapter_meta(args, task, model))
    adapter = CompactAdapter.from_model(
        model,
        config,
        mask=allocator.current_mask,
        importance=allocator.final_importance,
        base_model_name_or_path=args.model,
        task_type=task,
        task_info=task_info(args, task, model),
    )
    save_adapter(adapter, run_dir / "adapter", overwrite=True)
    pattern = {
        "init_r": config.init_r,
        "target_r": config.target_r,
        "budget": allocator.target_budget,
        "budget_unit": config.budget_unit,
        "ranks": adapter.rank_pattern,
        "frozen_mask": allocator.frozen_mask,
    }
    with atomic_output_file(run_dir / "rank_pattern.json", overwrite=True) as tmp:
        write_json(tmp, pattern)
    plot_rank_heatmap(adapter, run_dir / "rank_heatmap.png", overwrite=True)
    files = [run_dir / "final", run_dir / "adapter", run_dir / "rank_pattern.json", run_dir / "rank_heatmap.png"]
    return files, adapter
