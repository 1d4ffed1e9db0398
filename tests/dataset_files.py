"""Tiny copies of each dataset, written in that dataset's real on-disk format (what d4m.data reads)."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def class_images(classes: int, per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [classes*per_class, size, size, 3], labels): noisy images whose colour depends on the class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    colours = rng.integers(0, 256, (classes, 3))
    images = colours[labels][:, None, None, :] + rng.normal(0, 30, (len(labels), size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


PROMPTS = Path(__file__).resolve().parent.parent / "distillation" / "label-prompt"


def real_names(dataset: str) -> list[str]:
    """The dataset's own class names, as its files spell them (CIFAR-100's with underscores: aquarium_fish)."""
    return [line.strip().replace(" ", "_") for line in (PROMPTS / f"{dataset}.txt").read_text().splitlines()]


def fake_wnids(classes: int) -> list[str]:
    """WordNet-id-shaped folder names whose sorted order is their index order."""
    return [f"n{index:08d}" for index in range(classes)]


def write_imagenet(root: Path, classes: int = 1000, size: int = 16) -> Path:
    """root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG, one image per class and split."""
    wnids = fake_wnids(classes)
    for split, seed in (("train", 0), ("val", 1)):
        images, labels = class_images(classes, 1, size, seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / wnids[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{wnids[label]}_{i}.JPEG")
    return root


def write_tiny_imagenet(root: Path, classes: int = 200, size: int = 16) -> Path:
    """Tiny-ImageNet as shipped: train/<wnid>/images/*.JPEG with a boxes file, and a flat val/images/ folder
    labelled by val/val_annotations.txt (one image per class and split)."""
    wnids = fake_wnids(classes)
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    images, labels = class_images(classes, 1, size, seed=0)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / "train" / wnids[label]
        (folder / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / "images" / f"{wnids[label]}_{i}.JPEG")
        (folder / f"{wnids[label]}_boxes.txt").write_text(f"{wnids[label]}_{i}.JPEG\t0\t0\t{size - 1}\t{size - 1}\n")
    images, labels = class_images(classes, 1, size, seed=1)
    (root / "val" / "images").mkdir(parents=True, exist_ok=True)
    # shuffled, as in the shipped file: the annotations, not the file order, give the labels
    order = np.random.default_rng(2).permutation(len(labels))
    rows = []
    for i in order:
        Image.fromarray(images[i]).save(root / "val" / "images" / f"val_{i}.JPEG")
        rows.append(f"val_{i}.JPEG\t{wnids[labels[i]]}\t0\t0\t{size - 1}\t{size - 1}\n")
    (root / "val" / "val_annotations.txt").write_text("".join(rows))
    return root


def _dump(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """[N, 32, 32, 3] to the pickles' rows of 3072 bytes: the red plane, then green, then blue."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_cifar10(root: Path, per_class: int = 1, test_per_class: int = 1) -> Path:
    """root/cifar-10-batches-py/: data_batch_1..5 (the training images dealt round-robin), test_batch, batches.meta."""
    folder = root / "cifar-10-batches-py"
    names = real_names("cifar10")
    images, labels = class_images(10, per_class, 32, seed=0)
    for b in range(5):
        _dump(folder / f"data_batch_{b + 1}", {"batch_label": f"training batch {b + 1} of 5",
                                               "data": _cifar_rows(images[b::5]), "labels": labels[b::5].tolist()})
    images, labels = class_images(10, test_per_class, 32, seed=1)
    _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "data": _cifar_rows(images),
                                  "labels": labels.tolist()})
    _dump(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": len(labels), "num_vis": 3072})
    return root


def write_cifar100(root: Path, per_class: int = 1, test_per_class: int = 1) -> Path:
    """root/cifar-100-python/: train, test (fine and coarse labels) and meta."""
    folder = root / "cifar-100-python"
    for split, count, seed in (("train", per_class, 0), ("test", test_per_class, 1)):
        images, labels = class_images(100, count, 32, seed)
        _dump(folder / split, {"data": _cifar_rows(images), "fine_labels": labels.tolist(),
                               "coarse_labels": (labels // 5).tolist()})
    _dump(folder / "meta", {"fine_label_names": real_names("cifar100"),
                            "coarse_label_names": [f"coarse {c}" for c in range(20)]})
    return root


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(root: Path, per_class: int = 1, test_per_class: int = 1) -> Path:
    """The four gzipped IDX files of Fashion-MNIST (28 px greyscale)."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, count, seed in (("train", per_class, 0), ("t10k", test_per_class, 1)):
        images, labels = class_images(10, count, 28, seed)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[..., 0])
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root
