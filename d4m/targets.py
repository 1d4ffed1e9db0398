"""Where a student's targets come from, one interface for validate/train_FKD.py's three protocols:

  fkd     StoredLabels: each epoch's plan and the teacher's logits as matching stored them;
  online  TeacherLabels: the plan drawn here, a teacher labelling exactly the mixed views the student sees;
  hard    HardLabels: the plan drawn here, the one-hot class labels mixed as the views are.

Each has `meta` (class count, normalisation, mix), `plan_seed`, `kind` ("logits" for a KL at temperature T,
"probabilities" for a soft cross-entropy), `epoch(e)`, which returns epoch e's plan, and `targets(job, first, last,
x)`, the targets of rows first..last of the job's batch, whose views are `x`.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from d4m import fkd, store
from d4m.cli import UsageError
from d4m.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset
from d4m.device import autocast
from d4m.models import load_teacher, load_teacher_file
from d4m.runtime import from_rank0


def check_store(args: argparse.Namespace, meta: dict, data: ImageFolderDataset, lines: list[str]) -> None:
    """Everything that must agree between this run and the matching run, with the fix in the message."""
    images = store.image_fingerprint(lines)
    changed = store.changed_image(args.fkd_path, lines) if images != meta["images"] else None
    checks = [
        (args.batch_size == meta["batch_size"], f"--batch-size {args.batch_size} differs from the store's {meta['batch_size']}"),
        (args.epochs <= meta["epochs"], f"--epochs {args.epochs} exceeds the {meta['epochs']} epochs stored"),
        (args.input_size == meta["input_size"], f"--input-size {args.input_size} differs from the store's {meta['input_size']}"),
        (len(data.samples) == meta["num_images"], f"{args.train_dir} has {len(data.samples)} images, the store {meta['num_images']}"),
        (len(data.classes) == meta["data_classes"], f"{args.train_dir} has {len(data.classes)} classes, the store {meta['data_classes']}"),
        (args.mix_type in (None, meta["mix_type"]), f"--mix-type {args.mix_type} differs from the store's {meta['mix_type']}"),
        (args.fkd_seed in (None, meta["fkd_seed"]), f"--fkd_seed {args.fkd_seed} differs from the store's {meta['fkd_seed']}"),
        (images == meta["images"], f"{args.train_dir}/{changed} is not the image the store was made from (changed, "
                                   "added or removed since)" if changed else
                                   f"the images in {args.train_dir} are not the ones the store was made from"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(f"{message}; use the settings and images of the matching run (see {args.fkd_path}/meta.json)")


class StoredLabels:
    """Protocol fkd: each epoch's plan and teacher logits as matching stored them (only the K largest with
    --keep-topk K)."""

    kind = "logits"

    def __init__(self, args: argparse.Namespace, data: ImageFolderDataset, hw, device: torch.device, rank: int,
                 world: int):
        self.meta = store.read_meta(args.fkd_path)
        lines = from_rank0(store.image_lines(args.train_dir, data.samples) if rank == 0 else None, world)
        check_store(args, self.meta, data, lines)
        store.check_epochs(args.fkd_path, self.meta, args.epochs)
        self.path, self.keep, self.device, self.hw = args.fkd_path, args.keep_topk, device, torch.from_numpy(hw)
        self.plan_seed = self.meta["fkd_seed"]

    def epoch(self, epoch: int) -> fkd.EpochPlan:
        self.plan, soft = store.read_epoch(self.path, epoch, self.meta, self.hw)
        self.soft = soft.pin() if self.device.type == "cuda" else soft
        return self.plan

    def targets(self, job: fkd.Job, first: int, last: int, x: torch.Tensor) -> torch.Tensor:
        start = self.plan.bounds(job.batch)[0]
        return store.keep_topk(self.soft.rows(start + first, start + last, self.device), self.keep)


class DrawnPlans:
    """Protocols online and hard: every epoch's plan drawn here, as matching draws it, from `plan_seed`."""

    def __init__(self, args: argparse.Namespace, hw, meta: dict, device: torch.device):
        self.args, self.hw, self.meta, self.device = args, hw, meta, device
        self.plan_seed = 42 if args.fkd_seed is None else args.fkd_seed

    def epoch(self, epoch: int) -> fkd.EpochPlan:
        self.plan = fkd.draw_epoch(self.plan_seed, epoch, self.hw, fkd.Recipe.of(self.args, self.meta["mix_type"]))
        return self.plan


class TeacherLabels(DrawnPlans):
    """Protocol online: the teacher's logits for exactly the mixed views the student sees, batch by batch."""

    kind = "logits"

    def __init__(self, args: argparse.Namespace, data: ImageFolderDataset, hw, device: torch.device,
                 amp: torch.dtype | None):
        teacher, record = load_teacher(args.teacher_path, args.teacher_arch, len(data.classes), args.input_size, device,
                                       f"{args.train_dir} has {len(data.classes)}")
        super().__init__(args, hw, {"mean": record["mean"], "std": record["std"], "num_classes": record["num_classes"],
                                    "mix_type": args.mix_type or "cutmix"}, device)
        self.teacher, self.amp = teacher, amp

    @torch.no_grad()
    def targets(self, job: fkd.Job, first: int, last: int, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp):
            return self.teacher(x).float()


class HardLabels(DrawnPlans):
    """Protocol hard: each view's class label as a one-hot row, mixed with its partner's by the area (CutMix) or
    weight (MixUp) of the mix."""

    kind = "probabilities"

    def __init__(self, args: argparse.Namespace, data: ImageFolderDataset, hw, device: torch.device):
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if args.teacher_path:  # to normalise as the soft-label runs do
            _, record = load_teacher_file(args.teacher_path)
            mean, std = record["mean"], record["std"]
        super().__init__(args, hw, {"mean": list(mean), "std": list(std), "num_classes": len(data.classes),
                                    "mix_type": args.mix_type or "cutmix"}, device)
        self.labels = torch.tensor(data.targets)

    def targets(self, job: fkd.Job, first: int, last: int, x: torch.Tensor | None) -> torch.Tensor:
        plan = self.plan
        start, end = plan.bounds(job.batch)
        rows = torch.arange(first, last)
        own = self.labels[plan.order[start + rows]]
        partner = self.labels[plan.order[start + plan.perm[start:end][rows]]]
        lam = float(plan.lam[job.batch])
        if self.meta["mix_type"] == "cutmix":
            y1, x1, y2, x2 = plan.box[job.batch].tolist()
            lam = 1.0 - (y2 - y1) * (x2 - x1) / self.args.input_size ** 2
        classes = self.meta["num_classes"]
        target = lam * F.one_hot(own, classes).float() + (1.0 - lam) * F.one_hot(partner, classes).float()
        return target.to(self.device, non_blocking=True)


def build_targets(args: argparse.Namespace, data: ImageFolderDataset, hw, device: torch.device,
                  amp: torch.dtype | None, rank: int, world: int) -> StoredLabels | TeacherLabels | HardLabels:
    """The label source of --protocol."""
    if args.protocol == "fkd":
        return StoredLabels(args, data, hw, device, rank, world)
    if args.protocol == "online":
        return TeacherLabels(args, data, hw, device, amp)
    return HardLabels(args, data, hw, device)
