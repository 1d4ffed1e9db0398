"""The soft-label store of matching/generate_soft_label.py, read by validate/train_FKD.py.

A store is a directory: `meta.json`, `images.txt` (each image's path, label and digest) and
`epoch_XXXX.safetensors` per epoch holding the plan (`d4m.fkd.EpochPlan`, stored compactly: order int32, crops
float32, which still gives back the exact pixel boxes, perm int16) and the teacher's logits of its views, encoded
by `d4m.labelcodec` (full, 8 bits per logit, or top-K).

meta.json holds the matching run's settings, the images' fingerprint (their contents) included. It is created once,
exclusively, when the run writes its first epoch, so that only a run whose inputs all loaded makes a store, and of
two runs that start together with other settings exactly one does. Every epoch file carries the identity of the run
that wrote it (a digest of meta.json's settings), checked wherever a file is read or resumed: a file of another run,
or any file once meta.json has been edited, is named instead of being trained on.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from d4m import jsonfile, labelcodec
from d4m.cli import MAX_SIDE, MIX_TYPES, UsageError
from d4m.fkd import EpochPlan
from d4m.outputs import check_settings, create_once, file_digest, write_bytes

META_NAME = "meta.json"
FORMAT = 2  # meta.json's `format`: 2 = images fingerprinted by content, epoch files marked with the run's identity
COUNT, NUMBER, TEXT = "a positive integer", "a number", "a string"
META_KEYS = {"format": COUNT, "batch_size": COUNT, "epochs": COUNT, "num_images": COUNT, "data_classes": COUNT,
             "images": TEXT, "fkd_seed": "an integer", "mix_type": TEXT, "mixup": NUMBER, "cutmix": NUMBER,
             "input_size": COUNT, "num_classes": COUNT, "teacher": "an object", "mean": "three numbers",
             "std": "three numbers", "min_scale": NUMBER, "max_scale": NUMBER, "flip": "true or false",
             "dtype": TEXT, "topk": "a positive integer or null", "int8": "true or false", "teacher_precision": TEXT}
ID_KEY = "store"  # the safetensors metadata entry of an epoch file that holds its run's identity


def _fits(value, kind: str) -> bool:
    """Whether a meta.json value is of the kind META_KEYS gives (JSON true is no integer here)."""
    integer = isinstance(value, int) and not isinstance(value, bool)
    if kind == "three numbers":
        return isinstance(value, list) and len(value) == 3 and all(_fits(v, NUMBER) for v in value)
    if kind == "a positive integer or null":
        return value is None or _fits(value, COUNT)
    return {COUNT: integer and value >= 1, "an integer": integer, NUMBER: integer or isinstance(value, float),
            TEXT: isinstance(value, str), "an object": isinstance(value, dict),
            "true or false": isinstance(value, bool)}[kind]


IMAGES_NAME = "images.txt"  # beside meta.json: one line per image (path, label, digest), to name a changed one


def image_lines(root: str | Path, samples: Sequence[tuple[str, int]]) -> list[str]:
    """Each image's relative path, label and blake2b of its bytes, in dataset order, each file read once (on up to
    8 threads: hashing runs outside the GIL)."""
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        contents = pool.map(file_digest, [path for path, _ in samples])
        return [f"{Path(path).relative_to(root).as_posix()}\t{label}\t{content}\n"
                for (path, label), content in zip(samples, contents)]


def image_fingerprint(lines: list[str]) -> str:
    """The images' fingerprint recorded in meta.json: a hash of `image_lines`."""
    digest = hashlib.blake2b(digest_size=8)
    for line in lines:
        digest.update(os.fsencode(line))
    return digest.hexdigest()


def changed_image(store: str | Path, lines: list[str]) -> str | None:
    """The first image (relative path) that differs from the store's record of its images: changed, added or
    removed. None when the store keeps no record (made before it did)."""
    try:
        recorded = (Path(store) / IMAGES_NAME).read_text(encoding="utf-8", errors="surrogateescape").splitlines(True)
    except (OSError, ValueError):
        return None
    first = next((i for i, (a, b) in enumerate(zip(recorded, lines)) if a != b), min(len(recorded), len(lines)))
    if first == len(recorded) == len(lines):
        return None
    return (lines[first] if first < len(lines) else recorded[first]).split("\t")[0]


def store_id(meta: dict) -> str:
    """The identity of a matching run, written into each of its epoch files: a digest of meta.json's settings."""
    return hashlib.blake2b(json.dumps(meta, sort_keys=True).encode(), digest_size=8).hexdigest()


def epoch_file(store: str | Path, epoch: int) -> Path:
    return Path(store) / f"epoch_{epoch:04d}.safetensors"


def read_meta(store: str | Path) -> dict:
    """meta.json of a store; one line when it is missing, not JSON, or lacks a setting."""
    path = Path(store) / META_NAME
    if not path.is_file():
        raise UsageError(f"{store} is not a soft-label store (no {META_NAME}); make one with matching/generate_soft_label.py")
    fix = f"delete the folder {store} and rerun matching/generate_soft_label.py"
    try:
        meta = jsonfile.read(path)
    except ValueError as err:  # not JSON, not UTF-8, too large or too deeply nested
        raise UsageError(f"{path} is damaged ({err}); {fix}") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{path} is damaged (not a JSON object); {fix}")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise UsageError(f"{path} lacks {', '.join(missing)} (incomplete, or made by an older version); {fix}")
    wrong = next((key for key, kind in META_KEYS.items() if not _fits(meta[key], kind)), None)
    if wrong is not None:
        raise UsageError(f"{path} is damaged ({wrong} is {meta[wrong]!r}, not {META_KEYS[wrong]}); {fix}")
    wrong = next(((key, bound) for key, bound, ok in _bounds(meta) if not ok), None)
    if wrong is not None:
        raise UsageError(f"{path} is damaged ({wrong[0]} is {meta[wrong[0]]!r}, not {wrong[1]}); {fix}")
    return meta


MAX_CLASSES = 1 << 20  # a classifier's outputs (ImageNet-21k has 21841)


def _bounds(meta: dict) -> list[tuple[str, str, bool]]:
    """(setting, its bound, whether meta.json keeps it): the values a matching run can record."""
    finite = lambda *values: all(math.isfinite(v) for v in values)  # noqa: E731
    return [
        ("num_classes", f"at most {MAX_CLASSES}", meta["num_classes"] <= MAX_CLASSES),
        ("data_classes", "at most num_classes", meta["data_classes"] <= meta["num_classes"]),
        ("num_images", "below 2**31", meta["num_images"] < 2**31),
        ("input_size", f"at most {MAX_SIDE}", meta["input_size"] <= MAX_SIDE),
        ("topk", "below num_classes", meta["topk"] is None or meta["topk"] < meta["num_classes"]),
        ("dtype", "float16 or float32", meta["dtype"] in ("float16", "float32")),
        ("mix_type", " or ".join(MIX_TYPES), meta["mix_type"] in MIX_TYPES),
        ("mixup", "a positive number", finite(meta["mixup"]) and meta["mixup"] > 0),
        ("cutmix", "a positive number", finite(meta["cutmix"]) and meta["cutmix"] > 0),
        ("min_scale", "in (0, max_scale]", finite(meta["min_scale"]) and 0 < meta["min_scale"] <= meta["max_scale"]),
        ("max_scale", "in (0, 1]", finite(meta["max_scale"]) and 0 < meta["max_scale"] <= 1),
        ("mean", "three finite numbers", finite(*meta["mean"])),
        ("std", "three positive numbers", finite(*meta["std"]) and min(meta["std"]) > 0),
    ]


def check_same_run(store: Path, meta: dict) -> None:
    check_settings(read_meta(store), meta, f"the soft-label store {store}", "use another --fkd-path or delete it")


def open_store(store: str | Path, meta: dict) -> int:
    """Check that the store is new or this run's, with no epoch file of another run; returns the first epoch to
    write (a missing or damaged one: it and those after it are written again)."""
    store = Path(store)
    if (store / META_NAME).is_file():
        check_same_run(store, meta)
    elif store.exists() and (not store.is_dir() or any(not p.name.startswith(".") for p in store.iterdir())):
        raise UsageError(f"--fkd-path {store} exists and is not a soft-label store; choose an empty or new folder")
    states = [state for state, _ in epoch_states(store, meta, meta["epochs"])]
    if "foreign" in states:
        raise UsageError(epoch_error(epoch_file(store, states.index("foreign")), "foreign"))
    return next((epoch for epoch, state in enumerate(states) if state != "ok"), meta["epochs"])


def create_meta(store: str | Path, meta: dict) -> None:
    """Write meta.json unless it exists, exclusively: of two runs that start together, one writes it and the other
    must have the same settings."""
    if not create_once(Path(store) / META_NAME, json.dumps(meta, indent=1, sort_keys=True)):
        check_same_run(Path(store), meta)


PLAN_KEYS = {"order", "crops", "flips", "perm", "lam", "box"}
EPOCH_ERRORS = {
    "missing": "is missing; rerun the matching command to complete the store",
    "damaged": "is damaged ({}); rerun the matching command, which rewrites it",
    "foreign": "does not belong to this store's meta.json (another matching run wrote it, or meta.json was edited "
               "since); delete it (or the whole store, if meta.json was edited) and rerun the matching command",
}
UNREADABLE = "truncated or not a store file"


def epoch_layout(meta: dict) -> dict[str, tuple[str, list[int]]]:
    """The safetensors dtype and shape of every tensor of an epoch file that meta.json implies (as `write_epoch`
    writes them), and so the file's size."""
    n, batch, classes = meta["num_images"], meta["batch_size"], meta["num_classes"]
    logits = "F16" if meta["dtype"] == "float16" else "F32"
    layout = {"order": ("I32", [n]), "crops": ("F32", [n, 4]), "flips": ("U8", [n]),
              "perm": ("I16" if batch <= 32767 else "I32", [n]), "lam": ("F32", [math.ceil(n / batch)]),
              "box": ("I32", [math.ceil(n / batch), 4])}
    if meta["topk"]:
        k = meta["topk"]
        packed = math.ceil(n * k * labelcodec.index_bits(classes) / 8)
        layout.update(topk_values=(logits, [n, k]), topk_indices=("U8", [packed]), rest_mean=(logits, [n]))
    elif meta["int8"]:
        layout.update(logits_q=("U8", [n, classes]), logits_min=("F32", [n]), logits_step=("F32", [n]))
    else:
        layout["logits"] = (logits, [n, classes])
    return layout


MAX_HEADER = 1 << 20  # bytes: an epoch file's header is under 2 KB
ITEM_BYTES = {"F32": 4, "F16": 2, "I32": 4, "I16": 2, "U8": 1}


def read_header(path: Path) -> tuple[int, dict] | None:
    """(length, contents) of a safetensors header, read without mapping the file (whose size may be anything);
    None when there is no readable header."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else MAX_HEADER + 1
        text = f.read(length) if length <= MAX_HEADER else b""
    try:
        header = jsonfile.loads(text.decode("utf-8")) if len(text) == length else None
    except ValueError:  # not UTF-8, not JSON, or too deeply nested
        return None
    return (length, header) if isinstance(header, dict) else None


def epoch_state(path: Path, meta: dict) -> tuple[str, str]:
    """The state of an epoch file, from its header alone, and what is wrong with a damaged one: ok; missing;
    damaged (no readable header that covers the file, or tensors of other dtypes or shapes, or a size, than
    meta.json implies: rewritten on resume); or foreign (whole, but written by a run of another meta.json)."""
    if not path.is_file():
        return "missing", ""
    read = read_header(path)
    if read is None:
        return "damaged", UNREADABLE
    length, header = read
    metadata = header.pop("__metadata__", None)
    tensors = {key: (entry.get("dtype"), entry.get("shape")) for key, entry in header.items() if isinstance(entry, dict)}
    if not (PLAN_KEYS <= tensors.keys() and any(labels <= tensors.keys() for labels in labelcodec.KEYS)):
        return "damaged", UNREADABLE
    if not isinstance(metadata, dict) or metadata.get(ID_KEY) != store_id(meta):
        return "foreign", ""
    layout = epoch_layout(meta)
    for key in sorted(layout.keys() | header.keys()):
        if tensors.get(key) != layout.get(key):
            found = "absent" if key not in header else " ".join(map(str, tensors.get(key, ("malformed",))))
            wanted = "none" if key not in layout else f"{layout[key][0]} {layout[key][1]}"
            return "damaged", f"its {key} is {found} where meta.json implies {wanted}"
    size = 8 + length + sum(ITEM_BYTES[dtype] * math.prod(shape) for dtype, shape in layout.values())
    if path.stat().st_size != size:
        return "damaged", f"it is {path.stat().st_size} bytes where meta.json implies {size}"
    try:
        safe_open(str(path), framework="pt").keys()  # the header's offsets cover the file exactly
    except (SafetensorError, OSError):
        return "damaged", UNREADABLE
    return "ok", ""


def epoch_states(store: str | Path, meta: dict, epochs: int) -> list[tuple[str, str]]:
    """The state of epochs 0 .. epochs-1 (from their headers only)."""
    return [epoch_state(epoch_file(store, epoch), meta) for epoch in range(epochs)]


def epoch_error(path: Path, state: str, why: str = "") -> str:
    return f"soft-label file {path} {EPOCH_ERRORS[state].format(why)}"


def check_epochs(store: str | Path, meta: dict, epochs: int) -> None:
    """Before training: epochs 0 .. epochs-1 of the store are there, whole, of this meta.json and of the layout it
    implies."""
    for epoch, (state, why) in enumerate(epoch_states(store, meta, epochs)):
        if state != "ok":
            raise UsageError(epoch_error(epoch_file(store, epoch), state, why))


def plan_flaw(tensors: dict[str, torch.Tensor], meta: dict, hw: torch.Tensor | None) -> str | None:
    """What makes an epoch's stored plan one that no matching run draws (None when nothing does): views of images
    that are not there, crops outside their image or of no pixel, flips other than 0 and 1, mix partners outside
    their batch, mix weights outside [0, 1], CutMix boxes outside the input size. `hw` [N,2] (the images' sizes),
    when given, checks every crop to the pixel."""
    n, batch, size = meta["num_images"], meta["batch_size"], meta["input_size"]
    order, crops, perm = tensors["order"].long(), tensors["crops"].double(), tensors["perm"].long()
    lam, box = tensors["lam"], tensors["box"].long()
    if not (bool(((order >= 0) & (order < n)).all()) and bool((torch.bincount(order, minlength=n) == 1).all())):
        return "its order is not a permutation of the images"
    top, left, height, width = crops.unbind(1)
    if not (bool(crops.isfinite().all()) and bool(((top >= 0) & (left >= 0) & (height > 0) & (width > 0)).all())
            and bool(((top + height <= 1 + 1e-6) & (left + width <= 1 + 1e-6)).all())):
        return "a crop is not a box inside its image"
    if hw is not None:
        pixels = torch.round(crops * hw[order].repeat(1, 2).double()).long()
        if not bool(((pixels[:, 2:] >= 1) & (pixels[:, :2] + pixels[:, 2:] <= hw[order])).all()):
            return "a crop is not a box of at least one pixel inside its image"
    if not bool((tensors["flips"] <= 1).all()):
        return "a flip is neither 0 nor 1"
    starts = torch.arange(n) // batch * batch
    if not (bool(((perm >= 0) & (perm < torch.clamp(starts + batch, max=n) - starts)).all())
            and bool((torch.bincount(starts + perm, minlength=n) == 1).all())):
        return "its mix partners are not a permutation within each batch"
    if not bool(((lam >= 0) & (lam <= 1)).all()):
        return "a mix weight is outside [0, 1]"
    y1, x1, y2, x2 = box.unbind(1)
    if not bool(((0 <= y1) & (y1 <= y2) & (y2 <= size) & (0 <= x1) & (x1 <= x2) & (x2 <= size)).all()):
        return f"a CutMix box is not inside the {size} px input"
    return None


def labels_flaw(tensors: dict[str, torch.Tensor], classes: int) -> str | None:
    """What makes stored soft labels unusable (None when nothing does): a logit, minimum, step or mean that is not
    finite, a step that is not positive, a top-K class index past the class count."""
    floats = [v for k, v in tensors.items() if k in ("logits", "logits_min", "logits_step", "topk_values", "rest_mean")]
    if not all(bool(v.isfinite().all()) for v in floats):
        return "a soft label is not a finite number"
    if "logits_step" in tensors and not bool((tensors["logits_step"] > 0).all()):
        return "a row's 8-bit step is not positive"
    if "topk_indices" in tensors and not bool((tensors["topk_indices"] < classes).all()):
        return "a top-K class index is past the class count"
    return None


def compact_plan(plan: EpochPlan) -> dict[str, torch.Tensor]:
    """The plan in the narrowest exact dtypes (crop fractions k/H survive float32 for any H < 2**22)."""
    tensors = plan.tensors()
    tensors["order"] = tensors["order"].int()
    tensors["crops"] = tensors["crops"].float()
    tensors["perm"] = tensors["perm"].to(torch.int16 if plan.batch_size <= 32767 else torch.int32)
    return tensors


def write_epoch(store: str | Path, epoch: int, plan: EpochPlan, logits: torch.Tensor, meta: dict) -> None:
    """One epoch file, marked with the run's identity: the plan and the logits, full, top-K (meta's `topk`) or 8-bit
    per row (meta's `int8`)."""
    tensors = {**compact_plan(plan), **labelcodec.encode(logits, meta["topk"], meta["int8"])}
    write_bytes(epoch_file(store, epoch), save({k: v.cpu().contiguous() for k, v in tensors.items()},
                                                metadata={ID_KEY: store_id(meta)}))


def read_epoch(store: str | Path, epoch: int, meta: dict,
               hw: torch.Tensor | None = None) -> tuple[EpochPlan, labelcodec.SoftLabels]:
    """The plan of an epoch and its soft labels, once its header and then its values are checked against meta.json
    (and the images' sizes `hw` [N,2], when given)."""
    path = epoch_file(store, epoch)
    state, why = epoch_state(path, meta)
    if state != "ok":
        raise UsageError(epoch_error(path, state, why))
    tensors = load_file(str(path))
    classes = meta["num_classes"]
    if "topk_indices" in tensors:
        values = tensors["topk_values"]
        tensors["topk_indices"] = labelcodec.unpack_indices(tensors["topk_indices"], *values.shape, classes)
    why = plan_flaw(tensors, meta, hw) or labels_flaw(tensors, classes)
    if why:
        raise UsageError(f"soft-label file {path} is not what a matching run writes ({why}); rerun the matching "
                         "command into a new --fkd-path")
    tensors.update(order=tensors["order"].long(), crops=tensors["crops"].double(), perm=tensors["perm"].long())
    return EpochPlan.from_tensors(tensors, meta["batch_size"]), labelcodec.decode(tensors, classes)
