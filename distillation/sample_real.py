"""Draw IPC random real training images per class into an ImageFolder: the random-real baseline."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from d4m.data import DATASETS, class_count, train_dataset
from d4m.runtime import UsageError, atomic_path, cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="fashion_mnist", choices=DATASETS)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--ipc", type=int, default=10, help="images per class")
    parser.add_argument("--size", type=int, default=None, help="resize to size x size (default: keep)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="folder to write <class>/<image>.png into")
    return parser.parse_args(argv)


def pick_per_class(targets: list[int], num_classes: int, ipc: int, seed: int) -> list[list[int]]:
    """`ipc` distinct indices of each class, drawn with a seeded generator."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    picks = []
    for c in range(num_classes):
        members = np.flatnonzero(targets == c)
        if len(members) < ipc:
            raise UsageError(f"class {c} has {len(members)} images, fewer than --ipc {ipc}")
        picks.append(sorted(rng.choice(members, size=ipc, replace=False).tolist()))
    return picks


@cli
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.ipc < 1:
        raise UsageError(f"--ipc must be at least 1, got {args.ipc}")
    data = train_dataset(args.dataset, args.data_dir)
    num_classes = class_count(args.dataset, data)
    picks = pick_per_class(data.targets, num_classes, args.ipc, args.seed)
    width = len(str(num_classes - 1))
    for c, indices in enumerate(tqdm(picks, desc="classes")):
        for j, index in enumerate(indices):
            img, _ = data[index]
            if args.size:
                img = img.resize((args.size, args.size), resample=2)
            with atomic_path(Path(args.output) / f"{c:0{width}d}" / f"{j:03d}.png") as tmp:
                img.save(tmp, format="PNG")
    print(f"wrote {num_classes * args.ipc} images to {args.output}")


if __name__ == "__main__":
    main()
