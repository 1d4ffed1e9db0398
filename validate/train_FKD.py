"""Stage 4 of D4M: train a student from scratch on the synthetic set and validate it on the real set. Protocols:
  fkd     (the original's) replay the augmentations and soft labels stored by matching/generate_soft_label.py;
  online  (RDED's, Minimax's) draw the same kind of plan here and let a teacher label every batch;
  hard    no teacher: cross-entropy on the class labels, mixed as the images are.
Under torchrun each process trains on its rows of every batch, in micro-batches; every micro-batch's loss is its KL
sum over the whole batch's length, so the update equals the one-process KLDiv(batchmean).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import math
import sys
import time
from pathlib import Path

from d4m.cli import (AMP_CHOICES, ArgumentParser, DATASETS, LOADERS, MIX_TYPES, PROTOCOLS, UsageError, add_device_args,
                     check_crop_scales, cli, finite_float, image_side, non_negative_float, non_negative_int, positive_float, positive_int, seed_int)

SCHEDULES = ("linear", "cosine", "half-cosine")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    p.add_argument("--min-scale-crops", type=finite_float, default=0.08, help="(protocols online, hard)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips (protocols online, hard)")
    p.add_argument("--max-scale-crops", type=finite_float, default=1.0, help="(protocols online, hard)")
    p.add_argument("--seeds", type=positive_int, default=1,
                   help="train this many students, seeds --seed .. --seed+N-1 (online and hard also shift --fkd_seed), "
                        "each in OUTPUT_DIR/seed<k> when N > 1, and report mean and std of their final top-1")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases")
    p.add_argument("--wandb-project", default="d4m")
    p.add_argument("--wandb-api-key", default=None,
                   help="prefer WANDB_API_KEY or `wandb login`: a key given here is visible to ps and shell history; "
                        "it is used to log in, never recorded or sent with the run")
    p.add_argument("--mix-type", default=None, choices=MIX_TYPES,
                   help="default: the store's (fkd), else cutmix")
    p.add_argument("--fkd_seed", type=seed_int, default=None, help="default: the store's (fkd), else 42")
    p.add_argument("--input-size", type=image_side, default=224)
    p.add_argument("--eval-interval", type=positive_int, default=50)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue the run OUTPUT_DIR holds (or the one CKPT was written by) with the settings it "
                        "was started with; only how it runs may differ (-j, --device, --amp, --compile, --loader, "
                        "--gradient-accumulation-steps, --eval-interval, --seeds, ...)")
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


if __name__ == "__main__":  # the flags are checked before torch loads (seconds): --help answers at once
    ARGS = cli(parse_args)()

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from d4m import fkd, labelcheck, store, views
from d4m.checkpoint import CHECKPOINT, Student, Training, claim_folder, resume, resume_path, state_of, write_metrics
from d4m.data import (IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, check_images, check_same_classes, read_class_list,
                      val_dataset)
from d4m.device import (amp_dtype, announce, autocast, eval_batch, maybe_compile, memory_format, pick_device, precision_name,
                        set_deterministic)
from d4m.figures import mean_std
from d4m.labelcodec import keep_topk
from d4m.models import build_model, check_input_size, load_teacher, load_teacher_file
from d4m.outputs import atomic_path, check_writable, exclusive_run, save_torch
from d4m.runtime import Progress, from_rank0, init_distributed, together
from d4m.settings import student_settings


def kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The original's loss, KLDiv(log_softmax(s/T), softmax(t/T)) summed over rows (no T^2 factor)."""
    return F.kl_div(F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1), reduction="sum")


def soft_cross_entropy_sum(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(student, 1)).sum()


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (SGD with --sgd); weight decay only on weights of more than one dimension."""
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


def _piece_edges(length: int, accumulation: int, world: int) -> list[int]:
    """A batch of `length` rows cut into max(accumulation, world) near-equal contiguous pieces: their edges."""
    count = max(accumulation, world)
    return [p * (length // count) + min(p, length % count) for p in range(count + 1)]


def my_rows(length: int, accumulation: int, rank: int, world: int) -> tuple[int, int]:
    """The rows (start, end) of a batch of `length` rows that this process trains on: its run of consecutive
    pieces, max(accumulation, world) / world of them."""
    edges = _piece_edges(length, accumulation, world)
    per_rank = (len(edges) - 1) // world
    return edges[rank * per_rank], edges[(rank + 1) * per_rank]


def micro_batches(length: int, accumulation: int, rank: int, world: int) -> list[slice]:
    """This process's forward passes over its rows of a batch of `length` rows, one per piece (empty ones too):
    slices of those rows."""
    edges = _piece_edges(length, accumulation, world)
    per_rank = (len(edges) - 1) // world
    first = edges[rank * per_rank]
    return [slice(edges[p] - first, edges[p + 1] - first) for p in range(rank * per_rank, (rank + 1) * per_rank)]


def open_store(args: argparse.Namespace, data: ImageFolderDataset, rank: int, world: int) -> dict:
    """The store's meta.json, once everything that must agree between this run and the matching run does (the
    fix in the message) and every epoch to train is there, whole."""
    meta = store.read_meta(args.fkd_path)
    lines = from_rank0(store.image_lines(args.train_dir, data.samples) if rank == 0 else None, world)
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
    store.check_epochs(args.fkd_path, meta, args.epochs)
    return meta


def label_source(args: argparse.Namespace, data: ImageFolderDataset, device: torch.device, rank: int,
                 world: int) -> tuple[dict, int, nn.Module | None]:
    """(meta, plan seed, teacher) of --protocol: meta gives the class count, the normalisation and the mix; fkd
    replays the store's plans, online and hard draw theirs from the plan seed; online's teacher labels the views."""
    if args.protocol == "fkd":
        meta = open_store(args, data, rank, world)
        return meta, meta["fkd_seed"], None
    plan_seed, mix_type = 42 if args.fkd_seed is None else args.fkd_seed, args.mix_type or "cutmix"
    if args.protocol == "online":
        teacher, record = load_teacher(args.teacher_path, args.teacher_arch, len(data.classes), args.input_size, device,
                                       f"{args.train_dir} has {len(data.classes)}")
        mean, std, num_classes = record["mean"], record["std"], record["num_classes"]
    else:
        teacher, mean, std, num_classes = None, IMAGENET_MEAN, IMAGENET_STD, len(data.classes)
        if args.teacher_path:  # to normalise as the soft-label runs do
            _, record = load_teacher_file(args.teacher_path)
            mean, std = record["mean"], record["std"]
    return {"mean": list(mean), "std": list(std), "num_classes": num_classes, "mix_type": mix_type}, plan_seed, teacher


def build_val(args: argparse.Namespace, meta: dict, rank: int, world: int, device: torch.device) -> DataLoader:
    """This process's share of the real validation set (every world-th image), in the classes' order of the set."""
    transform = labelcheck.eval_transform(args.input_size, meta["mean"], meta["std"])
    if args.dataset == "imagefolder" and not (args.val_dir or args.data_dir):
        raise UsageError("--dataset imagefolder needs --val-dir (the real validation ImageFolder) or --data-dir "
                         "(the folder holding val/)")
    data = val_dataset(args.dataset, args.data_dir, transform, val_dir=args.val_dir)
    if len(data.classes) > meta["num_classes"]:
        raise UsageError(f"the validation set has {len(data.classes)} classes but the student {meta['num_classes']}")
    made_from = read_class_list(args.train_dir)
    if made_from is not None:
        check_same_classes([row["name"] for row in made_from], data.classes,
                           f"the validation split's classes are not those {args.train_dir} was made from", "validate "
                           "on the same dataset")
    with together(world):  # first read after the last epoch: an image that does not decode is named before training
        check_images(data, range(rank, len(data), world))
    return DataLoader(Subset(data, range(rank, len(data), world)), batch_size=eval_batch(device), shuffle=False,
                      num_workers=args.workers, pin_memory=device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
             world: int) -> tuple[float, float, int]:
    """Top-1 and top-k (k = min(5, classes)) in %, over every process's share of the validation set, in float32
    as the original."""
    model.eval()
    k = min(5, num_classes)
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-k hits, images
    for images, labels in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format(device))
        labels = labels.to(device, non_blocking=True)
        top = model(images).float().topk(k, 1).indices
        counts += torch.stack([(top[:, 0] == labels).sum(), (top == labels[:, None]).any(1).sum(),
                               torch.tensor(len(labels), device=device)]).double()
    if world > 1:
        dist.all_reduce(counts)
    top1, topk, seen = counts.tolist()
    return 100.0 * top1 / seen, 100.0 * topk / seen, k


def build_student(args: argparse.Namespace, num_classes: int, device: torch.device, world: int, seed: int) -> nn.Module:
    if args.sync_bn and world > 1 and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA devices (SyncBatchNorm runs on GPUs only); drop it on the CPU")
    torch.manual_seed(seed)
    net = build_model(args.model, num_classes, args.input_size)
    if args.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net.to(device, memory_format=memory_format(device))


# BatchNorm running statistics stay per process during training (rank 0's are shared after each epoch); torch 2.13
# renamed DDP's switch for that.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                  inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})


def wrap(net: nn.Module, args: argparse.Namespace, device: torch.device, rank: int, world: int) -> nn.Module:
    """The module that trains: DDP over the processes, compiled when asked."""
    model = net
    if world > 1:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=True, **NO_BUFFER_SYNC)
    return maybe_compile(model, device, args.compile, rank)


def start_wandb(args: argparse.Namespace):
    """A Weights & Biases run whose config holds training settings only: no key, no local path."""
    try:
        import wandb
    except ImportError as err:
        raise UsageError("--wandb needs the wandb package; pip install wandb or drop --wandb") from err
    if args.wandb_api_key:
        wandb.login(key=args.wandb_api_key)
    private = {"wandb_api_key", "train_dir", "val_dir", "data_dir", "fkd_path", "teacher_path", "output_dir", "resume"}
    return wandb.init(project=args.wandb_project, config={k: v for k, v in vars(args).items() if k not in private})


def train_student(args: argparse.Namespace, student: Student, meta: dict, teacher: nn.Module | None,
                  class_of: torch.Tensor, hw, source, val_loader: DataLoader, device: torch.device, rank: int,
                  world: int, amp: torch.dtype | None) -> dict:
    """Train and validate one student on the images of sizes `hw` (class `class_of`, read by `source`) and the
    targets of --protocol; returns its figures (as also written to its folder's results.json)."""
    out, num_classes, accumulation = student.folder, meta["num_classes"], args.gradient_accumulation_steps
    # the loss: the original's KL at temperature T against teacher logits, or a soft cross-entropy against the mixed
    # one-hot rows of protocol hard
    loss_of = (soft_cross_entropy_sum if args.protocol == "hard"
               else functools.partial(kl_sum, temperature=args.temperature))

    # student, optimiser, per-epoch schedule, and the checkpoint it continues from
    net = build_student(args, num_classes, device, world, student.seed)
    optimizer = build_optimizer(args, net)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args.lr_schedule, args.epochs))
    run = Training(net, optimizer, schedule, torch.amp.GradScaler(device.type, enabled=amp == torch.float16))
    path = resume_path(args.resume, out, args.seeds)
    start, best, metrics = resume(path, student, run, device, rank, args.start_epoch)
    model = wrap(net, args, device, rank, world)
    logger = start_wandb(args) if args.wandb and rank == 0 else None
    top1 = topk = None
    k = min(5, num_classes)

    epochs = Progress(range(start, args.epochs), "training", rank, initial=start, total=args.epochs, unit="epochs")
    for epoch in epochs:
        began = time.time()
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        # the epoch's plan (the same views, flips and mixes as matching, in the same batches) and, for fkd, the
        # teacher's logits of those views as matching stored them
        if args.protocol == "fkd":
            plan, logits = store.read_epoch(args.fkd_path, epoch, meta, torch.from_numpy(hw))
            logits = logits.pin() if device.type == "cuda" else logits
        else:
            plan = fkd.draw_epoch(student.plan_seed, epoch, hw, args.batch_size, args.input_size, meta["mix_type"],
                                  args.mixup, args.cutmix, (args.min_scale_crops, args.max_scale_crops),
                                  not args.no_flip)
        rows = [my_rows(hi - lo, accumulation, rank, world) for lo, hi in map(plan.bounds, range(plan.num_batches))]
        jobs = [fkd.make_job(plan, b, torch.arange(first, last)) for b, (first, last) in enumerate(rows)]
        batches = fkd.replay_batches(plan, jobs, source, args.workers, device, meta)
        model.train()
        losses = torch.zeros(plan.num_batches, device=device)
        for job, x in Progress(batches, f"epoch {epoch}", rank, total=len(jobs), leave=False):
            start_row, end_row = plan.bounds(job.batch)
            first, last = rows[job.batch]
            x = x.contiguous(memory_format=memory_format(device))
            if args.protocol == "fkd":  # the K largest of the stored logits with --keep-topk K
                target = keep_topk(logits.rows(start_row + first, start_row + last, device), args.keep_topk)
            elif args.protocol == "online":  # the teacher's logits of exactly these mixed views
                with torch.no_grad(), autocast(device, amp):
                    target = teacher(x).float()
            else:
                target = fkd.mixed_labels(plan, job, class_of, num_classes, meta["mix_type"], args.input_size)
                target = target.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            parts = micro_batches(end_row - start_row, accumulation, rank, world)
            for i, part in enumerate(parts):  # every one runs, empty ones too: all processes join each collective
                last_part = world == 1 or i == len(parts) - 1  # DDP all-reduces the gradients after the last one only
                with contextlib.nullcontext() if last_part else model.no_sync():
                    with autocast(device, amp):
                        output = model(x[part]).float()
                    loss = loss_of(output, target[part]) / (end_row - start_row)  # the batch's KLDiv(batchmean)
                    run.scaler.scale(loss * world).backward()  # DDP averages over the processes: undo it to sum
                losses[job.batch] += loss.detach()
            run.scaler.step(optimizer)
            run.scaler.update()
        run.scheduler.step()
        if world > 1:
            dist.all_reduce(losses)
            for buffer in net.buffers():  # every process takes rank 0's BatchNorm statistics
                dist.broadcast(buffer, 0)
        if not torch.isfinite(losses).all():
            bad = int(torch.nonzero(~torch.isfinite(losses))[0])
            raise UsageError(f"the loss is {float(losses[bad])} at epoch {epoch}, batch {bad}; lower the learning "
                             "rate or check the soft labels for NaN/inf")
        row["loss"] = float(losses.mean())

        # validate now and then, keep the best, checkpoint every epoch
        if (epoch + 1) % args.eval_interval == 0 or epoch == args.epochs - 1:
            top1, topk, k = evaluate(net, val_loader, num_classes, device, world)
            row.update({"top1": top1, f"top{k}": topk})
            if top1 >= best:
                best = top1
                if rank == 0:
                    save_torch({"model": net.state_dict(), "epoch": epoch + 1, "top1": top1}, out / "model_best.pth.tar")
        if rank == 0:
            row["seconds"] = time.time() - began
            metrics.append(row)
            save_torch(state_of(run, epoch + 1, best, device, student.settings, metrics), out / CHECKPOINT)
            write_metrics(out / "metrics.jsonl", metrics)
            if logger is not None:
                logger.log(row)
    if logger is not None:
        logger.finish()
    if top1 is None:  # nothing left to train (resumed at the last epoch)
        top1, topk, k = evaluate(net, val_loader, num_classes, device, world)
    if rank == 0:
        print(f"final: top-1 {top1:.2f} top-{k} {topk:.2f}" + (f" (seed {student.seed})" if args.seeds > 1 else ""))
    return {"seed": student.seed, "top1": top1, f"top{k}": topk, "best_top1": max(best, top1)}


def summary(args: argparse.Namespace, runs: list[dict], num_images: int, num_classes: int) -> dict:
    """The figures of all runs and their final-epoch top-1 as mean and sample standard deviation (0 for one)."""
    mean, std = mean_std([run["top1"] for run in runs])
    topk = next(key for key in runs[0] if key.startswith("top") and key != "top1")
    return {"protocol": args.protocol, "model": args.model, "epochs": args.epochs, "ipc": num_images // num_classes,
            "runs": runs, "top1_mean": mean, "top1_std": std, "top1": mean,
            topk: sum(run[topk] for run in runs) / len(runs), "best_top1": max(run["best_top1"] for run in runs)}


def write_results(path: Path, figures: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(figures, indent=1))


def train_students(args: argparse.Namespace, base: Path, device: torch.device, rank: int, world: int,
                   amp: torch.dtype | None) -> None:
    """The students of --seeds, trained one after the other into `base`, and their summary."""

    # the synthetic set, its targets (stored soft labels, an online teacher or hard labels), the real validation set
    data = ImageFolderDataset(args.train_dir)
    paths = [path for path, _ in data.samples]
    hw = views.image_sizes(paths)
    meta, plan_seed, teacher = label_source(args, data, device, rank, world)
    val_loader = build_val(args, meta, rank, world, device)
    check_input_size(build_model(args.model, meta["num_classes"], args.input_size), args.model, args.input_size)
    shared_by = views.cache_sharing(hw, args.loader)
    announce("training", device, precision_name(amp), world, rank, f"student {args.model}", f"protocol {args.protocol}",
             views.describe_cache(hw, shared_by, args.loader),
             *(["SyncBatchNorm"] if args.sync_bn else []))
    if math.ceil(len(paths) / args.batch_size) < 2 and rank == 0:
        print(f"warning: the {len(paths)} images make one batch of --batch-size {args.batch_size}, so every epoch is a "
              "single optimiser step; a smaller batch gives more", file=sys.stderr)

    # the students, one after the other (online and hard ones each draw their own plans), and their summary
    students = []
    for seed in range(args.seed, args.seed + args.seeds):
        seed_plans = plan_seed + (seed - args.seed if args.protocol != "fkd" else 0)
        students.append(Student(seed, base / f"seed{seed}" if args.seeds > 1 else base, seed_plans,
                                student_settings(args, seed, seed_plans, meta["mix_type"], meta["num_classes"])))
    claim_folder(base, students, args.resume, args.overwrite, rank, world)
    source = views.build_source(args.loader, paths, hw, args.input_size, args.workers, rank, shared_by)
    runs = []
    for student in students:
        runs.append(train_student(args, student, meta, teacher, torch.tensor(data.targets), hw, source, val_loader,
                                  device, rank, world, amp))
        if rank == 0 and args.seeds > 1:
            write_results(student.folder / "results.json", summary(args, runs[-1:], len(paths), len(data.classes)))
    if rank == 0:
        figures = summary(args, runs, len(paths), len(data.classes))
        write_results(base / "results.json", figures)
        if args.seeds > 1:
            print(f"final over {args.seeds} seeds: top-1 {figures['top1_mean']:.2f} ± {figures['top1_std']:.2f}")


@cli
def main(args: argparse.Namespace) -> None:
    # set-up: device, processes, precision; the output folder is this run's before any model or label loads
    base = Path(args.output_dir)
    check_writable(base, "--output-dir")
    device = pick_device(args.device)
    set_deterministic(args.deterministic)
    rank, world = init_distributed(device, args.dist_timeout)
    if args.gradient_accumulation_steps % world and world % args.gradient_accumulation_steps:
        raise UsageError(f"--gradient-accumulation-steps {args.gradient_accumulation_steps} and {world} processes: "
                         "one must be a multiple of the other")
    with exclusive_run(base / ".lock", f"output folder {base}", rank, world):
        train_students(args, base, device, rank, world, amp_dtype(args.amp, device))


if __name__ == "__main__":
    main(ARGS)
