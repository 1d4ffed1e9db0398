"""Train a teacher classifier from scratch on a real training set and write a teacher file.

The file (see d4m.models.save_teacher) carries the architecture, class count, input size and
normalisation, so that matching/generate_soft_label.py --teacher-path rebuilds and feeds it.

Example (the Fashion-MNIST teacher the repository carries):
    python matching/train_teacher.py --dataset fashion_mnist --data-dir /usr/share/datasets/fashion-mnist \
        -a convnet --epochs 2 --input-size 32 --output models/fashion_mnist/teacher_convnet.pt
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from d4m.cli import (ArgumentParser, UsageError, cli, non_negative_float, non_negative_int, positive_float,
                     positive_int, seed_int)

DATASET_CHOICES = ("cifar10", "cifar100", "tiny_imagenet", "fashion_mnist", "imagefolder")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=DATASET_CHOICES)
    p.add_argument("--data-dir", "--data_dir", required=True, help="dataset folder (ImageFolder datasets: the folder holding train/ and val/)")
    p.add_argument("-a", "--arch", default="convnet", help="torchvision classification model name, convnet or resnet18_modified")
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("-b", "--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=0.05, help="peak learning rate (SGD, momentum 0.9, cosine)")
    p.add_argument("--weight-decay", type=non_negative_float, default=5e-4)
    p.add_argument("--input-size", type=positive_int, default=None,
                   help="default: the dataset's native side; for image folders the side of most training images "
                        "(at most 224)")
    p.add_argument("--no-flip", action="store_true",
                   help="no horizontal flips (for sets where a mirror image is another class: digits, text)")
    p.add_argument("--output", required=True, help="teacher file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("-j", "--workers", type=non_negative_int, default=2)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


if __name__ == "__main__":  # the flags are checked before torch loads (seconds): --help answers at once
    ARGS = cli(parse_args)()

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

from d4m.data import (IMAGENET_MEAN, IMAGENET_STD, NATIVE_SIZE, ImageFolderDataset, check_same_classes, class_count,
                      train_dataset, val_dataset)
from d4m.device import announce, pick_device
from d4m.models import architectures, build_model, check_input_size, save_teacher
from d4m.views import image_sizes
from d4m.outputs import check_writable_file, exclusive
from d4m.runtime import Progress


# Up to this side, images are small-dataset images: pad-and-crop augmentation; above it, random-resized crops.
SMALL_INPUT = 64


def complete_args(args: argparse.Namespace) -> None:
    """The check and the default that need torchvision or the images."""
    if args.arch not in architectures():
        raise UsageError(f"unknown architecture {args.arch!r}; use a torchvision classification model name, convnet or resnet18_modified")
    args.input_size = args.input_size or NATIVE_SIZE.get(args.dataset) or folder_side(args.data_dir)


def folder_side(data_dir: str) -> int:
    """The side most of an image folder's training images have (the longer one), at most 224."""
    train = ImageFolderDataset(Path(data_dir) / "train")
    paths = [path for path, _ in train.samples[:: max(1, len(train.samples) // 200)]]
    sides = [max(h, w) for h, w in image_sizes(paths)]
    return min(224, max(set(sides), key=sides.count))


def transforms_for(input_size: int, flip: bool = True):
    """(training augmentation, evaluation transform), both normalised with ImageNet mean/std."""
    finish = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    flips = [T.RandomHorizontalFlip()] if flip else []
    if input_size <= SMALL_INPUT:
        train = [T.Resize((input_size, input_size)), T.RandomCrop(input_size, padding=input_size // 8), *flips]
        test = [T.Resize((input_size, input_size))]
    else:
        train = [T.RandomResizedCrop(input_size), *flips]
        test = [T.Resize(int(round(input_size / 0.875))), T.CenterCrop(input_size)]
    return T.Compose(train + finish), T.Compose(test + finish)


def loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader, list[str]]:
    """Training and validation loaders, and the class names in index order."""
    train_tf, test_tf = transforms_for(args.input_size, flip=not args.no_flip)
    train_set: Dataset = train_dataset(args.dataset, args.data_dir, train_tf)
    val_set: Dataset = val_dataset(args.dataset, args.data_dir, test_tf)
    num_classes = class_count(args.dataset, train_set)
    class_names = [str(name) for name in getattr(train_set, "classes", range(num_classes))]
    check_same_classes(class_names, getattr(val_set, "classes", class_names),
                       f"{args.data_dir}: the validation split's classes are not the training split's",
                       "give both the same class folders")
    gen = torch.Generator().manual_seed(args.seed)
    common = dict(batch_size=args.batch_size, num_workers=args.workers, persistent_workers=args.workers > 0)
    return (DataLoader(train_set, shuffle=True, drop_last=len(train_set) > args.batch_size, generator=gen, **common),
            DataLoader(val_set, shuffle=False, **common), class_names)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy (%) on a loader."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    return 100.0 * correct / max(1, total)


def train_epoch(model, loader, opt, sched, device, epoch: int) -> float:
    model.train()
    bar = Progress(loader, f"epoch {epoch}", leave=False, unit="batches")
    running = 0.0
    for x, y in bar:
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        if not torch.isfinite(loss):
            raise UsageError(f"loss became {loss.item()} in epoch {epoch}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = 0.9 * running + 0.1 * loss.item() if running else loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
    return running


def make_optimizer(model: nn.Module, args: argparse.Namespace, steps: int):
    """SGD with momentum and a per-step cosine schedule after a short linear warm-up."""
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    warmup = min(200, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train(args: argparse.Namespace, model: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
          class_names: list[str], device: torch.device) -> None:
    opt, sched = make_optimizer(model, args, args.epochs * len(train_loader))
    start = time.time()
    top1 = 0.0
    for epoch in range(args.epochs):
        loss = train_epoch(model, train_loader, opt, sched, device, epoch)
        top1 = evaluate(model, val_loader, device)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {loss:.4f}, val top-1 {top1:.2f}% ({time.time() - start:.0f} s)")
    save_teacher(args.output, model, args.arch, len(class_names), args.input_size,
                 dataset=args.dataset, top1=top1, epochs=args.epochs, classes=class_names)
    print(f"final val top-1 {top1:.2f}%; wrote {args.output}")


@cli
def main(args: argparse.Namespace) -> None:
    complete_args(args)
    device = pick_device(args.device)
    announce("teacher training", device, "float32", 1, 0, f"{args.arch} at {args.input_size} px")
    output = Path(args.output)
    check_writable_file(output, "--output")
    with exclusive(output.with_name(f".{output.name}.lock"), f"teacher file {output}"):
        if output.exists() and not args.overwrite:
            raise UsageError(f"{output} exists; pass --overwrite to replace it, or choose another --output")
        torch.manual_seed(args.seed)
        train_loader, val_loader, class_names = loaders(args)
        model = build_model(args.arch, len(class_names), args.input_size)
        check_input_size(model, args.arch, args.input_size)
        train(args, model.to(device), train_loader, val_loader, class_names, device)


if __name__ == "__main__":
    main(ARGS)
