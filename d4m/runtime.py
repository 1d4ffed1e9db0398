"""Process-level helpers shared by every script: clear errors, seeds, torchrun, progress bars."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import functools
import io
import math
import os
import sys
from typing import Callable, Iterator, NoReturn

import numpy as np
import torch
import torch.distributed as dist


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


WRITE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose refusals are UsageErrors, so that a bad flag is one line and exit status 2 like every other
    refusal (under `cli`)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)")


def _number(text: str, kind: type, ok: Callable[[float], bool], what: str) -> int | float:
    try:
        value = kind(text)
        if ok(value):
            return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")


def positive_int(text: str) -> int:
    """argparse type: 1, 2, ..."""
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: 0, 1, 2, ..."""
    return _number(text, int, lambda v: v >= 0, "0 or a positive integer")


def seed_int(text: str) -> int:
    """argparse type: a seed torch and numpy both take, 0 .. 2**63 - 1."""
    return _number(text, int, lambda v: 0 <= v < 2**63, "an integer from 0 to 2**63 - 1")


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0 (learning rates, temperatures, Beta parameters)."""
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a positive number")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number of at least 0 (weight decays, momenta)."""
    return _number(text, float, lambda v: math.isfinite(v) and v >= 0, "0 or a positive number")


def first_line(err: BaseException) -> str:
    """An exception's first line (its type when it has no message), for a one-line error naming the cause."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def one_line(message: str) -> str:
    """A UsageError raised in a DataLoader worker arrives wrapped in the worker's traceback: keep its own line."""
    if "Original Traceback" in message:
        message = message.strip().splitlines()[-1].split("UsageError: ", 1)[-1]
    return message


def cli(main: Callable[[], None]) -> Callable[[], None]:
    """Wrap a script's main so that a UsageError, or a write refused by the file system (read-only, full, not a
    folder), prints one line and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if isinstance(sys.stdout, io.TextIOWrapper):  # print paths not named in UTF-8 escaped, as stderr does
            sys.stdout.reconfigure(errors="backslashreplace")
        try:
            return main(*args, **kwargs)
        except UsageError as err:
            print(f"error: {one_line(str(err))}", file=sys.stderr)
            sys.exit(2)
        except OSError as err:
            if err.errno not in WRITE_ERRORS:
                raise
            print(f"error: cannot write {err.filename or 'the output'}: {err.strerror}; free some space or choose "
                  "a writable output folder (what was complete before is kept)", file=sys.stderr)
            sys.exit(2)
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()

    return wrapper


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
