"""Process-level helpers shared by every script: seeds, torchrun collectives, progress."""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

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


QUIET_SECONDS = 10


class Progress:
    """The progress of a long loop, on rank 0: a tqdm bar on a terminal; where stderr is not a terminal (a log
    file, nohup), a line at every tenth of the way or after a minute without one, so that a log shows how far a
    run is without bar redraws (none in the first QUIET_SECONDS: a short loop needs no account). Inner loops
    (`leave=False`) draw a bar on a terminal and write no lines to a log. Iterate over it, or call `update` (as a
    context manager)."""

    def __init__(self, iterable: Iterable | None = None, desc: str = "", rank: int = 0, total: int | None = None,
                 initial: int = 0, leave: bool = True, unit: str = "it"):
        self.iterable, self.desc, self.unit, self.done = iterable, desc, unit, initial
        self.total = total if total is not None else len(iterable)
        terminal = sys.stderr.isatty()
        self.bar = tqdm(iterable, desc=desc, total=self.total, initial=initial, leave=leave, unit=unit,
                        disable=rank != 0) if terminal else None
        self.quiet, self.postfix = rank != 0 or not leave, ""
        self.began = self.last = time.monotonic()
        self.tenth = 10 * initial // max(self.total, 1)

    def __iter__(self) -> Iterator:
        if self.bar is not None:
            yield from self.bar
            return
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)
            return
        self.done += n
        now, tenth = time.monotonic(), 10 * self.done // max(self.total, 1)
        if self.quiet or now - self.began < QUIET_SECONDS or (tenth == self.tenth and now - self.last < 60):
            return
        self.tenth, self.last = tenth, now
        elapsed = (now - self.began) / 60
        print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f} %), "
              f"{elapsed:.1f} min{self.postfix}", file=sys.stderr, flush=True)

    def set_postfix(self, **values: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)
        else:
            self.postfix = "".join(f", {key} {value}" for key, value in values.items())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
