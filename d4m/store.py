"""The soft-label store of matching/generate_soft_label.py, read by validate/train_FKD.py.

A store is a directory: `meta.json` and `epoch_XXXX.safetensors` per epoch holding the plan (`d4m.fkd.EpochPlan`,
stored compactly: order int32, crops float32, which still gives back the exact pixel boxes, perm int16) and either
full teacher logits [N,C], or 8-bit logits with a minimum and step per row (`logits_q`, `logits_min`,
`logits_step`: half the bytes of fp16, every logit within 1/510 of its row's range), or, with top-K, the K largest
logits (`topk_values`), their class indices bit-packed at ceil(log2 C) bits each (`topk_indices`, uint8; 10 bits
for 1000 classes instead of 16) and the mean of the other C-K logits (`rest_mean`). The target is rebuilt by
scattering the top-K into a row filled with that mean: the tail then keeps about the right softmax mass at any
temperature (exactly in the limit of high T, where a tail of -inf or 0 would be badly off).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from d4m.fkd import EpochPlan
from d4m.outputs import atomic_path
from d4m.runtime import UsageError

META_NAME = "meta.json"


def topk_compress(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """K largest logits per row, their indices (int16 when the class count allows) and the mean of the rest."""
    classes = logits.shape[1]
    values, indices = logits.float().topk(k, dim=1)
    rest = (logits.float().sum(1) - values.sum(1)) / (classes - k)
    index_dtype = torch.int16 if classes <= 32767 else torch.int32
    return {"topk_values": values.to(logits.dtype), "topk_indices": indices.to(index_dtype),
            "rest_mean": rest.to(logits.dtype)}


def topk_rebuild(values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor, classes: int) -> torch.Tensor:
    """Full fp32 rows: the top-K scattered into a row filled with the mean of the other logits."""
    full = rest.float()[:, None].expand(len(rest), classes).clone()
    return full.scatter_(1, indices.long(), values.float())


def keep_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Apply the top-K rebuild to full logits; unchanged when K >= the class count."""
    if k >= logits.shape[1]:
        return logits
    parts = topk_compress(logits, k)
    return topk_rebuild(parts["topk_values"], parts["topk_indices"], parts["rest_mean"], logits.shape[1])


def image_fingerprint(root: str | Path, samples: Sequence[tuple[str, int]]) -> str:
    """A hash of the image list: relative paths, labels and file sizes, in dataset order."""
    digest = hashlib.sha256()
    for path, label in samples:
        digest.update(f"{Path(path).relative_to(root).as_posix()}\t{label}\t{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()[:16]


def epoch_file(store: str | Path, epoch: int) -> Path:
    return Path(store) / f"epoch_{epoch:04d}.safetensors"


def read_meta(store: str | Path) -> dict:
    path = Path(store) / META_NAME
    if not path.is_file():
        raise UsageError(f"{store} is not a soft-label store (no {META_NAME}); make one with matching/generate_soft_label.py")
    return json.loads(path.read_text())


def open_store(store: str | Path, meta: dict, create: bool = True) -> int:
    """Check that the store is new or belongs to this run (and create it when asked); returns the first epoch to write."""
    store = Path(store)
    if (store / META_NAME).is_file():
        old = read_meta(store)
        diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        if diff:
            details = ", ".join(f"{k}: stored {old.get(k)!r} vs now {meta.get(k)!r}" for k in diff)
            raise UsageError(f"the soft-label store {store} was made by a different run ({details}); "
                             "use another --fkd-path or delete it")
    elif store.exists() and (not store.is_dir() or any(not p.name.startswith(".") for p in store.iterdir())):
        raise UsageError(f"--fkd-path {store} exists and is not a soft-label store; choose an empty or new folder")
    elif create:
        with atomic_path(store / META_NAME) as tmp:
            tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    epoch = 0
    while epoch < meta["epochs"] and epoch_complete(epoch_file(store, epoch)):
        epoch += 1
    return epoch


PLAN_KEYS = {"order", "crops", "flips", "perm", "lam", "box"}
LABEL_KEYS = ({"logits"}, {"topk_values", "topk_indices", "rest_mean"}, {"logits_q", "logits_min", "logits_step"})


def epoch_complete(path: Path) -> bool:
    """Whether an epoch file is whole: a readable header that covers the file, with a plan and soft labels (a
    damaged one is rewritten on resume)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except (SafetensorError, OSError):
        return False
    return PLAN_KEYS <= keys and any(labels <= keys for labels in LABEL_KEYS)


def index_bits(classes: int) -> int:
    return max(1, math.ceil(math.log2(classes)))


def pack_indices(indices: torch.Tensor, classes: int) -> torch.Tensor:
    """Class indices [N,K] -> uint8 bytes holding ceil(log2 C) bits per index."""
    bits = index_bits(classes)
    values = indices.long().cpu().numpy()[..., None] >> np.arange(bits)
    return torch.from_numpy(np.packbits((values & 1).astype(np.uint8).ravel()))


def unpack_indices(packed: torch.Tensor, rows: int, k: int, classes: int) -> torch.Tensor:
    bits = index_bits(classes)
    flat = np.unpackbits(packed.numpy(), count=rows * k * bits).reshape(rows, k, bits).astype(np.int64)
    return torch.from_numpy((flat << np.arange(bits)).sum(-1))


def compact_plan(plan: EpochPlan) -> dict[str, torch.Tensor]:
    """The plan in the narrowest exact dtypes (crop fractions k/H survive float32 for any H < 2**22)."""
    tensors = plan.tensors()
    tensors["order"] = tensors["order"].int()
    tensors["crops"] = tensors["crops"].float()
    tensors["perm"] = tensors["perm"].to(torch.int16 if plan.batch_size <= 32767 else torch.int32)
    return tensors


def quantize_rows(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each row as 8-bit steps between its own minimum and maximum: `logits_q` uint8 [N,C], `logits_min` and
    `logits_step` float32 [N]. A logit comes back within half a step, 1/510 of its row's range."""
    rows = logits.float()
    low, high = rows.min(1).values, rows.max(1).values
    step = torch.where(high > low, (high - low) / 255, torch.ones_like(low))
    q = ((rows - low[:, None]) / step[:, None]).round_().clamp_(0, 255).to(torch.uint8)
    return {"logits_q": q, "logits_min": low, "logits_step": step}


def dequantize_rows(q: torch.Tensor, low: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return low.float()[:, None] + q.float() * step.float()[:, None]


def write_epoch(store: str | Path, epoch: int, plan: EpochPlan, logits: torch.Tensor, topk: Optional[int],
                int8: bool = False) -> None:
    """One epoch file: the plan and the logits, full, top-K (`topk`) or 8-bit per row (`int8`)."""
    tensors = compact_plan(plan)
    if topk:
        parts = topk_compress(logits, topk)
        parts["topk_indices"] = pack_indices(parts["topk_indices"], logits.shape[1])
        tensors.update(parts)
    elif int8:
        tensors.update(quantize_rows(logits))
    else:
        tensors["logits"] = logits
    with atomic_path(epoch_file(store, epoch)) as tmp:
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(tmp))


@dataclass
class SoftLabels:
    """An epoch's soft labels kept as stored (full logits, or the top-K parts), turned into full float32 rows on
    the device a batch at a time: host memory stays at the store's size, device memory at a batch's."""
    tensors: dict[str, torch.Tensor]
    classes: int

    def pin(self) -> "SoftLabels":
        return SoftLabels({k: v.pin_memory() for k, v in self.tensors.items()}, self.classes)

    def rows(self, start: int, end: int, device: torch.device | str = "cpu") -> torch.Tensor:
        part = {k: v[start:end].to(device, non_blocking=True) for k, v in self.tensors.items()}
        if "logits" in part:
            return part["logits"].float()
        if "logits_q" in part:
            return dequantize_rows(part["logits_q"], part["logits_min"], part["logits_step"])
        return topk_rebuild(part["topk_values"], part["topk_indices"], part["rest_mean"], self.classes)


def read_epoch(store: str | Path, epoch: int, meta: dict) -> tuple[EpochPlan, SoftLabels]:
    """The plan of an epoch and its soft labels."""
    path = epoch_file(store, epoch)
    if not path.is_file():
        raise UsageError(f"soft-label file {path} is missing; rerun matching to complete the store")
    if not epoch_complete(path):
        raise UsageError(f"soft-label file {path} is damaged (truncated or not a store file); rerun the matching "
                         "command, which rewrites it")
    tensors = load_file(str(path))
    tensors.update(order=tensors["order"].long(), crops=tensors["crops"].double(), perm=tensors["perm"].long())
    plan = EpochPlan.from_tensors(tensors, meta["batch_size"])
    classes = meta["num_classes"]
    if "logits" in tensors:
        return plan, SoftLabels({"logits": tensors["logits"]}, classes)
    if "logits_q" in tensors:
        return plan, SoftLabels({k: tensors[k] for k in ("logits_q", "logits_min", "logits_step")}, classes)
    values = tensors["topk_values"]
    indices = unpack_indices(tensors["topk_indices"], values.shape[0], values.shape[1], classes)
    parts = {"topk_values": values, "topk_indices": indices.to(torch.int16 if classes <= 32767 else torch.int32),
             "rest_mean": tensors["rest_mean"]}
    return plan, SoftLabels(parts, classes)
