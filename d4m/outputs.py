"""Writing outputs safely: atomic renames, writability checked before the work, one writer per output."""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Iterator

from d4m.runtime import UsageError, first_error


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Before the expensive work: the output folder `path` must exist as a writable folder or be creatable, without
    creating it."""
    _check_creatable(Path(path), path, flag)


def check_writable_file(path: str | os.PathLike, flag: str) -> None:
    """Before the expensive work: the output file `path` must be creatable, or replaceable by an atomic rename."""
    if Path(path).is_dir():
        raise UsageError(f"{path} is a folder, so the file {flag} names cannot be written; choose another {flag}")
    _check_creatable(Path(path).parent, path, flag)


def _check_creatable(folder: Path, path: str | os.PathLike, flag: str) -> None:
    ancestor = folder.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{ancestor} is a file, so {path} cannot be written; choose another {flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{ancestor} is not writable, so {path} cannot be written; choose another {flag}")


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the lock file `lock` while writing `what`: a second run that wants it is refused with one line; the
    lock of a process that died is taken over (on this machine; another machine's must be removed by hand). A
    folder made for the lock is removed again when the run leaves it empty."""
    lock = Path(lock)
    created = not lock.parent.exists()
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = f"{os.getpid()} {socket.gethostname()}"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = lock.read_text().split() if lock.is_file() else []
            if len(owner) == 2 and owner[1] != socket.gethostname():
                raise UsageError(f"{what} is being written by process {owner[0]} on {owner[1]}; wait for it, or "
                                 f"remove {lock} if that run has ended") from None
            if len(owner) == 2 and _alive(int(owner[0])):
                raise UsageError(f"{what} is being written by another run (process {owner[0]}); wait for it to "
                                 "finish or choose another output") from None
            lock.unlink(missing_ok=True)  # its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        if created and not any(lock.parent.iterdir()):  # a run that stopped before writing leaves no folder
            lock.parent.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def exclusive_run(lock: str | os.PathLike, what: str, rank: int, world: int) -> Iterator[None]:
    """`exclusive` held by rank 0 for the whole run; every process of the run learns of a refusal."""
    held = contextlib.ExitStack()
    error = ""
    if rank == 0:
        try:
            held.enter_context(exclusive(lock, what))
        except UsageError as err:
            error = str(err)
    error = first_error(error, world)
    if error:
        raise UsageError(error)
    with held:
        yield
