"""FKD augmentation plans and their replay, shared by matching/ and validate/.

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

The soft labels stored with each epoch's plan are `d4m.store`'s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from d4m.runtime import derive_seed
from d4m.views import CropViews, PilViews, iterate_views

RATIO = (3.0 / 4.0, 4.0 / 3.0)


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


def draw_epoch(fkd_seed: int, epoch: int, hw: np.ndarray, batch_size: int, input_size: int, mix_type: str = "cutmix",
               mixup: float = 0.8, cutmix: float = 1.0, scale: tuple[float, float] = (0.08, 1.0),
               flip: bool = True) -> EpochPlan:
    """Every augmentation parameter of one epoch: the order, RandomResizedCrop boxes of `scale`, flips, and per batch
    the mix (CutMix, MixUp or "None") with its partners and Beta(alpha, alpha) weight. It depends only on its
    arguments (not on processes or workers), the same in matching and training. Without flips no view is mirrored;
    the other parameters are those of the same plan with flips."""
    rng = np.random.default_rng(derive_seed(fkd_seed, epoch))
    n = len(hw)
    order = rng.permutation(n)
    crops = draw_crops(rng, hw[order], scale)
    flips = (rng.random(n) < 0.5) & flip
    perm, lam, box = np.zeros(n, np.int64), [], []
    for b in range(math.ceil(n / batch_size)):
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


def mixed_labels(plan: EpochPlan, job: Job, labels: torch.Tensor, num_classes: int, mix_type: str,
                 input_size: int) -> torch.Tensor:
    """The one-hot class rows of the job's rows mixed as `mix_rows` mixes their views: a view's label weighted by
    the share of the input it keeps, its partner's by the rest (CutMix: the pasted box's area; MixUp: lam)."""
    start, end = plan.bounds(job.batch)
    own = labels[plan.order[start + job.rows]]
    partner = labels[plan.order[start + plan.perm[start:end][job.rows]]]
    lam = float(plan.lam[job.batch])
    if mix_type == "cutmix":
        y1, x1, y2, x2 = plan.box[job.batch].tolist()
        lam = 1.0 - (y2 - y1) * (x2 - x1) / input_size ** 2
    return lam * F.one_hot(own, num_classes).float() + (1.0 - lam) * F.one_hot(partner, num_classes).float()


def replay_batches(plan: EpochPlan, jobs: list[Job], source: PilViews | CropViews, workers: int,
                   device: torch.device, meta: dict) -> Iterator[tuple[Job, torch.Tensor]]:
    """(job, augmented normalised mixed rows on the device) for each job, in order; `meta` (a store's, or a label
    source's) gives the normalisation ("mean", "std") and the mix ("mix_type")."""
    specs = [job_spec(plan, job) for job in jobs]
    for job, views in zip(jobs, iterate_views(source, specs, workers, device)):
        yield job, mix_rows(normalize(views, meta["mean"], meta["std"]), plan, job, meta["mix_type"])
