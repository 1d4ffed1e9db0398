"""Writing outputs safely: atomic renames, writability checked before the work, one writer per output, and a
manifest of the settings that made an output folder."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from d4m.runtime import UsageError, first_error


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Before the expensive work: `path` (a folder or file to be made) must be creatable, without creating it."""
    ancestor = Path(path).absolute()
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


MANIFEST = "manifest.json"


def file_digest(path: str | os.PathLike) -> str:
    """blake2b of a file's bytes (read in 16 MiB chunks: about a second per GB)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def text_digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _holds_outputs(folder: Path) -> bool:
    return any(p.is_file() and not p.name.startswith(".") and p.name != MANIFEST for p in folder.rglob("*"))


def claim_folder(folder: str | os.PathLike, settings: dict, flag: str, write: bool) -> None:
    """An output folder records the settings its files were made with in manifest.json: a run with other settings,
    or a folder of files without a manifest, is refused, so that a resume never mixes the outputs of two runs.
    With `write`, a folder without outputs takes this run's settings. `settings` must hold JSON values only."""
    folder = Path(folder)
    path = folder / MANIFEST
    recorded = _read_manifest(path)
    if recorded == settings:
        return
    if folder.is_dir() and _holds_outputs(folder):
        if recorded is None:
            raise UsageError(f"{folder} holds files but no readable {MANIFEST}, so the settings they were made with "
                             f"are unknown; remove the folder or choose another {flag}")
        differ = [k for k in sorted(set(recorded) | set(settings)) if recorded.get(k) != settings.get(k)]
        shown = "; ".join(f"{k}: {recorded.get(k)!r} there, {settings.get(k)!r} now" for k in differ[:3])
        raise UsageError(f"{folder} holds files made with other settings ({shown}); rerun with the settings it "
                         f"records in {MANIFEST} to resume, or choose another {flag}")
    if write:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")


def _read_manifest(path: Path) -> dict | None:
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def claim_folder_run(folder: str | os.PathLike, settings: dict | None, flag: str, write: bool, rank: int,
                     world: int) -> None:
    """`claim_folder` done by rank 0 (the others may pass None); every process of the run learns of a refusal."""
    error = ""
    if rank == 0:
        try:
            claim_folder(folder, settings, flag, write)
        except UsageError as err:
            error = str(err)
    error = first_error(error, world)
    if error:
        raise UsageError(error)
