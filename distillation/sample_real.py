"""Real training images per class into an ImageFolder: the baselines D4M's images are compared with.

    --select random   IPC images per class drawn at random (seeded): the random-real baseline;
    --select nearest  the real image nearest (in the VAE's latent space) to each k-means prototype of stage 1,
                      distinct within a class, read from the prototype file: does the diffusion step add anything
                      over choosing real images with the same prototypes?

Works for every dataset the chain reads (imagefolder included). The images keep their size unless --size is
given; class folders are zero-padded indices, as stage 2 writes them, with classes.json beside them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from d4m.cli import ArgumentParser, DATASETS, UsageError, cli, image_side, positive_int, seed_int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion_mnist", choices=DATASETS)
    parser.add_argument("--data_dir", "--data-dir", required=True)
    parser.add_argument("--select", default="random", choices=("random", "nearest"))
    parser.add_argument("--prototype_path", default=None, help="stage 1's prototype file (with --select nearest)")
    parser.add_argument("--ipc", type=positive_int, default=None,
                        help="images per class (default 10; with --select nearest the prototypes per class)")
    parser.add_argument("--size", type=image_side, default=None, help="resize to size x size (default: keep)")
    parser.add_argument("--seed", type=seed_int, default=0, help="seeds the random draw")
    parser.add_argument("--label_file_path", "--label-file-path", default=None, help="prompts recorded in classes.json")
    parser.add_argument("--output", required=True, help="folder to write <class>/<image>.png into")
    args = parser.parse_args(argv)
    if args.select == "nearest" and not args.prototype_path:
        raise UsageError("--select nearest needs --prototype_path (the file of distillation/gen_prototype.py)")
    return args


if __name__ == "__main__":  # the flags are checked before torch loads (seconds): --help answers at once
    ARGS = cli(parse_args)()

import numpy as np

from d4m.data import check_images, class_count, resolve_prompts, train_dataset, write_class_list
from d4m.prototypes import PrototypeFile
from d4m.outputs import atomic_path, check_writable, claim_folder, exclusive, file_digest
from d4m.runtime import Progress


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


def nearest_per_class(path: str, class_names: list[str], ipc: int | None) -> list[list[int]]:
    """The prototype file's nearest real images, checked against this dataset's classes."""
    protos = PrototypeFile(path)
    nearest = protos.nearest()
    if nearest is None or bool((nearest < 0).any()):
        raise UsageError(f"prototype file {path} does not record the real images nearest to its prototypes; "
                         "regenerate it with distillation/gen_prototype.py")
    recorded = protos.class_names
    if recorded != class_names:
        raise UsageError(f"prototype file {path} was made from other classes than --data_dir's "
                         f"({len(recorded or [])} vs {len(class_names)} classes); use the same dataset")
    if ipc is not None and ipc != protos.per_class:
        raise UsageError(f"--ipc {ipc} differs from the {protos.per_class} prototypes per class in {path}")
    return nearest.tolist()


@cli
def main(args: argparse.Namespace) -> None:
    data = train_dataset(args.dataset, args.data_dir)
    num_classes = class_count(args.dataset, data)
    class_names = [str(name) for name in getattr(data, "classes", range(num_classes))]
    prompts = resolve_prompts(args.dataset, args.label_file_path, class_names)
    if args.select == "nearest":
        picks = nearest_per_class(args.prototype_path, class_names, args.ipc)
    else:
        picks = pick_per_class(data.targets, num_classes, args.ipc or 10, args.seed)
    check_writable(args.output, "--output")
    check_images(data, [index for indices in picks for index in indices])  # a damaged one stops the run before a write
    with exclusive(Path(args.output) / ".lock", f"image folder {args.output}"):
        claim_folder(args.output, draw_settings(args), "--output", write=True)
        write_images(data, picks, Path(args.output), args.size)
        write_class_list(args.output, class_names, prompts)
    print(f"wrote {sum(len(p) for p in picks)} images to {args.output}")


def draw_settings(args: argparse.Namespace) -> dict:
    """What decides the images, recorded in the output folder's manifest: a rerun with others is refused."""
    chosen_by = ({"prototype_file": file_digest(args.prototype_path)} if args.select == "nearest"
                 else {"seed": args.seed, "ipc": args.ipc or 10})
    return {"dataset": args.dataset, "data_dir": str(Path(args.data_dir).resolve()), "select": args.select,
            "size": args.size, **chosen_by}


def write_images(data, picks: list[list[int]], output: Path, size: int | None) -> None:
    width = len(str(len(picks) - 1))
    for c, indices in enumerate(Progress(picks, "classes", unit="classes")):
        for j, index in enumerate(indices):
            img, _ = data[index]
            if size:
                img = img.resize((size, size), resample=2)
            with atomic_path(output / f"{c:0{width}d}" / f"{j:03d}.png") as tmp:
                img.save(tmp, format="PNG")


if __name__ == "__main__":
    main(ARGS)
