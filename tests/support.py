"""The old single helper module, kept as a list of re-exports for the test files that still import from it.

Each helper lives in the module of its job; new code imports from there:

- ``models``: tiny transformers models and base directories, the torch reference forward.
- ``adapters``: random compact adapters at chosen ranks, in memory or saved.
- ``training``: the short schedule, training data, the AdaLoRA loop, PEFT's loop, the budget check.
- ``files``: copies, corrupt safetensors, pickled weights, tree digests, leftovers of atomic writes.
- ``cli_runs``: ROOT, the environment of a child ``python``, the CLI in-process.
- ``forkserver``: the fork server that runs CLI commands in children it can kill.

The shared fixtures built from these (tiny bases, a saved adapter, the schedule, the data) are in conftest.py.
"""

from adapters import adapter_at_ranks, make_adapter
from cli_runs import ROOT, run_cli
from cli_runs import SUBPROCESS_ENV as SERVER_ENV
from files import copy_tree, corrupt_safetensors, hidden_temps, leftovers, pickle_weights, tree_digest
from forkserver import CHILD_WATCHDOG_S, ForkServer
from forkserver import fresh_tqdm_locks as _fresh_tqdm_locks
from models import GPT2_TARGETS, LLAMA_TARGETS, WORDS, make_base, save_base, tiny_gpt2, tiny_llama, torch_forward
from training import TRAIN_FLAGS, assert_within_budget, train_adalora, write_data

__all__ = [
    "CHILD_WATCHDOG_S",
    "GPT2_TARGETS",
    "LLAMA_TARGETS",
    "ROOT",
    "SERVER_ENV",
    "TRAIN_FLAGS",
    "WORDS",
    "ForkServer",
    "_fresh_tqdm_locks",
    "adapter_at_ranks",
    "assert_within_budget",
    "copy_tree",
    "corrupt_safetensors",
    "hidden_temps",
    "leftovers",
    "make_adapter",
    "make_base",
    "pickle_weights",
    "run_cli",
    "save_base",
    "tiny_gpt2",
    "tiny_llama",
    "torch_forward",
    "train_adalora",
    "tree_digest",
    "write_data",
]
