"""Training-time matching: label every augmented view of the synthetic set with a teacher and store it.

Example (ImageNet, the paper's settings):
    python matching/generate_soft_label.py --data outputs/syn/imagenet_ipc10_10_s0.7_g8.0_kmexpand1 \
        -a resnet18 -b 1024 --epochs 300 --input-size 224 --use-fp16 --mix-type cutmix --fkd-path outputs/fkd/...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from d4m.cli import (AMP_CHOICES, ArgumentParser, DATASETS, LOADERS, MIX_TYPES, UsageError, add_device_args,
                     check_crop_scales, cli, finite_float, image_side, non_negative_int, positive_float, positive_int, seed_int)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description="Generate FKD soft labels (training-time matching).")
    p.add_argument("--data", required=True, help="ImageFolder of synthetic images (sorted class folders = class index)")
    p.add_argument("-a", "--arch", default="resnet18", help="torchvision teacher with its default ImageNet weights")
    p.add_argument("--teacher-path", default=None, help="teacher file written by matching/train_teacher.py")
    p.add_argument("-j", "--workers", type=non_negative_int, default=4)
    p.add_argument("-b", "--batch-size", type=positive_int, default=1024)
    p.add_argument("--epochs", type=positive_int, default=300)
    p.add_argument("--input-size", type=image_side, default=224)
    p.add_argument("--min-scale-crops", type=finite_float, default=0.08)
    p.add_argument("--max-scale-crops", type=finite_float, default=1.0)
    p.add_argument("--fkd-path", required=True, help="soft-label store folder")
    p.add_argument("--use-fp16", action="store_true",
                   help="store the logits in fp16 (the original's teacher ran in float32 all the same; here fp16 is "
                        "also --amp auto's choice on CUDA)")
    p.add_argument("--mode", default="fkd_save", choices=["fkd_save"])
    p.add_argument("--fkd-seed", type=seed_int, default=42)
    p.add_argument("--mix-type", default=None, choices=MIX_TYPES)
    p.add_argument("--no-flip", action="store_true",
                   help="no horizontal flips (for sets where a mirror image is another class: digits, text)")
    p.add_argument("--mixup", type=positive_float, default=0.8)
    p.add_argument("--cutmix", type=positive_float, default=1.0)
    p.add_argument("--seed", type=seed_int, default=None, help="torch seed (the store depends on --fkd-seed only)")
    p.add_argument("--soft-label-topk", type=positive_int, default=None, help="store only the K largest logits per view")
    p.add_argument("--soft-label-int8", action="store_true",
                   help="store every logit in 8 bits between its row's minimum and maximum (half of fp16)")
    p.add_argument("--loader", default="tensor", choices=LOADERS,
                   help="tensor: decode once into host memory, crop and resize on the device; pil: the original's "
                        "per-image PIL path")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="the teacher's autocast on CUDA; auto: fp16 with --use-fp16, else bf16 (the original ran "
                        "float32: --amp off). The CPU always runs float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher")
    p.add_argument("--dataset", default=None, choices=DATASETS,
                   help="with --data-dir: the real validation split the label check also scores the teacher on")
    p.add_argument("--data-dir", "--data_dir", default=None, help="the dataset's folder (label check)")
    p.add_argument("--val-dir", "--val_dir", default=None, help="or a real validation ImageFolder (label check)")
    p.add_argument("--no-label-check", action="store_true",
                   help="skip the check, before matching, that teacher, synthetic folders and prompts share one "
                        "class order")
    add_device_args(p)
    args = p.parse_args(argv)
    args.mix_type = args.mix_type or "None"
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    check_crop_scales(args)
    if args.soft_label_topk and args.soft_label_int8:
        raise UsageError("--soft-label-topk and --soft-label-int8 are two ways to shrink the store; choose one")
    if args.data_dir and not args.dataset:
        raise UsageError("--data-dir needs --dataset (which of the dataset layouts it holds)")


if __name__ == "__main__":  # the flags are checked before torch loads (seconds): --help answers at once
    ARGS = cli(parse_args)()

import torch
import torch.distributed as dist
import torch.nn as nn

from d4m import fkd, labelcheck, store, views
from d4m.data import ImageFolderDataset, val_dataset
from d4m.device import (amp_dtype, announce, autocast, maybe_compile, memory_format, pick_device, precision_name,
                        set_deterministic)
from d4m.models import load_teacher, recorded_top1
from d4m.outputs import atomic_path, check_writable, exclusive_run, remove_stale_temporaries
from d4m.runtime import Progress, barrier, from_rank0, init_distributed, together
from d4m.settings import store_meta


def label_epoch(teacher: nn.Module, source, plan: fkd.EpochPlan, meta: dict, workers: int, device: torch.device,
                amp: torch.dtype | None, rank: int, world: int) -> dict[int, torch.Tensor]:
    """The teacher's logits (in the store's dtype, on the CPU) of this process's batches: batch b on rank b % world.
    Copies to the host are asynchronous; the device is waited for once, at the end."""
    dtype = torch.float16 if meta["dtype"] == "float16" else torch.float32
    jobs = [fkd.make_job(plan, b) for b in range(rank, plan.num_batches, world)]
    parts = {}
    with torch.no_grad(), autocast(device, amp):
        for job, x in fkd.replay_batches(plan, jobs, source, workers, device, meta):
            parts[job.batch] = teacher(x.contiguous(memory_format=memory_format(device))).to(dtype).to("cpu", non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return parts


def gather_logits(parts: dict[int, torch.Tensor], rank: int, world: int) -> torch.Tensor | None:
    """On rank 0, the epoch's logits [N,C] in position order; None elsewhere."""
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(parts, gathered, dst=0)
        if rank != 0:
            return None
        parts = {b: t for part in gathered for b, t in part.items()}
    return torch.cat([parts[b] for b in sorted(parts)])


def label_check(args: argparse.Namespace, teacher: nn.Module, record: dict, device: torch.device,
                amp: torch.dtype | None) -> dict:
    """Before the first epoch: do teacher, synthetic folders, prompts (and the real validation split) share one
    class order?"""
    transform = labelcheck.eval_transform(args.input_size, record["mean"], record["std"])
    # a teacher train_teacher.py trained on this named dataset learnt its class order: the top-1 it recorded
    # stands for a pass over the validation split (an image folder may be another than the teacher's)
    recorded = recorded_top1(record, args.dataset) if args.dataset not in (None, "imagefolder") else None
    real = (val_dataset(args.dataset or "imagefolder", args.data_dir, transform, val_dir=args.val_dir)
            if (args.val_dir or args.data_dir) and recorded is None else None)
    return labelcheck.run(teacher, record, args.data, ImageFolderDataset(args.data, transform), real, device, amp,
                          args.workers, recorded)


def create_store(fkd_path: str, meta: dict, checked: dict | None, lines: list[str]) -> None:
    """meta.json (unless it is there, with these settings), the record of each image, the label check's figures."""
    store.create_meta(fkd_path, meta)
    with atomic_path(Path(fkd_path) / store.IMAGES_NAME) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8", errors="surrogateescape")  # file names as the disk has them
    if checked is not None:
        with atomic_path(Path(fkd_path) / "label_check.json") as tmp:
            tmp.write_text(json.dumps(checked, indent=1))


@cli
def main(args: argparse.Namespace) -> None:
    # set-up: device, processes, precision; the store is this run's before any model or image loads
    check_writable(args.fkd_path, "--fkd-path")
    device = pick_device(args.device)
    set_deterministic(args.deterministic)
    rank, world = init_distributed(device, args.dist_timeout)
    amp = amp_dtype(args.amp, device, prefer_fp16=args.use_fp16)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    with exclusive_run(Path(args.fkd_path) / ".lock", f"soft-label store {args.fkd_path}", rank, world):

        # the synthetic set, the teacher, and the store's record of both
        data = ImageFolderDataset(args.data)
        paths = [path for path, _ in data.samples]
        hw = views.image_sizes(paths)
        teacher, record = load_teacher(args.teacher_path, args.arch, len(data.classes), args.input_size, device,
                                       f"{args.data} has {len(data.classes)} class folders")
        lines = from_rank0(store.image_lines(args.data, data.samples) if rank == 0 else None, world)
        meta = store_meta(args, len(data.samples), len(data.classes), store.image_fingerprint(lines), record,
                          precision_name(amp))
        shared_by = views.cache_sharing(hw, args.loader)
        announce("matching", device, precision_name(amp), world, rank, f"teacher {record['arch']}",
                 views.describe_cache(hw, shared_by, args.loader))
        if rank == 0:
            remove_stale_temporaries(args.fkd_path)
        start = store.open_store(args.fkd_path, meta)  # the first epoch missing: a resumed run continues there
        checked = None
        with together(world):
            if not args.no_label_check and rank == 0 and start < args.epochs:
                checked = label_check(args, teacher, record, device, amp)
        source = views.build_source(args.loader, paths, hw, args.input_size, args.workers, rank, shared_by)
        teacher = maybe_compile(teacher, device, args.compile, rank)

        # for each epoch: draw the plan (order, crops, flips, mix), label its views, store plan and logits
        for epoch in Progress(range(start, args.epochs), "matching", rank, initial=start, total=args.epochs,
                              unit="epochs"):
            plan = fkd.draw_epoch(args.fkd_seed, epoch, hw, args.batch_size, args.input_size, args.mix_type,
                                  args.mixup, args.cutmix, (args.min_scale_crops, args.max_scale_crops),
                                  not args.no_flip)
            with together(world):  # an image that fails to decode in one process's batches (PIL loader) stops all
                parts = label_epoch(teacher, source, plan, meta, args.workers, device, amp, rank, world)
            logits = gather_logits(parts, rank, world)
            with together(world):
                if rank == 0 and epoch == start:  # the store is made once every image has decoded and been labelled
                    create_store(args.fkd_path, meta, checked, lines)
            if rank == 0:
                store.write_epoch(args.fkd_path, epoch, plan, logits, meta)
            barrier()
    if rank == 0:
        print(f"soft labels for {args.epochs} epochs in {Path(args.fkd_path)}")


if __name__ == "__main__":
    main(ARGS)
