"""This process's place in a torchrun job, and the few collectives training uses.

Without torchrun (no ``WORLD_SIZE``) everything here is a no-op for rank 0 of 1, so the loop reads
the same either way. The CPU uses gloo, GPUs NCCL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..allocator import RankAllocator


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without one) and the few collectives we use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # started the process group here (so ends it), rather than found it running
    fsdp: bool = False  # the base is sharded with FSDP2 (``fsdp.py``); the trained parameters are whole

    @classmethod
    def start(cls) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        import torch.distributed as td

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        owns_group = not td.is_initialized()
        if owns_group:
            td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(td.get_rank(), td.get_world_size(), local_rank, owns_group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """This rank's GPU, or the CPU."""
        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DistributedDataParallel over the current parameters (call again after they are replaced).

        Under FSDP the model is already sharded in place (``fsdp.shard_model``) and is returned as it is."""
        if self.world_size == 1 or self.fsdp:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def no_sync(self, model: nn.Module, skip: bool):
        """DDP's no_sync for the micro-batches before the last one of a step (FSDP: the base is frozen, so it
        reduces no gradient; ``fsdp.average_gradients`` reduces the whole parameters' once per step)."""
        return model.no_sync() if skip and self.world_size > 1 and not self.fsdp else contextlib.nullcontext()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        import torch.distributed as td

        out = tensor.detach().to(self.device).clone()
        td.all_reduce(out)
        return out.to(tensor.device)

    def gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def check_masks_agree(self, allocator: RankAllocator, step: int) -> None:
        """Every rank must have chosen the same mask; a difference means the ranks' gradients differ."""
        if self.world_size == 1:
            return
        digest = hashlib.sha256(json.dumps(allocator.current_mask, sort_keys=True).encode()).hexdigest()
        hashes = self.gather(digest[:16])
        if len(set(hashes)) != 1:
            raise RuntimeError(
                f"ranks disagree on the AdaLoRA mask at step {step} (mask hashes by rank: {hashes}); "
                "their gradients differ, so every rank must run the same code, model and data"
            )

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as td

            td.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()
