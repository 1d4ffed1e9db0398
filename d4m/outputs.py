"""Writing outputs safely: atomic renames, writability checked before the work, one writer per output, and a
manifest of the settings that made an output folder."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import pickle
import re
import stat
from pathlib import Path
from typing import Callable, Iterator

import torch

from d4m import jsonfile
from d4m.cli import UsageError, is_plain_name
from d4m.runtime import together


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


FOLDER_LOCK = ".lock"  # the lock of an output folder, inside it; a file's is .NAME.lock beside it
_confined: list[Path] = []  # the output folders this process writes under a lock


@contextlib.contextmanager
def _confined_to(lock: Path) -> Iterator[None]:
    """While a folder's lock is held, writes under the folder must stay inside it (`check_confined`)."""
    if lock.name != FOLDER_LOCK:
        yield
        return
    root = Path(os.path.abspath(lock.parent))
    _confined.append(root)
    try:
        yield
    finally:
        _confined.remove(root)


def check_confined(path: str | os.PathLike) -> None:
    """A path under a locked output folder whose folder leads elsewhere (a class or seed folder replaced by a
    symbolic link) is refused before anything is written or removed through it."""
    path = Path(os.path.abspath(path))
    for root in _confined:
        if path.is_relative_to(root) and not path.parent.resolve().is_relative_to(root.resolve()):
            raise UsageError(f"{path.parent} leads outside the output {root} (through a symbolic link), so {path.name} "
                             "would be written elsewhere; remove the link or choose another output")


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the lock file `lock` while writing `what`; a second run that wants it is refused with one line. The
    kernel arbitrates (flock) and releases the lock of a process that dies. The file is removed on release (while
    still held: a taker that opened it just before checks that it locked the file the name still points to), and so
    is a folder made for it that the run leaves empty. While a folder's lock is held, writes stay inside the folder."""
    lock = Path(lock)
    while True:
        created = not lock.parent.exists()
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except (FileNotFoundError, FileExistsError):  # a run that made the folder for its lock is removing it
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"{what} is being written by another run (it holds {lock}); wait for it to finish or "
                             "choose another output") from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it as we opened it: take the file the name points to now
    try:
        with _confined_to(lock):
            yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
        if created:  # a run that stopped before writing leaves no folder
            with contextlib.suppress(OSError):
                lock.parent.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_component(name: str, what: str, fix: str) -> None:
    """A name that becomes part of an output path must be one plain component: no separator, not '.' or '..', not
    empty, so that nothing is written outside the folder a flag names."""
    if not is_plain_name(name):
        raise UsageError(f"{what} {name!r}, which is not a plain file name (it would write outside the output "
                         f"folder); {fix}")


def temporary_path(path: Path) -> Path:
    """The name a file is written under, beside `path`, before it is renamed: `.NAME.tmpPID`."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds. The file gets the
    permissions of a plain open() under the umask, whatever wrote it (safetensors' writer makes files 0600)."""
    path = Path(path)
    check_confined(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        tmp.unlink(missing_ok=True)
        tmp.touch()  # made by open(): the permissions the umask gives
        mode = stat.S_IMODE(tmp.stat().st_mode)
        try:
            yield tmp
        except OSError as err:  # a refused write names the file the run was writing, not its temporary
            if err.filename in (None, str(tmp), tmp):
                raise OSError(err.errno, err.strerror, str(path)) from err
            raise
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write a serialised file atomically, through Python's own file writes: a full disk then surfaces as an
    OSError naming it (torch's and safetensors' writers raise errors of their own, with no errno)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def save_torch(obj, path: str | os.PathLike) -> None:
    """torch.save, serialised in memory, then written by `write_bytes`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())


def load_torch(path: str | os.PathLike, mmap: bool = False):
    """torch.load of tensors and plain values only (weights_only): nothing in the file runs. A file that asks for
    anything else raises a ValueError saying what it asked for, not PyTorch's advice to load it unsafely."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if not str(err).startswith("Weights only load failed"):
            raise
        wanted = re.search(r"GLOBAL (\S+)", str(err))
        raise ValueError(f"it asks for {wanted[1] if wanted else 'a Python object'}, which is no tensor or plain "
                         "value; refused, since loading it could run code") from None


def create_once(path: str | os.PathLike, text: str) -> bool:
    """Write `text` to `path` unless `path` exists; True when this call created it. A hard link of a whole
    temporary file: of two writers (on two machines sharing the file system too) exactly one creates it, and no
    reader sees it half-written. Where the file system has no hard links, an O_EXCL creation, still exclusive."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        tmp.write_text(text)
        os.link(tmp, path)
    except FileExistsError:
        return tmp.stat().st_nlink == 2  # NFS: a retried link reports EEXIST though the first try made it
    except OSError as err:
        if err.errno not in NO_HARD_LINKS:
            raise
        return _create_exclusive(path, text)
    finally:
        tmp.unlink(missing_ok=True)
    return True


NO_HARD_LINKS = (errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)


def _create_exclusive(path: Path, text: str) -> bool:
    try:
        with open(path, "x") as f:
            f.write(text)
    except FileExistsError:
        return False
    return True


TEMPORARY = re.compile(r"\..+\.(?:tmp|build)(\d+)")  # atomic writes' and gen_prototype.py's files


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Remove from `folder` the temporary files (`.NAME.tmpPID`, `.NAME.buildPID`) of processes that are gone. A PID
    says nothing about another machine's processes: call this only while holding the folder's lock."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        match = TEMPORARY.fullmatch(path.name)
        if match and not _alive(int(match[1])):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive_run(lock: str | os.PathLike, what: str, rank: int, world: int) -> Iterator[None]:
    """`exclusive` held by rank 0 for the whole run; every process of the run learns of a refusal, and keeps its
    writes inside a locked folder."""
    held = contextlib.ExitStack()
    with together(world):
        if rank == 0:
            held.enter_context(exclusive(lock, what))
    with held, _confined_to(Path(lock)):
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


def differing_keys(recorded: dict, now: dict) -> list[str]:
    """The settings, in sorted order, whose values differ between a recorded run and this one (absent counts)."""
    return sorted(k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k))


def check_settings(recorded: dict, now: dict, what: str, fix: str, name: Callable[[str], str] = str) -> None:
    """The one rule for every output that records the settings it was made with (image folders, soft-label stores,
    checkpoints): a run with other settings is refused in one line naming the first few that differ."""
    differ = differing_keys(recorded, now)
    if differ:
        shown = "; ".join(f"{name(k)} {recorded.get(k)} there, {now.get(k)} here" for k in differ[:3])
        raise UsageError(f"{what} was made with other settings ({shown}); {fix}")


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
        check_settings(recorded, settings, f"{folder}", f"rerun with the settings it records in {MANIFEST} to "
                       f"resume, or choose another {flag}")
    if write:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")


def _read_manifest(path: Path) -> dict | None:
    try:
        recorded = jsonfile.read(path)
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def claim_folder_run(folder: str | os.PathLike, settings: dict | None, flag: str, write: bool, rank: int,
                     world: int) -> None:
    """`claim_folder` done by rank 0 (the others may pass None); every process of the run learns of a refusal."""
    with together(world):
        if rank == 0:
            claim_folder(folder, settings, flag, write)
