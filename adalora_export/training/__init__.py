"""Training: ``train()`` runs AdaLoRA on a local Hugging Face model and writes a run directory.

args.py         TrainArgs: every option, its default, help and choices (the CLI derives from it)
data.py         reading, tokenizing and batching the data files
prepare.py      what a run builds before its first step (tokenizer, data, adapted model, AdamW)
step.py         one optimizer step (Stepper), the loss, evaluation
distributed.py  torchrun: ranks and collectives
checkpoint.py   checkpoints that resume exactly
run_dir.py      the run directory: policy, metrics, final outputs
loop.py         train(): the loop, top to bottom
hf_trainer.py   the same AdaLoRA step inside transformers.Trainer (import it directly)
"""

from .args import TrainArgs
from .loop import TrainResult, train

__all__ = ["TrainArgs", "TrainResult", "train"]
