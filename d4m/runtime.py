"""Process-level helpers shared by every script: seeds, torchrun collectives, progress bars."""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from d4m.cli import UsageError


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on the integer keys (e.g. seed, class, index)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seeded_generator(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


def init_distributed(device: torch.device, timeout_minutes: float) -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun (NCCL for CUDA devices, else gloo); returns
    (rank, world_size). A process that waits longer than `timeout_minutes` for the others aborts the run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def first_error(error: str, world: int) -> str:
    """Every process learns the first non-empty error of any process (a collective under torchrun)."""
    if world == 1:
        return error
    errors = [None] * world
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), "")


@contextlib.contextmanager
def together(world: int) -> Iterator[None]:
    """Share a UsageError of the block, which may run on some processes only: on leaving it, every process raises
    the first error of any (a collective under torchrun: every process enters the block)."""
    error = ""
    try:
        yield
    except UsageError as err:
        error = str(err)
    error = first_error(error, world)
    if error:
        raise UsageError(error)


def from_rank0(value, world: int):
    """Rank 0's `value`, on every process (a collective under torchrun)."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def progress_off(rank: int = 0) -> bool | None:
    """tqdm's `disable`: bars on rank 0 only, and only on a terminal (None lets tqdm turn them off otherwise),
    so that a log written to a file holds lines, not bar redraws."""
    return True if rank != 0 else None
