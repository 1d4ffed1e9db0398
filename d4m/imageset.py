"""A synthetic set as every generator of distillation/ writes it: <root>/<class>/<image>.png with zero-padded names
(sorted folder order = class order), manifest.json with the settings that made it, classes.json with the class
names and prompts; written by one locked run, resumable image by image, shared between torchrun processes."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator, Sequence, TypeVar

from PIL import Image

from d4m.outputs import atomic_path, check_writable, claim_folder_run, exclusive_run

Item = TypeVar("Item")


def image_path(root: Path, label: int, index: int, num_classes: int, ipc: int) -> Path:
    """Zero-padded names of equal width, so that sorted folder order is class order."""
    return root / f"{label:0{len(str(num_classes - 1))}d}" / f"{index:0{len(str(ipc - 1))}d}.png"


def set_paths(root: Path, num_classes: int, ipc: int) -> dict[tuple[int, int], Path]:
    """{(class, image): its file} for a whole set."""
    return {(c, j): image_path(root, c, j, num_classes, ipc) for c in range(num_classes) for j in range(ipc)}


def save_image(image: Image.Image, path: Path, size: int, resize_filter: str) -> None:
    with atomic_path(path) as tmp:
        image.resize((size, size), Image.Resampling[resize_filter.upper()]).save(tmp, format="PNG")


def my_share(todo: Sequence[Item], rank: int, world: int) -> list[Item]:
    """A contiguous, equal share of the work still to do: a resumed run keeps every process busy."""
    per, extra = divmod(len(todo), world)
    start = rank * per + min(rank, extra)
    return list(todo[start : start + per + (rank < extra)])


def batches(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


@contextlib.contextmanager
def writing_set(root: Path, settings: dict | None, flag: str, rank: int, world: int) -> Iterator[None]:
    """Hold the set's lock for the run (taken before any model loads) and claim the folder for `settings` (rank 0's;
    the others pass None): a folder made with other settings is refused in one line, one made with the same ones
    is resumed. A run that stops before its first image leaves no folder it made."""
    check_writable(root, flag)
    made = None if root.exists() else root  # the outermost folder this run creates
    while made is not None and not made.parent.exists():
        made = made.parent
    try:
        with exclusive_run(root / ".lock", f"image folder {root}", rank, world):
            claim_folder_run(root, settings, flag, True, rank, world)
            yield
    except BaseException:
        if rank == 0 and made is not None and not any(made.rglob("*.png")):
            shutil.rmtree(made, ignore_errors=True)
        raise

