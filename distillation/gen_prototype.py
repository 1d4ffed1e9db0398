"""Stage 1 of D4M: encode every training image with the SD VAE and cluster each class into `ipc` prototypes."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from d4m.data import DATASETS, class_count, resolve_prompts, train_dataset
from d4m.diffusion import batch_invariant, load_pipeline
from d4m.kmeans import METHODS, class_centres
from d4m.prototypes import FORMATS, Prototypes, check_json_prompts, prototype_filename, save_prototypes
from d4m.runtime import UsageError, cli, init_distributed, pick_device, seeded_generator
from scripts.pipeline_stable_diffusion_gen_latents import StableDiffusionGenLatentsPipeline


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch_size", type=int, default=10,
                        help="images per VAE call (batches never cross classes; 64 or more is faster on a GPU)")
    parser.add_argument("--data_dir", type=str, default=None, help="dataset root (train/ inside for ImageFolder sets)")
    parser.add_argument("--dataset", type=str, default="imagenet", choices=DATASETS)
    parser.add_argument("--diffusion_checkpoints_path", type=str, default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="local diffusers folder or hub id")
    parser.add_argument("--ipc", type=int, default=1, help="prototypes (k-means centres) per class")
    parser.add_argument("--km_expand", type=int, default=10, help="k-means mini-batch = km_expand * ipc latents")
    parser.add_argument("--kmeans", type=str, default="faithful", choices=METHODS,
                        help="faithful: the original's per-class MiniBatchKMeans fed km_expand*ipc latents at a time; "
                             "full: full-batch k-means (k-means++, Lloyd) on all of a class's latents, on --device")
    parser.add_argument("--label_file_path", type=str, default=None, help="one prompt per class, in class order")
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--save_prototype_path", type=str, default="outputs/prototypes")
    parser.add_argument("--size", type=int, default=512, help="images are resized to size x size before encoding")
    parser.add_argument("--device", type=str, default=None, help="cuda when present, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="seeds the class shuffles and the posterior samples")
    parser.add_argument("--prototype_format", type=str, default="safetensors", choices=FORMATS)
    args = parser.parse_args(argv)
    for name in ("batch_size", "ipc", "km_expand", "size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise UsageError(f"--num_workers must be 0 or more, got {args.num_workers}")
    return args


class ResizedImages(Dataset):
    """Items {image [3,size,size] in [0,1], index, error}; an unreadable file gives its error, not an exception,
    because exceptions raised in DataLoader workers reach the main process wrapped in a multi-line report."""

    def __init__(self, base: Dataset, size: int):
        self.base = base
        self.size = size
        self.transform = transforms.Compose([
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.ToTensor(),
        ])

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        try:
            image, _ = self.base[index]
            return {"image": self.transform(image), "index": index, "error": ""}
        except UsageError as err:
            return {"image": torch.zeros(3, self.size, self.size), "index": index, "error": str(err)}


def class_indices(targets: list[int], num_classes: int) -> list[list[int]]:
    members: list[list[int]] = [[] for _ in range(num_classes)]
    for index, label in enumerate(targets):
        members[int(label)].append(index)
    return members


def shuffled(indices: list[int], seed: int, label: int) -> list[int]:
    """A class's images in the order they are encoded: a permutation seeded by (seed, class) only."""
    order = torch.randperm(len(indices), generator=seeded_generator(seed, label)).tolist()
    return [indices[i] for i in order]


def class_batches(members: list[list[int]], classes: list[int], seed: int, batch_size: int) -> list[list[int]]:
    """Batches of dataset indices, class after class, never crossing a class boundary."""
    batches = []
    for label in classes:
        order = shuffled(members[label], seed, label)
        batches += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches


Clustered = dict[int, tuple[np.ndarray, float]]  # class -> (prototypes [ipc, 4, h, w], inertia)


def encoded_classes(pipe: StableDiffusionGenLatentsPipeline, loader: DataLoader, labels: dict[int, int],
                    seed: int, bar: tqdm) -> Iterator[tuple[int, torch.Tensor]]:
    """(class, all its latents [n, 4, h, w] in encoding order), each as soon as the class's last batch is encoded
    (the loader's batches come class after class)."""
    pending: list[torch.Tensor] = []
    current = -1
    for batch in loader:
        errors = [e for e in batch["error"] if e]
        if errors:
            raise UsageError(errors[0])
        indices = batch["index"].tolist()
        label = labels[indices[0]]
        if pending and label != current:
            yield current, torch.cat(pending)
            pending = []
        current = label
        generators = [seeded_generator(seed, label, i) for i in indices]
        pending.append(pipe(batch["image"], generator=generators).latents.float().cpu())
        bar.update()
    if pending:
        yield current, torch.cat(pending)


def encode_and_cluster(
    args: argparse.Namespace, data: Dataset, members: list[list[int]], classes: list[int], rank: int
) -> Clustered:
    """Prototypes and inertia of each class in `classes`: the VAE alone encodes batches of one class (loaded by
    workers, through pinned memory on CUDA), and a class is clustered once all its latents are in."""
    device = pick_device(args.device)
    pipe = load_pipeline(StableDiffusionGenLatentsPipeline, args.diffusion_checkpoints_path, device)
    batches = class_batches(members, classes, args.seed, args.batch_size)
    loader = DataLoader(ResizedImages(data, args.size), batch_sampler=batches, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")
    labels = {index: label for label in classes for index in members[label]}
    done: Clustered = {}
    # a closed bar (leave=False) erases itself, so an error that stops the loop stays the only line shown
    bar = tqdm(total=len(batches), desc="encoding", disable=rank != 0, leave=False)
    with batch_invariant(pipe, device), bar:
        for label, latents in encoded_classes(pipe, loader, labels, args.seed, bar):
            centres, score = class_centres(args.kmeans, latents.flatten(1), args.ipc, args.km_expand, args.seed,
                                           label, device)
            done[label] = centres.reshape(args.ipc, *latents.shape[1:]), score
    return done


def gather(local: dict, error: str, world: int) -> tuple[dict, str]:
    """Merge every rank's prototypes on rank 0; every rank learns the first error of any rank."""
    if world == 1:
        return local, error
    errors: list[str] = [""] * world
    dist.all_gather_object(errors, error)
    error = next((e for e in errors if e), "")
    if error:
        return {}, error
    parts = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    return ({k: v for part in parts for k, v in part.items()} if parts else {}), ""


@cli
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world = init_distributed()
    data = train_dataset(args.dataset, args.data_dir)
    num_classes = class_count(args.dataset, data)
    class_names = [str(name) for name in getattr(data, "classes", range(num_classes))]
    prompts = resolve_prompts(args.dataset, args.label_file_path, class_names)
    if args.prototype_format == "json":
        check_json_prompts(prompts)
    members = class_indices(data.targets, num_classes)
    small = [c for c, m in enumerate(members) if len(m) < args.ipc]
    if small:
        name, count = class_names[small[0]], len(members[small[0]])
        raise UsageError(f"class {name} has {count} images, fewer than --ipc {args.ipc}; lower --ipc or add images")
    name = prototype_filename(args.dataset, args.ipc, args.km_expand, args.prototype_format)
    out = Path(args.save_prototype_path) / name

    local, error = {}, ""
    try:
        local = encode_and_cluster(args, data, members, list(range(rank, num_classes, world)), rank)
    except UsageError as err:
        error = str(err)
    merged, error = gather(local, error, world)
    if error:
        raise UsageError(error)
    if rank == 0:
        tensor = torch.from_numpy(np.stack([merged[c][0] for c in range(num_classes)]))
        inertias = [float(f"{merged[c][1]:.8g}") for c in range(num_classes)]  # 8 digits: the same in every run
        mean = float(f"{np.mean(inertias):.8g}")
        metadata = dict(dataset=args.dataset, ipc=str(args.ipc), km_expand=str(args.km_expand), size=str(args.size),
                        seed=str(args.seed), class_names=json.dumps(class_names), kmeans=args.kmeans,
                        inertia=json.dumps(inertias), mean_inertia=str(mean))
        save_prototypes(out, Prototypes(prompts, tensor, metadata), args.prototype_format)
        print(f"wrote {num_classes} x {args.ipc} prototypes to {out}")
        print(f"k-means {args.kmeans}: mean per-class inertia {mean:.6g}")


if __name__ == "__main__":
    main()
