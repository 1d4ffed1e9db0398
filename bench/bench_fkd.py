"""Benchmark: one epoch of matching (teacher) and of student training, per-sample PIL path vs tensor path.

The PIL path is the original's way of feeding FKD: every epoch each image is decoded from PNG and
cropped, resized and flipped by PIL, one sample at a time (here with the same DataLoader workers).
"data" times the augmented, mixed batches alone; "matching" adds the teacher's forward pass and
"training" the student's forward, backward and AdamW step (with the teacher in place of stored labels).
The tensor path decodes the set once into a uint8 cache and crops, flips and mixes whole batches.
Both replay identical crop boxes, flips and mixes drawn from the same plan. Each mode runs in its
own process so that its peak memory (max RSS) is its own.

    python bench/bench_fkd.py                                   # 1000 images, 32 px, convnet
    python bench/bench_fkd.py --size 224 --input-size 224 --arch resnet18 --images 256 --batch-size 64
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from d4m import fkd
from d4m.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset
from d4m.models import build_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=32, help="side of the stored images")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--arch", default="convnet")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--mode", choices=["pil", "tensor"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def make_images(root: Path, images: int, classes: int, size: int) -> None:
    """Smooth random colour images (PNG), `images // classes` per class folder."""
    rng = np.random.default_rng(0)
    for i in range(images):
        low = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        folder = root / f"{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.png")


def run_mode(args: argparse.Namespace) -> dict:
    """Time matching and training epochs with one loader; runs in a child process."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    data = ImageFolderDataset(args.data)
    paths = [p for p, _ in data.samples]
    hw = fkd.image_sizes(paths)
    start = time.perf_counter()
    source = fkd.build_source(args.mode, paths, hw, args.input_size, args.workers, device)
    setup_s = time.perf_counter() - start
    teacher = build_model(args.arch, args.classes, args.input_size).eval().requires_grad_(False)
    student = build_model(args.arch, args.classes, args.input_size)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)

    def epoch_views(epoch: int):
        plan = fkd.draw_epoch(42, epoch, hw, args.batch_size, args.input_size, "cutmix", 0.8, 1.0, (0.08, 1.0))
        jobs = [fkd.make_job(plan, b) for b in range(plan.num_batches)]
        return fkd.replay_batches(plan, jobs, args.mode, source, args.workers, device, IMAGENET_MEAN, IMAGENET_STD, "cutmix")

    def data_epoch(epoch: int) -> None:
        for _ in epoch_views(epoch):
            pass

    def matching_epoch(epoch: int) -> None:
        with torch.no_grad():
            for _, x in epoch_views(epoch):
                teacher(x)

    def training_epoch(epoch: int) -> None:
        for _, x in epoch_views(epoch):
            with torch.no_grad():
                target = teacher(x)
            loss = F.kl_div(F.log_softmax(student(x) / 20, 1), F.softmax(target / 20, 1), reduction="batchmean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    result = {"mode": args.mode, "setup_s": setup_s}
    for name, run in (("data", data_epoch), ("matching", matching_epoch), ("training", training_epoch)):
        run(0)
        start = time.perf_counter()
        for epoch in range(1, args.epochs + 1):
            run(epoch)
        result[f"{name}_images_per_s"] = args.images * args.epochs / (time.perf_counter() - start)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    args = parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp), args.images, args.classes, args.size)
        results = {}
        for mode in ("pil", "tensor"):
            cmd = [sys.executable, __file__, "--mode", mode, "--data", tmp] + sys.argv[1:]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
    print(f"{args.images} images of {args.size} px -> {args.input_size} px crops, {args.arch}, batch {args.batch_size}, "
          f"{args.workers} workers, {torch.get_num_threads()} threads, CPU")
    print(f"{'path':8} {'setup s':>8} {'data img/s':>11} {'matching img/s':>15} {'training img/s':>15} {'peak RSS MB':>12}")
    for mode, r in results.items():
        print(f"{mode:8} {r['setup_s']:8.2f} {r['data_images_per_s']:11.1f} {r['matching_images_per_s']:15.1f} "
              f"{r['training_images_per_s']:15.1f} {r['peak_rss_mb']:12.0f}")
    for stage in ("data", "matching", "training"):
        ratio = results["tensor"][f"{stage}_images_per_s"] / results["pil"][f"{stage}_images_per_s"]
        print(f"{stage}: tensor path {ratio:.2f}x the PIL path")


if __name__ == "__main__":
    main()
