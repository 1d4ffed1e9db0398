"""Benchmark: soft-label store bytes per epoch, full fp16 logits (the original's content) vs 8-bit rows and top-K.

Writes one real epoch file through d4m.store.write_epoch for each setting and reports its size on disk,
with the plan (order, crops, flips, mix) included in every figure.

    python bench/bench_store.py                       # ImageNet IPC 10: 10,000 images, 1000 classes, batch 1024
    python bench/bench_store.py --images 100000       # IPC 100
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from d4m import fkd, store


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--topk", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument("--epochs", type=int, default=300, help="to print the size of a whole store")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    hw = np.full((args.images, 2), 224)
    plan = fkd.draw_epoch(42, 0, hw, args.batch_size, 224)
    # Teacher-like logits: a few large values over a Gaussian background.
    logits = torch.randn(args.images, args.classes, generator=torch.Generator().manual_seed(0)) * 2
    logits[torch.arange(args.images), torch.randint(args.classes, (args.images,))] += 12
    logits = logits.half()
    print(f"{args.images} images, {args.classes} classes, batch {args.batch_size}; sizes of one epoch file")
    print(f"{'soft labels':18} {'MB/epoch':>10} {f'GB/{args.epochs} ep':>12} {'vs full':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        settings = [("full fp16", None, False), ("8-bit rows", None, True)] + [(f"top-{k} fp16", k, False)
                                                                              for k in args.topk]
        full = None
        for name, k, int8 in settings:
            store.write_epoch(tmp, 0, plan, logits, {"topk": k, "int8": int8})
            size = Path(store.epoch_file(tmp, 0)).stat().st_size
            full = full or size
            print(f"{name:18} {size / 1e6:10.2f} {size * args.epochs / 1e9:12.2f} {full / size:8.1f}x")


if __name__ == "__main__":
    main()
