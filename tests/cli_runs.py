"""Running the command line from a test: in-process (``run_cli``), or in a fresh ``python`` process
with ``SUBPROCESS_ENV`` (offline hub, one thread). ``forkserver`` runs it in forked children."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout: cli.py, docs/, the packages
# What a child ``python`` needs to run a command as the tests expect: no hub access, one thread each.
SUBPROCESS_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def run_cli(*args) -> int:
    """``cli.main`` in-process, arguments turned into strings; its exit code (0 when it returns)."""
    from adalora_export.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code
    return 0
