"""Pruning: turn a training run, a checkpoint or a PEFT AdaLoRA directory into a compact adapter.

Every triplet masked at the source's step is dropped, so each module keeps exactly the rank in force
there (0..init_r); the result is written as a PEFT AdaLoRA directory (see ``formats``).
"""

from __future__ import annotations

import os

from .adapter import CompactAdapter
from .formats.peft import save_adapter
from .io import check_output_path
from .sources import load_adapter


def prune(
    source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False, allow_pickle: bool = False
) -> CompactAdapter:
    """Write the compact adapter of ``source`` to ``output`` and return it.

    ``source`` is a training run directory (its ``final/`` state, else its latest ``checkpoint-<step>/``),
    a checkpoint (training state directory), or an AdaLoRA adapter directory (ours or PEFT's, sliced or
    unsliced). ``.bin`` weights are read only with ``allow_pickle``.
    """
    check_output_path(output, overwrite, inputs={"the adapter source": source})  # before reading anything large
    adapter = load_adapter(source, allow_pickle=allow_pickle)
    save_adapter(adapter, output, overwrite=overwrite)
    return adapter
