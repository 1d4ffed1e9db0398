"""Train a student from scratch on the synthetic set and validate it on the real set, under one of three protocols:

  fkd     (the original's): replay the augmentations and soft labels stored by matching/generate_soft_label.py;
  online  (RDED's and Minimax's): draw the augmentations here and let a teacher label every batch as it is made;
  hard    no teacher: cross-entropy on the folders' class labels, mixed as the images are (CutMix/MixUp).
All three replay the same kind of plan (crop box, flip, mix per view, drawn per epoch from --fkd_seed), so they
differ only in the targets. --seeds N trains N students (seeds seed .. seed+N-1) and summarises their final-epoch
top-1 as mean and standard deviation.

Data parallel under torchrun with DistributedDataParallel: the global batch is --batch-size; it is cut into
max(A, world) contiguous pieces (A = --gradient-accumulation-steps), each process forwards its own pieces (one
pass per piece) and loads only those rows and their mix partners, and DDP averages the gradients in buckets
while the last piece's backward runs. Each piece's loss is its KL sum divided by the global batch length (times
the world size, which DDP's average divides out), so the update equals the one-process update of
KLDiv(batchmean) over the batch. A must be a multiple of the world size or the world size a multiple of A; when
A >= world every forward pass sees exactly the rows of one one-process accumulation chunk, so BatchNorm batch
statistics match too. Validation is split over the processes and their counts summed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

from d4m.cli import (AMP_CHOICES, ArgumentParser, DATASETS, LOADERS, MIX_TYPES, PROTOCOLS, UsageError, add_device_args,
                     check_crop_scales, cli, first_line, non_negative_float, non_negative_int, positive_float,
                     positive_int, seed_int)

SCHEDULES = ("linear", "cosine", "half-cosine")
# How a run is carried out rather than what it trains, so these may differ on --resume: another batch split,
# precision or kernel changes the last bits of the weights, --eval-interval which epochs are validated, --seeds how
# many students there are.
MAY_CHANGE = frozenset({"workers", "device", "deterministic", "dist_timeout", "amp", "compile", "loader", "sync_bn",
                        "gradient_accumulation_steps", "eval_interval", "seeds", "wandb", "wandb_project",
                        "wandb_api_key"})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description="Train a student on the synthetic set and validate on the real set.")
    p.add_argument("--batch-size", type=positive_int, default=1024)
    p.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    p.add_argument("--start-epoch", type=non_negative_int, default=0)
    p.add_argument("--epochs", type=positive_int, default=300)
    p.add_argument("-j", "--workers", type=non_negative_int, default=4)
    p.add_argument("--train-dir", "--train_dir", required=True, help="the synthetic ImageFolder used for matching")
    p.add_argument("--val-dir", "--val_dir", default=None, help="real validation ImageFolder (with --dataset imagefolder)")
    p.add_argument("--dataset", default="imagefolder", choices=DATASETS)
    p.add_argument("--data-dir", "--data_dir", default=None, help="the dataset's folder for its validation split")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--cos", action="store_true", help="cosine schedule (= --lr-schedule cosine)")
    p.add_argument("--lr-schedule", default=None, choices=SCHEDULES,
                   help="per-epoch factor: linear 1-e/E (default), cosine 0.5(1+cos(pi e/E)), half-cosine "
                        "0.5(1+cos(pi e/2E)) (RDED's, which ends at half the rate)")
    p.add_argument("--sgd", action="store_true", help="SGD (else AdamW)")
    p.add_argument("-lr", "--learning-rate", type=positive_float, default=1.024)
    p.add_argument("--momentum", type=non_negative_float, default=0.875)
    p.add_argument("--weight-decay", type=non_negative_float, default=3e-5)
    p.add_argument("--adamw-lr", type=positive_float, default=0.001)
    p.add_argument("--adamw-weight-decay", type=non_negative_float, default=0.01)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--keep-topk", type=positive_int, default=1000)
    p.add_argument("-T", "--temperature", type=positive_float, default=3.0)
    p.add_argument("--protocol", default="fkd", choices=PROTOCOLS,
                   help="fkd: stored soft labels (needs --fkd-path); online: a teacher labels every batch (needs "
                        "--teacher-path or --teacher-arch); hard: cross-entropy on the class labels")
    p.add_argument("--fkd-path", default=None, help="the soft-label store (protocol fkd)")
    p.add_argument("--teacher-path", default=None, help="teacher file of matching/train_teacher.py (protocol online)")
    p.add_argument("--teacher-arch", default=None,
                   help="a torchvision model with its default ImageNet weights as the teacher (protocol online)")
    p.add_argument("--mixup", type=positive_float, default=0.8, help="MixUp's Beta parameter (protocols online, hard)")
    p.add_argument("--cutmix", type=positive_float, default=1.0, help="CutMix's Beta parameter (protocols online, hard)")
    p.add_argument("--min-scale-crops", type=float, default=0.08, help="(protocols online, hard)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips (protocols online, hard)")
    p.add_argument("--max-scale-crops", type=float, default=1.0, help="(protocols online, hard)")
    p.add_argument("--seeds", type=positive_int, default=1,
                   help="train this many students, seeds --seed .. --seed+N-1 (online and hard also shift --fkd_seed), "
                        "each in OUTPUT_DIR/seed<k> when N > 1, and report mean and std of their final top-1")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases")
    p.add_argument("--wandb-project", default="d4m")
    p.add_argument("--wandb-api-key", default=None)
    p.add_argument("--mix-type", default=None, choices=MIX_TYPES,
                   help="default: the store's (fkd), else cutmix")
    p.add_argument("--fkd_seed", type=seed_int, default=None, help="default: the store's (fkd), else 42")
    p.add_argument("--input-size", type=positive_int, default=224)
    p.add_argument("--eval-interval", type=positive_int, default=50)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue the run OUTPUT_DIR holds (or the one CKPT was written by) with the settings it "
                        f"was started with; only {', '.join(sorted(flag(k) for k in MAY_CHANGE))} may differ")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUTPUT_DIR that holds a run, discarding its checkpoint, best model, "
                        "metrics and results")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the student's initialisation")
    p.add_argument("--loader", default="tensor", choices=LOADERS,
                   help="tensor: decode once into host memory, crop and resize on the device; pil: the original's "
                        "per-image PIL path")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="the student's autocast on CUDA (auto: bf16); off keeps float32. The CPU always runs float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the student")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, BatchNorm statistics over the pieces of all processes (SyncBatchNorm, CUDA)")
    add_device_args(p)
    args = p.parse_args(argv)
    if args.protocol == "fkd" and not args.fkd_path:
        raise UsageError("--protocol fkd needs --fkd-path (the store of matching/generate_soft_label.py)")
    if args.protocol == "online" and not (args.teacher_path or args.teacher_arch):
        raise UsageError("--protocol online needs --teacher-path or --teacher-arch")
    check_crop_scales(args)
    if args.resume is not None and args.overwrite:
        raise UsageError("--resume continues the run in the output folder and --overwrite discards it; choose one")
    if args.resume and args.seeds > 1:
        raise UsageError(f"--resume {args.resume} names one student's checkpoint; with --seeds {args.seeds} give "
                         "--resume alone (each student continues from its own folder)")
    args.lr_schedule = args.lr_schedule or ("cosine" if args.cos else "linear")
    return args


def flag(key: str) -> str:
    """The command-line flag of a setting, for messages."""
    return {"fkd_seed": "--fkd_seed", "workers": "-j", "num_classes": "the class count"}.get(
        key, "--" + key.replace("_", "-"))


if __name__ == "__main__":  # --help, and a bad flag, answered before torch loads (which takes seconds)
    cli(parse_args)(None)

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from d4m import fkd, labelcheck, store, views
from d4m.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, read_class_list, val_dataset
from d4m.device import (amp_dtype, announce, autocast, maybe_compile, memory_format, pick_device, precision_name,
                        set_deterministic)
from d4m.models import build_model, check_input_size, load_pretrained, load_teacher_file
from d4m.outputs import atomic_path, check_writable, differing_keys, exclusive_run
from d4m.runtime import from_rank0, init_distributed, progress_off, together

CHECKPOINT = "checkpoint.pth.tar"
RUN_FILES = (CHECKPOINT, "model_best.pth.tar", "metrics.jsonl", "results.json")

# Not settings of a student: where it is written, how this invocation starts, and --cos (kept as --lr-schedule).
NOT_SETTINGS = frozenset({"output_dir", "resume", "overwrite", "start_epoch", "cos"})
PATH_SETTINGS = ("train_dir", "val_dir", "data_dir", "fkd_path", "teacher_path")


def check_store(args: argparse.Namespace, meta: dict, data: ImageFolderDataset, images: str) -> None:
    """Everything that must agree between this run and the matching run, with the fix in the message."""
    checks = [
        (args.batch_size == meta["batch_size"], f"--batch-size {args.batch_size} differs from the store's {meta['batch_size']}"),
        (args.epochs <= meta["epochs"], f"--epochs {args.epochs} exceeds the {meta['epochs']} epochs stored"),
        (args.input_size == meta["input_size"], f"--input-size {args.input_size} differs from the store's {meta['input_size']}"),
        (len(data.samples) == meta["num_images"], f"{args.train_dir} has {len(data.samples)} images, the store {meta['num_images']}"),
        (len(data.classes) == meta["data_classes"], f"{args.train_dir} has {len(data.classes)} classes, the store {meta['data_classes']}"),
        (args.mix_type in (None, meta["mix_type"]), f"--mix-type {args.mix_type} differs from the store's {meta['mix_type']}"),
        (args.fkd_seed in (None, meta["fkd_seed"]), f"--fkd_seed {args.fkd_seed} differs from the store's {meta['fkd_seed']}"),
        (images == meta["images"],
         f"the images in {args.train_dir} are not the ones the store was made from"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(f"{message}; use the settings and images of the matching run (see {args.fkd_path}/meta.json)")


def build_val(args: argparse.Namespace, meta: dict, rank: int, world: int, device: torch.device) -> DataLoader:
    """This process's share of the real validation set (every world-th image)."""
    transform = labelcheck.eval_transform(args.input_size, meta["mean"], meta["std"])
    if args.dataset == "imagefolder" and args.val_dir:
        data = ImageFolderDataset(args.val_dir, transform)
    elif args.dataset == "imagefolder" and not args.data_dir:
        raise UsageError("--dataset imagefolder needs --val-dir (the real validation ImageFolder) or --data-dir "
                         "(the folder holding val/)")
    else:
        data = val_dataset(args.dataset, args.data_dir, transform)
    if len(data.classes) > meta["num_classes"]:
        raise UsageError(f"the validation set has {len(data.classes)} classes but the student {meta['num_classes']}")
    made_from = read_class_list(args.train_dir)
    if made_from is not None and [str(row["name"]) for row in made_from] != [str(c) for c in data.classes]:
        names = [str(row["name"]) for row in made_from]
        first = next((i for i, (a, b) in enumerate(zip(names, data.classes)) if a != str(b)), min(len(names),
                                                                                               len(data.classes)))
        raise UsageError(f"the validation split's classes are not those {args.train_dir} was made from (class "
                         f"{first}: {names[first] if first < len(names) else 'none'!r} there, "
                         f"{str(data.classes[first]) if first < len(data.classes) else 'none'!r} here); validate on "
                         "the same dataset")
    return DataLoader(Subset(data, range(rank, len(data), world)), batch_size=256, shuffle=False,
                      num_workers=args.workers, pin_memory=device.type == "cuda")


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]
    others = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.ndim > 1)]
    if args.sgd:
        groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": others, "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=args.learning_rate, momentum=args.momentum)
    groups = [{"params": decay, "weight_decay": args.adamw_weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.adamw_lr)


def lr_factor(schedule: str, epochs: int):
    if schedule == "cosine":
        return lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs))
    if schedule == "half-cosine":
        return lambda e: 0.5 * (1 + math.cos(math.pi * e / (2 * epochs)))
    return lambda e: 1 - e / epochs


def pieces(length: int, accumulation: int, rank: int, world: int) -> list[tuple[int, int]]:
    """This process's forward passes over a batch of `length` rows: (start, end) in batch-local rows."""
    count = max(accumulation, world)
    edges = [p * (length // count) + min(p, length % count) for p in range(count + 1)]
    per_rank = count // world
    return [(edges[p], edges[p + 1]) for p in range(rank * per_rank, (rank + 1) * per_rank)]


def kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1), reduction="sum")


def soft_cross_entropy_sum(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(student, 1)).sum()


class StoredLabels:
    """Protocol fkd: each epoch's plan and teacher logits as matching stored them."""

    kind = "logits"

    def __init__(self, args: argparse.Namespace, data: ImageFolderDataset, rank: int, world: int):
        self.meta = store.read_meta(args.fkd_path)
        images = from_rank0(store.image_fingerprint(args.train_dir, data.samples) if rank == 0 else None, world)
        check_store(args, self.meta, data, images)
        store.check_epochs(args.fkd_path, self.meta, args.epochs)
        self.path, self.keep = args.fkd_path, args.keep_topk
        self.plan_seed = self.meta["fkd_seed"]

    def epoch(self, epoch: int, device: torch.device) -> fkd.EpochPlan:
        plan, soft = store.read_epoch(self.path, epoch, self.meta)
        self.soft = soft.pin() if device.type == "cuda" else soft
        return plan

    def targets(self, plan: fkd.EpochPlan, job: fkd.Job, first: int, last: int, x: torch.Tensor,
                device: torch.device) -> torch.Tensor:
        start = plan.bounds(job.batch)[0]
        return store.keep_topk(self.soft.rows(start + first, start + last, device), self.keep)


class DrawnPlans:
    """Protocols online and hard: every epoch's plan drawn here, as matching draws it, from `plan_seed`."""

    def __init__(self, args: argparse.Namespace, hw, meta: dict):
        self.args, self.hw, self.meta = args, hw, meta
        self.plan_seed = 42 if args.fkd_seed is None else args.fkd_seed

    def epoch(self, epoch: int, device: torch.device) -> fkd.EpochPlan:
        a = self.args
        return fkd.draw_epoch(self.plan_seed, epoch, self.hw, a.batch_size, a.input_size, self.meta["mix_type"],
                              a.mixup, a.cutmix, (a.min_scale_crops, a.max_scale_crops), not a.no_flip)


class TeacherLabels(DrawnPlans):
    """Protocol online: the teacher's logits for exactly the mixed views the student sees, batch by batch."""

    kind = "logits"

    def __init__(self, args: argparse.Namespace, data: ImageFolderDataset, hw, device: torch.device,
                 amp: torch.dtype | None):
        if args.teacher_path:
            teacher, record = load_teacher_file(args.teacher_path)
        else:
            teacher, record = load_pretrained(args.teacher_arch)
        if record["num_classes"] < len(data.classes):
            raise UsageError(f"the teacher has {record['num_classes']} classes but {args.train_dir} has "
                             f"{len(data.classes)}; use a teacher trained on this dataset")
        super().__init__(args, hw, {"mean": record["mean"], "std": record["std"], "num_classes": record["num_classes"],
                                    "mix_type": args.mix_type or "cutmix"})
        self.teacher = teacher.to(device, memory_format=memory_format(device)).eval().requires_grad_(False)
        self.device, self.amp = device, amp

    @torch.no_grad()
    def targets(self, plan, job, first, last, x, device) -> torch.Tensor:
        with autocast(device, self.amp):
            return self.teacher(x).float()


class HardLabels(DrawnPlans):
    """Protocol hard: each view's class label as a one-hot row, mixed with its partner's by the area (CutMix) or
    weight (MixUp) of the mix."""

    kind = "probabilities"

    def __init__(self, args: argparse.Namespace, data: ImageFolderDataset, hw):
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if args.teacher_path:  # to normalise as the soft-label runs do
            _, record = load_teacher_file(args.teacher_path)
            mean, std = record["mean"], record["std"]
        super().__init__(args, hw, {"mean": list(mean), "std": list(std), "num_classes": len(data.classes),
                                    "mix_type": args.mix_type or "cutmix"})
        self.labels = torch.tensor(data.targets)

    def targets(self, plan, job, first, last, x, device) -> torch.Tensor:
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
        return target.to(device, non_blocking=True)


def build_labels(args: argparse.Namespace, data: ImageFolderDataset, hw, device: torch.device, amp: torch.dtype | None,
                 rank: int, world: int) -> StoredLabels | TeacherLabels | HardLabels:
    if args.protocol == "fkd":
        return StoredLabels(args, data, rank, world)
    if args.protocol == "online":
        return TeacherLabels(args, data, hw, device, amp)
    return HardLabels(args, data, hw)


def train_epoch(args, model: nn.Module, optimizer, scaler, source, labels, epoch: int, rank: int, world: int,
                device: torch.device, amp: torch.dtype | None) -> float:
    """One epoch of replayed batches; returns the mean batch loss. The device is waited for once, at the end."""
    plan = labels.epoch(epoch, device)
    meta = labels.meta
    jobs, my_pieces = [], []
    for b in range(plan.num_batches):
        start, end = plan.bounds(b)
        mine = pieces(end - start, args.gradient_accumulation_steps, rank, world)
        jobs.append(fkd.make_job(plan, b, torch.arange(mine[0][0], mine[-1][1])))
        my_pieces.append(mine)
    model.train()
    losses = torch.zeros(plan.num_batches, device=device)
    batches = fkd.replay_batches(plan, jobs, source, args.workers, device, meta["mean"], meta["std"], meta["mix_type"])
    bar = tqdm(batches, total=len(jobs), disable=progress_off(rank), leave=False, desc=f"epoch {epoch}")
    for (job, x), mine in zip(bar, my_pieces):
        start, end = plan.bounds(job.batch)
        first, last = mine[0][0], mine[-1][1]
        x = x.contiguous(memory_format=memory_format(device))
        target = labels.targets(plan, job, first, last, x, device)
        optimizer.zero_grad(set_to_none=True)
        for i, (lo, hi) in enumerate(mine):
            # every piece runs, empty ones too, so that all processes join the same collectives
            syncing = world == 1 or i == len(mine) - 1
            with contextlib.nullcontext() if syncing else model.no_sync():
                with autocast(device, amp):
                    out = model(x[lo - first:hi - first]).float()
                part = target[lo - first:hi - first]
                loss = kl_sum(out, part, args.temperature) if labels.kind == "logits" else soft_cross_entropy_sum(out, part)
                piece = loss / (end - start)
                scaler.scale(piece * world).backward()  # DDP averages over the processes: undo it to sum
            losses[job.batch] += piece.detach()
        scaler.step(optimizer)
        scaler.update()
    if world > 1:
        dist.all_reduce(losses)
    bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
    if bad:
        raise UsageError(f"the loss is {float(losses[bad[0]])} at epoch {epoch}, batch {bad[0]}; lower the learning "
                         "rate or check the soft labels for NaN/inf")
    return float(losses.mean())


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device, amp: torch.dtype | None,
             world: int) -> tuple[float, float, int]:
    """Top-1 and top-k (k = min(5, classes)) in %, over every process's share of the validation set."""
    model.eval()
    k = min(5, num_classes)
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-k hits, images
    for images, labels in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format(device))
        labels = labels.to(device, non_blocking=True)
        with autocast(device, amp):
            top = model(images).float().topk(k, 1).indices
        counts += torch.stack([(top[:, 0] == labels).sum(), (top == labels[:, None]).any(1).sum(),
                               torch.tensor(len(labels), device=device)]).double()
    if world > 1:
        dist.all_reduce(counts)
    top1, topk, seen = counts.tolist()
    return 100.0 * top1 / seen, 100.0 * topk / seen, k


def share_buffers(model: nn.Module, world: int) -> None:
    """Give every process rank 0's BatchNorm running statistics (each process updates its own in training)."""
    if world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def atomic_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_metrics(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))


def run_settings(args: argparse.Namespace, meta: dict, seed: int, plan_seed: int) -> dict:
    """What a student is trained with: recorded in its checkpoints, and what a resumed run must repeat."""
    settings = {k: v for k, v in vars(args).items() if k not in MAY_CHANGE | NOT_SETTINGS}
    settings.update({k: str(Path(settings[k]).resolve()) for k in PATH_SETTINGS if settings[k]})
    settings.update(seed=seed, fkd_seed=plan_seed, mix_type=meta["mix_type"], num_classes=meta["num_classes"])
    return settings


def checkpoint(net: nn.Module, optimizer, scheduler, scaler, epoch: int, best: float, device: torch.device,
               settings: dict, metrics: list[dict]) -> dict:
    """Everything a resumed run needs to continue with the same weights as an uninterrupted one, the settings it
    must repeat, and the metrics rows so far (the metrics file is rewritten from them)."""
    state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "epoch": epoch, "best_top1": best, "rng": torch.get_rng_state(),
             "settings": settings, "metrics": metrics}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


CHECKPOINT_KEYS = frozenset({"model", "optimizer", "scheduler", "scaler", "epoch", "best_top1", "rng", "settings",
                             "metrics"})
AFRESH = "or start afresh: --overwrite in place of --resume"


def read_checkpoint(path: Path, settings: dict) -> dict:
    """The checkpoint at `path`, refused in one line when it does not load, is not a checkpoint of this script, or
    is of a run with other settings than `settings`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated, damaged or foreign file: torch raises many kinds
        raise UsageError(f"checkpoint {path} does not load ({first_line(err)}); resume from an intact one, "
                         f"{AFRESH}") from err
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        raise UsageError(f"{path} is not a checkpoint of validate/train_FKD.py (or one from before checkpoints "
                         f"recorded their settings); resume from one, {AFRESH}")
    recorded = state["settings"]
    differ = differing_keys(recorded, settings)
    if differ:
        shown = "; ".join(f"{flag(k)} {recorded.get(k)} there, {settings.get(k)} here" for k in differ)
        raise UsageError(f"checkpoint {path} is of a run with other settings ({shown}); resume with the settings it "
                         f"was started with, {AFRESH}")
    return state


def restore(state: dict, path: Path, net: nn.Module, optimizer, scheduler, scaler,
            device: torch.device) -> tuple[int, float, list[dict]]:
    """Load a checked checkpoint into the run; returns (next epoch, best top-1, the metrics rows so far)."""
    try:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:  # e.g. a torchvision whose model differs
        raise UsageError(f"checkpoint {path} does not fit this {type(net).__name__} ({first_line(err)}); "
                         f"resume with the library versions it was written with, {AFRESH}") from err
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return int(state["epoch"]), float(state["best_top1"]), list(state["metrics"])


def resume_from(args: argparse.Namespace, out: Path) -> Path | None:
    """The checkpoint a run starts from: --resume CKPT, else with --resume the run folder's own (a seed of several
    that has none starts afresh), else none."""
    if args.resume is None:
        return None
    path = Path(args.resume) if args.resume else out / CHECKPOINT
    if path.is_file():
        return path
    if args.resume or args.seeds == 1:
        raise UsageError(f"cannot resume: {path} does not exist; drop --resume or pass the checkpoint's path")
    return None


def start_state(args: argparse.Namespace, out: Path, settings: dict, net: nn.Module, optimizer, scheduler, scaler,
                device: torch.device, rank: int) -> tuple[int, float, list[dict]]:
    """(first epoch, best top-1, metrics rows so far): --start-epoch's on a fresh run, else the checkpoint's, whose
    rows are written out again (a run stopped between the checkpoint and the metrics file had not yet written
    the last)."""
    path = resume_from(args, out)
    if path is None:
        for _ in range(args.start_epoch):
            scheduler.step()
        return args.start_epoch, -1.0, []
    start, best, metrics = restore(read_checkpoint(path, settings), path, net, optimizer, scheduler, scaler, device)
    if rank == 0:
        write_metrics(out / "metrics.jsonl", metrics)
    return start, best, metrics


def held_checkpoints(base: Path) -> list[Path]:
    """The checkpoints of the runs an output folder holds: its own and its seed<k> folders'."""
    return [p for p in (base / CHECKPOINT, *sorted(base.glob(f"seed*/{CHECKPOINT}"))) if p.is_file()]


def discard_runs(base: Path) -> None:
    """--overwrite: remove the files of the runs `base` holds, so that none outlives the new run beside its files."""
    for folder in (base, *sorted(p for p in base.glob("seed*") if p.is_dir())):
        for name in RUN_FILES:
            (folder / name).unlink(missing_ok=True)


def check_outputs(args: argparse.Namespace, meta: dict, students: list[tuple[int, Path, int]], base: Path) -> None:
    """An output folder that holds a run is refused unless --resume or --overwrite; --overwrite discards that run;
    every checkpoint to resume from is checked."""
    held = held_checkpoints(base)
    if held and args.resume is None and not args.overwrite:
        raise UsageError(f"{base} holds a training run ({held[0]}); continue it with --resume, or discard it and "
                         "start afresh with --overwrite")
    if args.overwrite:
        discard_runs(base)
    for seed, out, plan_seed in students:
        path = resume_from(args, out)
        if path is not None:
            read_checkpoint(path, run_settings(args, meta, seed, plan_seed))


def prepare_outputs(args: argparse.Namespace, meta: dict, students: list[tuple[int, Path, int]], base: Path,
                    rank: int, world: int) -> None:
    """check_outputs, on rank 0 for every process, before the images are decoded."""
    with together(world):
        if rank == 0:
            check_outputs(args, meta, students, base)


def student_runs(args: argparse.Namespace, base: Path, plan_seed: int) -> list[tuple[int, Path, int]]:
    """(seed, output folder, plan seed) of each of the --seeds students (online and hard shift the plan seed too)."""
    return [(args.seed + k, base / f"seed{args.seed + k}" if args.seeds > 1 else base,
             plan_seed + (k if args.protocol != "fkd" else 0)) for k in range(args.seeds)]


def start_wandb(args: argparse.Namespace):
    try:
        import wandb
    except ImportError as err:
        raise UsageError("--wandb needs the wandb package; pip install wandb or drop --wandb") from err
    if args.wandb_api_key:
        wandb.login(key=args.wandb_api_key)
    return wandb.init(project=args.wandb_project, config=vars(args))


def build_student(args: argparse.Namespace, meta: dict, device: torch.device, world: int, seed: int) -> nn.Module:
    if args.sync_bn and world > 1 and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA devices (SyncBatchNorm runs on GPUs only); drop it on the CPU")
    torch.manual_seed(seed)
    net = build_model(args.model, meta["num_classes"], args.input_size)
    if args.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net.to(device, memory_format=memory_format(device))


def wrap(net: nn.Module, args: argparse.Namespace, device: torch.device, rank: int, world: int) -> nn.Module:
    """The module that trains: DDP over the processes (BatchNorm running statistics stay per process), compiled
    when asked."""
    model = net
    if world > 1:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False, gradient_as_bucket_view=True)
    return maybe_compile(model, device, args.compile, rank)


def train_one(args: argparse.Namespace, labels, source, val_loader: DataLoader, seed: int, out: Path,
              device: torch.device, rank: int, world: int, amp: torch.dtype | None) -> dict:
    """Train and validate one student; returns its figures (as also written to OUT/results.json)."""
    meta = labels.meta
    net = build_student(args, meta, device, world, seed)
    optimizer = build_optimizer(args, net)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args.lr_schedule, args.epochs))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    settings = run_settings(args, meta, seed, labels.plan_seed)
    start, best, metrics = start_state(args, out, settings, net, optimizer, scheduler, scaler, device, rank)
    model = wrap(net, args, device, rank, world)
    run = start_wandb(args) if args.wandb and rank == 0 else None
    top1 = topk = None
    k = min(5, meta["num_classes"])
    for epoch in tqdm(range(start, args.epochs), disable=progress_off(rank), desc="training", initial=start, total=args.epochs):
        began = time.time()
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row["loss"] = train_epoch(args, model, optimizer, scaler, source, labels, epoch, rank, world, device, amp)
        scheduler.step()
        share_buffers(net, world)
        if (epoch + 1) % args.eval_interval == 0 or epoch == args.epochs - 1:
            top1, topk, k = evaluate(net, val_loader, meta["num_classes"], device, amp, world)
            row.update({"top1": top1, f"top{k}": topk})
            if top1 >= best:
                best = top1
                if rank == 0:
                    atomic_save({"model": net.state_dict(), "epoch": epoch + 1, "top1": top1}, out / "model_best.pth.tar")
        if rank == 0:
            row["seconds"] = time.time() - began
            metrics.append(row)
            state = checkpoint(net, optimizer, scheduler, scaler, epoch + 1, best, device, settings, metrics)
            atomic_save(state, out / CHECKPOINT)
            write_metrics(out / "metrics.jsonl", metrics)
            if run is not None:
                run.log(row)
    if top1 is None:
        top1, topk, k = evaluate(net, val_loader, meta["num_classes"], device, amp, world)
    result = {"seed": seed, "top1": top1, f"top{k}": topk, "best_top1": max(best, top1)}
    if rank == 0:
        print(f"final: top-1 {top1:.2f} top-{k} {topk:.2f}" + (f" (seed {seed})" if args.seeds > 1 else ""))
    return result


def summary(args: argparse.Namespace, runs: list[dict], num_images: int, num_classes: int) -> dict:
    """The figures of all runs and their final-epoch top-1 as mean and sample standard deviation."""
    top1 = [run["top1"] for run in runs]
    mean = sum(top1) / len(top1)
    std = math.sqrt(sum((v - mean) ** 2 for v in top1) / (len(top1) - 1)) if len(top1) > 1 else 0.0
    topk = next(key for key in runs[0] if key.startswith("top") and key != "top1")
    return {"protocol": args.protocol, "model": args.model, "epochs": args.epochs, "ipc": num_images // num_classes,
            "runs": runs, "top1_mean": mean, "top1_std": std, "top1": mean,
            topk: sum(run[topk] for run in runs) / len(runs), "best_top1": max(run["best_top1"] for run in runs)}


@cli
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    base = Path(args.output_dir)
    check_writable(base, "--output-dir")
    device = pick_device(args.device)
    set_deterministic(args.deterministic)
    rank, world = init_distributed(device, args.dist_timeout)
    accumulation = args.gradient_accumulation_steps
    if accumulation % world and world % accumulation:
        raise UsageError(f"--gradient-accumulation-steps {accumulation} and {world} processes: one must be a multiple of the other")
    amp = amp_dtype(args.amp, device)
    data = ImageFolderDataset(args.train_dir)
    paths = [path for path, _ in data.samples]
    hw = views.image_sizes(paths)
    labels = build_labels(args, data, hw, device, amp, rank, world)
    val_loader = build_val(args, labels.meta, rank, world, device)
    check_input_size(build_model(args.model, labels.meta["num_classes"], args.input_size), args.model, args.input_size)
    shared_by = views.cache_sharing(hw) if args.loader == "tensor" else 1
    loader = views.describe_cache(hw, shared_by) if args.loader == "tensor" else "PIL loader"
    announce("training", device, precision_name(amp), world, rank, f"student {args.model}",
             f"protocol {args.protocol}", loader, *(["SyncBatchNorm"] if args.sync_bn else []))
    steps = math.ceil(len(paths) / args.batch_size)
    if steps < 2 and rank == 0:
        print(f"warning: the {len(paths)} images make one batch of --batch-size {args.batch_size}, so every epoch is a "
              "single optimiser step; a smaller batch gives more", file=sys.stderr)
    with exclusive_run(base / ".lock", f"output folder {base}", rank, world):
        students = student_runs(args, base, labels.plan_seed)
        prepare_outputs(args, labels.meta, students, base, rank, world)
        source = views.build_source(args.loader, paths, hw, args.input_size, args.workers, rank, shared_by)
        train_all(args, labels, source, val_loader, students, base, len(paths), len(data.classes), device, rank,
                  world, amp)


def train_all(args: argparse.Namespace, labels, source, val_loader: DataLoader, students: list[tuple[int, Path, int]],
              base: Path, num_images: int, num_classes: int, device: torch.device, rank: int, world: int,
              amp: torch.dtype | None) -> None:
    """The --seeds students one after the other, and their summary."""
    runs = []
    for seed, out, plan_seed in students:
        labels.plan_seed = plan_seed
        result = train_one(args, labels, source, val_loader, seed, out, device, rank, world, amp)
        runs.append(result)
        if rank == 0 and args.seeds > 1:
            with atomic_path(out / "results.json") as tmp:
                tmp.write_text(json.dumps(summary(args, [result], num_images, num_classes), indent=1))
    if rank == 0:
        figures = summary(args, runs, num_images, num_classes)
        with atomic_path(base / "results.json") as tmp:
            tmp.write_text(json.dumps(figures, indent=1))
        if args.seeds > 1:
            print(f"final over {args.seeds} seeds: top-1 {figures['top1_mean']:.2f} ± {figures['top1_std']:.2f}")


if __name__ == "__main__":
    main()
