"""Benchmark: epochs of matching (teacher) and student training, the original's way vs ours, and the networks alone.

original: the per-sample PIL path (every epoch each image is decoded from PNG and cropped, resized and flipped
          by PIL, through the same DataLoader workers) and float32 networks, as the original code runs.
ours:     the tensor path (the set decoded once into host memory; workers cut the crops, the device resizes them)
          with the scripts' settings: on CUDA the teacher under fp16 autocast (the launchers' --use-fp16), the
          student under bf16 autocast, both channels_last; logits copied to the host asynchronously; no host
          synchronisation inside an epoch; --compile compiles both networks.
alone:    the same networks with ours' settings on one fixed batch already on the device: the ceiling.
"data" times the augmented, mixed batches alone; "matching" adds the teacher's forward pass and "training" the
student's forward, backward (in --accumulation pieces) and AdamW step against stored-like soft labels. Both paths
replay identical crop boxes, flips and mixes drawn from the same plan. Each mode runs in its own process so that
its peak memory is its own.

    python bench/bench_fkd.py                                   # 1000 images, 32 px, convnet, CPU
    python bench/bench_fkd.py --size 224 --input-size 224 --arch resnet18 --images 256 --batch-size 64
    python bench/bench_fkd.py --size 224 --input-size 224 --arch resnet18 --images 10240 --batch-size 1024 \\
        --accumulation 2 -j 12 --compile --device cuda           # ImageNet-shaped, a GPU
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from d4m import fkd, views
from d4m.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset
from d4m.device import amp_dtype, autocast, maybe_compile, memory_format, pick_device, set_deterministic
from d4m.models import build_model
from measure import machine, peak_device_gb, peak_host_gb, timed, write_json

MODES = ("original", "ours", "alone")
IMAGENET_CUTMIX = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "mix_type": "cutmix"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=32, help="side of the stored images")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--arch", default="convnet")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--accumulation", type=int, default=1, help="training pieces per batch (the launchers use 2)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (after a warm-up of two batches)")
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--device", default=None, help="cuda when present, else cpu")
    p.add_argument("--compile", action="store_true", help="compile the networks (ours and alone)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--mode", choices=MODES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def _png(job: tuple[Path, int, int, int]) -> None:
    root, i, classes, size = job
    rng = np.random.default_rng(i)
    low = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1, 3), dtype=np.uint8)
    folder = root / f"{i % classes:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(low).resize((size, size), Image.BICUBIC).save(folder / f"{i:06d}.png")


def make_images(root: Path, images: int, classes: int, size: int) -> None:
    """Smooth random colour images (PNG), spread over `classes` class folders."""
    with Pool() as pool:
        pool.map(_png, [(root, i, classes, size) for i in range(images)], chunksize=64)


class Networks:
    """Teacher and student with a mode's settings."""

    def __init__(self, args: argparse.Namespace, device: torch.device, ours: bool):
        torch.manual_seed(0)
        layout = memory_format(device) if ours else torch.contiguous_format
        self.teacher = build_model(args.arch, args.classes, args.input_size).to(device, memory_format=layout)
        self.teacher.eval().requires_grad_(False)
        self.student = build_model(args.arch, args.classes, args.input_size).to(device, memory_format=layout)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-3)
        self.teacher_amp = amp_dtype("auto", device, prefer_fp16=True) if ours else None
        self.student_amp = amp_dtype("auto", device) if ours else None
        self.layout, self.device, self.ours = layout, device, ours
        self.teacher_run = maybe_compile(self.teacher, device, args.compile and ours)
        self.student_run = maybe_compile(self.student, device, args.compile and ours)

    def label(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(self.device, self.teacher_amp):
            logits = self.teacher_run(x.contiguous(memory_format=self.layout))
        return logits.half().to("cpu", non_blocking=self.ours)

    def train_step(self, x: torch.Tensor, target: torch.Tensor, accumulation: int) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        x = x.contiguous(memory_format=self.layout)
        for piece, soft in zip(x.chunk(accumulation), target.chunk(accumulation)):
            with autocast(self.device, self.student_amp):
                out = self.student_run(piece)
            part = F.kl_div(F.log_softmax(out.float() / 20, 1), F.softmax(soft / 20, 1), reduction="sum") / len(x)
            part.backward()
            loss += part.detach()
        self.optimizer.step()
        return loss


def run_mode(args: argparse.Namespace) -> dict:
    """Time a mode's epochs; runs in a child process."""
    device = pick_device(args.device)
    set_deterministic(False)
    nets = Networks(args, device, ours=args.mode != "original")
    if args.mode == "alone":
        return run_alone(args, nets, device)
    data = ImageFolderDataset(args.data)
    paths = [p for p, _ in data.samples]
    hw = views.image_sizes(paths)
    loader = "pil" if args.mode == "original" else "tensor"
    source, setup_s = timed(lambda: views.build_source(loader, paths, hw, args.input_size, args.workers), device)
    soft = torch.randn(args.images, args.classes)
    if device.type == "cuda":
        soft = soft.pin_memory()

    def epoch_batches(epoch: int):
        plan = fkd.draw_epoch(42, epoch, hw, args.batch_size, args.input_size)
        jobs = [fkd.make_job(plan, b) for b in range(plan.num_batches if epoch else min(2, plan.num_batches))]
        batches = fkd.replay_batches(plan, jobs, source, args.workers, device, IMAGENET_CUTMIX)
        return plan, batches

    def data_epoch(epoch: int) -> None:
        for _ in epoch_batches(epoch)[1]:
            pass

    def matching_epoch(epoch: int) -> None:
        for _, x in epoch_batches(epoch)[1]:
            nets.label(x)

    def training_epoch(epoch: int) -> None:
        plan, batches = epoch_batches(epoch)
        losses = []
        for job, x in batches:
            start, end = plan.bounds(job.batch)
            loss = nets.train_step(x, soft[start:end].to(device, non_blocking=True), args.accumulation)
            losses.append(loss if nets.ours else float(loss))  # the original reads every loss back
        float(sum(losses))

    result = {"mode": args.mode, "setup_s": setup_s}
    for name, run in (("data", data_epoch), ("matching", matching_epoch), ("training", training_epoch)):
        run(0)  # warm-up on the first two batches (compilation, kernel choice)
        _, seconds = timed(lambda: [run(epoch) for epoch in range(1, args.epochs + 1)], device)
        result[f"{name}_img_s"] = args.images * args.epochs / seconds
    result.update(peak_host_gb=peak_host_gb(), peak_device_gb=peak_device_gb(device))
    return result


def run_alone(args: argparse.Namespace, nets: Networks, device: torch.device) -> dict:
    """Images per second of the teacher's forward pass and the student's step on one fixed batch."""
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    target = torch.randn(args.batch_size, args.classes, device=device)
    batches = max(1, args.images // args.batch_size) * args.epochs
    result = {"mode": "alone"}
    for name, step in (("matching", lambda: nets.label(x)),
                       ("training", lambda: nets.train_step(x, target, args.accumulation))):
        step(), step()
        _, seconds = timed(lambda: [step() for _ in range(batches)], device)
        result[f"{name}_img_s"] = args.batch_size * batches / seconds
    result.update(peak_host_gb=peak_host_gb(), peak_device_gb=peak_device_gb(device))
    return result


def print_row(mode: str, r: dict) -> None:
    device_gb = f"{r['peak_device_gb']:.2f}" if r["peak_device_gb"] is not None else "-"
    print(f"{mode:9} {r.get('setup_s', 0):8.2f} {r.get('data_img_s', float('nan')):11.1f} "
          f"{r['matching_img_s']:15.1f} {r['training_img_s']:15.1f} {r['peak_host_gb']:13.2f} {device_gb:>15}",
          flush=True)


def main() -> None:
    args = parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    device = pick_device(args.device)
    print(f"{args.images} images of {args.size} px -> {args.input_size} px crops, {args.arch}, batch {args.batch_size}, "
          f"accumulation {args.accumulation}, {args.workers} workers, {machine(device)}"
          f"{', compiled' if args.compile else ''}")
    print(f"{'mode':9} {'setup s':>8} {'data img/s':>11} {'matching img/s':>15} {'training img/s':>15} "
          f"{'peak host GB':>13} {'peak device GB':>15}", flush=True)
    figures = {"machine": machine(device), "settings": vars(args) | {"mode": None, "data": None}}
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp), args.images, args.classes, args.size)
        for mode in MODES:
            cmd = [sys.executable, __file__, "--mode", mode, "--data", tmp] + sys.argv[1:]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
            figures[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print_row(mode, figures[mode])
            write_json(args.json, figures)
    for stage in ("data", "matching", "training"):
        print(f"{stage}: ours {figures['ours'][f'{stage}_img_s'] / figures['original'][f'{stage}_img_s']:.2f}x "
              "the original's way")


if __name__ == "__main__":
    main()
