"""Training: ``train()`` runs AdaLoRA on a local Hugging Face model and writes a run directory.

args.py         TrainArgs: every option, its default, help and choices (the CLI derives from it)
data.py         reading, tokenizing and batching the data files
prepare.py      what a run builds before its first step (tokenizer, data, adapted model, AdamW)
step.py         one optimizer step (Stepper), the loss, evaluation
distributed.py  torchrun: ranks and collectives
fsdp.py         --fsdp: FSDP2 on the frozen base, the trained parameters whole
checkpoint.py   checkpoints that resume exactly
run_dir.py      the run directory: policy, metrics, final outputs
loop.py         train(): the loop, top to bottom
hf_trainer.py   the same AdaLoRA step inside transformers.Trainer (import it directly)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .args import TrainArgs
    from .loop import TrainResult, train

__all__ = ["TrainArgs", "TrainResult", "train"]
_HOMES = {"TrainArgs": "args", "TrainResult": "loop", "train": "loop"}


def __getattr__(name: str):
    # Imported on first use (PEP 562): the command line reads TrainArgs without loading torch.
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value
