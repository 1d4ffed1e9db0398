"""FKD augmentation replay and the soft-label store, shared by matching/ and validate/.

An epoch's augmentation is an `EpochPlan`, drawn from a numpy generator seeded by (fkd_seed, epoch):
  order  [N]    int64    the image visited at each position of the epoch
  crops  [N,4]  float64  RandomResizedCrop box of each position: top/H, left/W, height/H, width/W
  flips  [N]    uint8    horizontal flip of each position
  perm   [N]    int64    per batch, the in-batch mix partner of each position (batch-local index)
  lam    [nb]   float32  per batch, lam ~ Beta(alpha, alpha) (1 when no mix)
  box    [nb,4] int32    per batch, the CutMix box y1, x1, y2, x2 in pixels of the input size
Batch b covers positions [b*batch_size, min((b+1)*batch_size, N)).

A job is the part of a batch one process materialises; `d4m.views` turns its crop boxes and flips into pixels
(the PIL reference or the host cache resized on the device: the same parameters, the same filter), and
normalisation and mixing are then applied batched on the device, identically for both.

Soft-label store (a directory): `meta.json` and `epoch_XXXX.safetensors` per epoch holding the plan (stored
compactly: order int32, crops float32, which still gives back the exact pixel boxes, perm int16) and either
full teacher logits [N,C], or 8-bit logits with a minimum and step per row (`logits_q`, `logits_min`,
`logits_step`: half the bytes of fp16, every logit within 1/510 of its row's range), or, with top-K, the K largest logits (`topk_values`), their class indices bit-packed
at ceil(log2 C) bits each (`topk_indices`, uint8; 10 bits for 1000 classes instead of 16) and the mean of
the other C-K logits (`rest_mean`). The target is
rebuilt by scattering the top-K into a row filled with that mean: the tail then keeps about the right
softmax mass at any temperature (exactly in the limit of high T, where a tail of -inf or 0 would be badly off).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from d4m.outputs import atomic_path
from d4m.runtime import UsageError, derive_seed
from d4m.views import CropViews, PilViews, iterate_views

RATIO = (3.0 / 4.0, 4.0 / 3.0)
MIX_TYPES = ("mixup", "cutmix", "None")
META_NAME = "meta.json"


# ----------------------------------------------------------------------------- plans


@dataclass
class EpochPlan:
    order: torch.Tensor
    crops: torch.Tensor
    flips: torch.Tensor
    perm: torch.Tensor
    lam: torch.Tensor
    box: torch.Tensor
    batch_size: int

    @property
    def num_images(self) -> int:
        return int(self.order.numel())

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def bounds(self, b: int) -> tuple[int, int]:
        start = b * self.batch_size
        return start, min(start + self.batch_size, self.num_images)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).contiguous() for name in ("order", "crops", "flips", "perm", "lam", "box")}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], batch_size: int) -> "EpochPlan":
        return cls(*(tensors[name] for name in ("order", "crops", "flips", "perm", "lam", "box")), batch_size=batch_size)


def num_batches(num_images: int, batch_size: int) -> int:
    return math.ceil(num_images / batch_size)


def draw_crops(rng: np.random.Generator, hw: np.ndarray, scale: tuple[float, float], attempts: int = 10) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params, vectorised: [N,4] fractions top/H, left/W, h/H, w/W."""
    n = len(hw)
    height, width = hw[:, 0].astype(np.float64), hw[:, 1].astype(np.float64)
    target = (height * width)[:, None] * rng.uniform(scale[0], scale[1], (n, attempts))
    aspect = np.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1]), (n, attempts)))
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = ok.argmax(1)
    found = ok.any(1)
    rows = np.arange(n)
    h_sel, w_sel = h[rows, first], w[rows, first]
    # Fallback of torchvision: a centre crop of the whole image with the ratio clamped.
    in_ratio = width / height
    fb_w = np.where(in_ratio < RATIO[0], width, np.where(in_ratio > RATIO[1], np.round(height * RATIO[1]), width))
    fb_h = np.where(in_ratio < RATIO[0], np.round(width / RATIO[0]), height)
    h_sel, w_sel = np.where(found, h_sel, fb_h), np.where(found, w_sel, fb_w)
    u = rng.random((n, 2))
    top = np.where(found, np.floor(u[:, 0] * (height - h_sel + 1)), (height - h_sel) // 2)
    left = np.where(found, np.floor(u[:, 1] * (width - w_sel + 1)), (width - w_sel) // 2)
    return np.stack([top / height, left / width, h_sel / height, w_sel / width], 1)


def cutmix_box(rng: np.random.Generator, lam: float, size: int) -> list[int]:
    """A square box of side sqrt(1-lam)*size around a uniform centre, clipped: y1, x1, y2, x2 in pixels."""
    cut = int(size * math.sqrt(1.0 - lam))
    cy, cx = int(rng.integers(size)), int(rng.integers(size))
    y1, y2 = np.clip([cy - cut // 2, cy + cut // 2], 0, size)
    x1, x2 = np.clip([cx - cut // 2, cx + cut // 2], 0, size)
    return [int(y1), int(x1), int(y2), int(x2)]


def draw_epoch(fkd_seed: int, epoch: int, hw: np.ndarray, batch_size: int, input_size: int, mix_type: str,
               mixup: float, cutmix: float, scale: tuple[float, float], flip: bool = True) -> EpochPlan:
    """Every augmentation parameter of one epoch; depends only on its arguments (not on processes or workers).
    Without `flip` no view is mirrored; the other parameters are those of the same plan with flips."""
    rng = np.random.default_rng(derive_seed(fkd_seed, epoch))
    n = len(hw)
    order = rng.permutation(n)
    crops = draw_crops(rng, hw[order], scale)
    flips = (rng.random(n) < 0.5) & flip
    perm, lam, box = np.zeros(n, np.int64), [], []
    for b in range(num_batches(n, batch_size)):
        start, end = b * batch_size, min((b + 1) * batch_size, n)
        if mix_type == "None":
            perm[start:end], lam_b, box_b = np.arange(end - start), 1.0, [0, 0, 0, 0]
        else:
            perm[start:end] = rng.permutation(end - start)
            lam_b = float(rng.beta(cutmix, cutmix) if mix_type == "cutmix" else rng.beta(mixup, mixup))
            box_b = cutmix_box(rng, lam_b, input_size) if mix_type == "cutmix" else [0, 0, 0, 0]
        lam.append(lam_b)
        box.append(box_b)
    return EpochPlan(torch.from_numpy(order).long(), torch.from_numpy(crops), torch.from_numpy(flips.astype(np.uint8)),
                     torch.from_numpy(perm), torch.tensor(lam, dtype=torch.float32),
                     torch.tensor(box, dtype=torch.int32).reshape(-1, 4), batch_size)


# ----------------------------------------------------------------------------- jobs and their views


@dataclass
class Job:
    """Positions of one batch to materialise: `views` (batch-local, sorted) are loaded, `rows` are returned mixed."""
    batch: int
    views: torch.Tensor
    rows: torch.Tensor


def make_job(plan: EpochPlan, b: int, rows: Optional[torch.Tensor] = None) -> Job:
    """A job for rows of batch b (all rows by default): loads those rows and their mix partners."""
    start, end = plan.bounds(b)
    rows = torch.arange(end - start) if rows is None else rows
    views = torch.unique(torch.cat([rows, plan.perm[start:end][rows]]))
    return Job(b, views, rows)


def job_spec(plan: EpochPlan, job: Job) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image indices, crop fractions and flips of a job's views."""
    positions = plan.bounds(job.batch)[0] + job.views
    return plan.order[positions], plan.crops[positions], plan.flips[positions]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype)[:, None, None]
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype)[:, None, None]
    return (x - mean_t) / std_t


def mix_rows(views: torch.Tensor, plan: EpochPlan, job: Job, mix_type: str) -> torch.Tensor:
    """The job's rows after mixing with their partners (views are the job's loaded, normalised positions)."""
    slot = lambda positions: torch.searchsorted(job.views, positions).to(views.device)  # noqa: E731
    start, end = plan.bounds(job.batch)
    own = views[slot(job.rows)]
    if mix_type == "None":
        return own
    partner = views[slot(plan.perm[start:end][job.rows])]
    if mix_type == "mixup":
        lam = float(plan.lam[job.batch])
        return lam * own + (1.0 - lam) * partner
    y1, x1, y2, x2 = plan.box[job.batch].tolist()
    own[:, :, y1:y2, x1:x2] = partner[:, :, y1:y2, x1:x2]  # `own` is already a copy (advanced indexing)
    return own


def replay_batches(plan: EpochPlan, jobs: list[Job], source: PilViews | CropViews, workers: int,
                   device: torch.device, mean: Sequence[float], std: Sequence[float],
                   mix_type: str) -> Iterator[tuple[Job, torch.Tensor]]:
    """(job, augmented normalised mixed rows on the device) for each job, in order."""
    specs = [job_spec(plan, job) for job in jobs]
    for job, views in zip(jobs, iterate_views(source, specs, workers, device)):
        yield job, mix_rows(normalize(views, mean, std), plan, job, mix_type)


# ----------------------------------------------------------------------------- soft labels


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
        digest.update(os.fsencode(f"{Path(path).relative_to(root).as_posix()}\t{label}\t{os.path.getsize(path)}\n"))
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
