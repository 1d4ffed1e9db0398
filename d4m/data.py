"""Datasets and label prompts: every dataset the launchers name, read from local folders only."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from d4m import jsonfile
from d4m.cli import DATASETS, UsageError, first_line, printable
from d4m.outputs import atomic_path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT_DIR = REPO_ROOT / "distillation" / "label-prompt"

NUM_CLASSES = {"imagenet": 1000, "tiny_imagenet": 200, "cifar10": 10, "cifar100": 100, "fashion_mnist": 10}
# The side of the dataset's own images: what a classifier of that dataset is trained and tested at.
NATIVE_SIZE = {"imagenet": 224, "tiny_imagenet": 64, "cifar10": 32, "cifar100": 32, "fashion_mnist": 32}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_prompt_file(dataset: str) -> Optional[Path]:
    path = PROMPT_DIR / f"{dataset}.txt"
    return path if path.exists() else None


def load_prompts(path: str | Path, num_classes: Optional[int] = None) -> list[str]:
    """One prompt per line, in class-index order; the count must match the dataset's classes."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"label file {path} does not exist; pass --label_file_path with one prompt per class")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"label file {path} is not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at "
                         f"offset {err.start}); save it as UTF-8") from err
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if num_classes is not None and len(prompts) != num_classes:
        raise UsageError(
            f"label file {path} has {len(prompts)} prompts but the dataset has {num_classes} classes; "
            "give one line per class, in class-index order"
        )
    return prompts


def resolve_prompts(dataset: str, label_file: Optional[str], class_names: list[str]) -> list[str]:
    """The prompts of a dataset: the given file, else the shipped one, else the class-folder names. A prompt file
    whose prompts do not name the classes (where the names are words to look for) is refused."""
    if label_file:
        prompts = load_prompts(label_file, len(class_names))
    elif default_prompt_file(dataset) is not None and dataset != "imagefolder":
        label_file, prompts = default_prompt_file(dataset), load_prompts(default_prompt_file(dataset), len(class_names))
    else:
        return [name.replace("_", " ") for name in class_names]
    check_prompts_name_classes(class_names, prompts, label_file)
    return prompts


def check_prompts_name_classes(class_names: list[str], prompts: list[str], label_file) -> None:
    """Where class names are words (not WordNet ids like n01440764, not numbers), most prompts must contain their
    class's name: a prompt file made for another dataset is refused rather than drawn from for hours."""
    words = [name.replace("_", " ").lower() for name in class_names if not re.fullmatch(r"n\d{8}|\d+", name)]
    if len(words) < len(class_names):
        return
    naming = [word in prompt.lower() for word, prompt in zip(words, prompts)]
    if sum(naming) < len(naming) / 2:
        c = naming.index(False)
        raise UsageError(f"the prompts of {label_file} do not name this dataset's classes (class {c} is "
                         f"{class_names[c]!r}, its prompt {prompts[c]!r}); give the prompt file made for these "
                         "classes, or none to use the class-folder names")


def describe_prompts(class_names: list[str], prompts: list[str], shown: int = 3) -> str:
    """The first classes and their prompts, for the start of a stage."""
    pairs = ", ".join(f"{printable(name)} -> {prompt!r}" for name, prompt in list(zip(class_names, prompts))[:shown])
    return f"classes and prompts: {pairs}" + (f", ... ({len(prompts)} classes)" if len(prompts) > shown else "")


CLASS_LIST = "classes.json"


def write_class_list(folder: str | Path, names: list[str], prompts: list[str]) -> None:
    """Record, beside a set's class folders, what each folder is: index, real class name and prompt (`classes.json`),
    so that later stages can check the class order against a teacher's."""
    width = len(str(len(names) - 1))
    rows = [{"index": c, "folder": f"{c:0{width}d}", "name": name, "prompt": prompt}
            for c, (name, prompt) in enumerate(zip(names, prompts))]
    with atomic_path(Path(folder) / CLASS_LIST) as tmp:
        tmp.write_text(json.dumps({"classes": rows}, indent=1), encoding="utf-8")


def read_class_list(folder: str | Path) -> Optional[list[dict]]:
    """The rows of a set's classes.json (None when it has none); a damaged one is one line naming it."""
    path = Path(folder) / CLASS_LIST
    if not path.is_file():
        return None
    try:
        rows = jsonfile.read(path)["classes"]
        if not all(isinstance(row, dict) and isinstance(row.get("folder"), str) and "name" in row for row in rows):
            raise ValueError("a row without its folder and name")
    except (ValueError, KeyError, TypeError) as err:  # not JSON, not UTF-8, too deep, or not a class list
        raise UsageError(f"{path} is damaged ({first_line(err)}); regenerate the set, or remove {CLASS_LIST}") from None
    return rows


def check_same_classes(expected: Sequence, found: Sequence, what: str, fix: str) -> None:
    """Two class lists that must be equal; one line naming the first class where they differ."""
    expected, found = [str(c) for c in expected], [str(c) for c in found]
    if expected != found:
        first = next((i for i, (a, b) in enumerate(zip(expected, found)) if a != b), min(len(expected), len(found)))
        there = expected[first] if first < len(expected) else "none"
        here = found[first] if first < len(found) else "none"
        raise UsageError(f"{what} (class {first}: {there!r} there, {here!r} here); {fix}")


def load_rgb(path: str | Path) -> Image.Image:
    """Any image as 8-bit RGB: grey, palette and alpha images converted, 16-bit ones scaled (not clipped)."""
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):  # 16-bit grey (I;16*), or 32-bit integers holding 8 or 16 bits
                pixels = np.asarray(img, dtype=np.float64)
                sixteen_bit = img.mode.startswith("I;16") or pixels.max() > 255
                img = Image.fromarray(np.clip(pixels / 257.0 if sixteen_bit else pixels, 0, 255)
                                      .round().astype(np.uint8))
            return img.convert("RGB")
    except IMAGE_ERRORS as err:
        raise UsageError(image_error(path, err)) from err


# what PIL raises for a file that is no image, a damaged one, or one whose header claims more pixels than it opens
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def image_error(path: str | Path, err: Exception) -> str:
    """The one line for an image that cannot be read."""
    if isinstance(err, Image.DecompressionBombError):
        return (f"image {path} claims more pixels than PIL opens safely ({first_line(err)}); a decompression bomb "
                "or a damaged header: replace or remove the file")
    return f"cannot read image {path}: {err}; replace or remove the file"


def check_images(data: Dataset, indices: Iterable[int] | None = None) -> None:
    """Decode every image of `data` (those at `indices`) held in a file, on up to 8 threads, so that one a later
    step would fail on is refused (one line naming it) before the work rather than after. Sets held in memory
    (CIFAR, Fashion-MNIST) were checked when they were read."""
    samples = getattr(data, "samples", None)
    if samples is None:
        return
    paths = [samples[i][0] for i in (range(len(samples)) if indices is None else indices)]
    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
    try:
        for _ in pool.map(_decode, paths):
            pass
    finally:
        pool.shutdown(cancel_futures=True)  # a refusal waits for the images being decoded, not for the rest


def _decode(path: str) -> None:
    load_rgb(path)


def check_class_names(root: Path, classes: list[str]) -> None:
    """Class folder names are class names, written to classes.json and printed: they must be UTF-8 text (an
    image's file name need not be)."""
    for name in classes:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"class folder {os.fsencode(name)!r} in {root} is not named in UTF-8; rename it") from None


class ImageFolderDataset(Dataset):
    """Class folders of images, classes in sorted folder order (torchvision's ImageFolder layout). Hidden folders
    are no classes: a set downloaded from the Hugging Face hub holds .cache/ (huggingface_hub) or .git/."""

    EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif"}

    def __init__(self, root: str | Path, transform: Optional[Callable] = None):
        root = Path(root)
        if not root.is_dir():
            raise UsageError(f"image folder {root} does not exist")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise UsageError(f"image folder {root} has no class folders; expected {root}/<class>/<image>")
        check_class_names(root, self.classes)
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in self.EXTENSIONS)
            if not files:
                raise UsageError(f"class folder {root / name} holds no images; add images or remove the folder")
            self.samples += [(str(p), label) for p in files]
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        img = load_rgb(path)
        return (self.transform(img) if self.transform else img), label


class TinyImageNetVal(Dataset):
    """Tiny-ImageNet's validation split as shipped: flat images plus val_annotations.txt."""

    def __init__(self, root: str | Path, classes: list[str], transform: Optional[Callable] = None):
        root = Path(root)
        annotations = root / "val_annotations.txt"
        index = {name: i for i, name in enumerate(classes)}
        try:
            lines = annotations.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise UsageError(f"{annotations} is not UTF-8 text (byte at offset {err.start}); restore the file "
                             "shipped with Tiny-ImageNet") from err
        self.samples = []
        for number, line in enumerate(lines, 1):
            fields = line.split("\t")
            if len(fields) < 2:
                continue
            if fields[1] not in index:
                raise UsageError(f"{annotations}, line {number}: class {fields[1]!r} has no folder in train/; "
                                 "train/ and val/ must hold the same classes")
            self.samples.append((str(root / "images" / fields[0]), index[fields[1]]))
        self.targets = [label for _, label in self.samples]
        self.classes = classes
        self.transform = transform

    __len__ = ImageFolderDataset.__len__
    __getitem__ = ImageFolderDataset.__getitem__


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files, served as 3-channel 32 px PIL images."""

    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

    def __init__(self, root: str | Path, train: bool, transform: Optional[Callable] = None):
        prefix = "train" if train else "t10k"
        self.images = _read_idx(_find_idx(Path(root), f"{prefix}-images-idx3-ubyte"))
        self.targets = _read_idx(_find_idx(Path(root), f"{prefix}-labels-idx1-ubyte")).astype(np.int64).tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index]).resize((32, 32), Image.BILINEAR).convert("RGB")
        return (self.transform(img) if self.transform else img), self.targets[index]


def _find_idx(root: Path, stem: str) -> Path:
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise UsageError(f"Fashion-MNIST file {stem}(.gz) not found under {root}; run setup.sh or pass --data_dir")


@dataclass(frozen=True)
class CifarLayout:
    """Where torchvision's python version of a CIFAR set keeps its pickles, and the keys inside them."""

    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: str
    labels_key: str

    def describe(self) -> str:
        return f"{self.folder}/ with {', '.join(self.train_files + self.test_files)} and {self.meta_file}"


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                           "batches.meta", "label_names", "labels"),
    "cifar100": CifarLayout("cifar-100-python", ("train",), ("test",), "meta", "fine_label_names", "fine_labels"),
}


class CifarUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR's files hold (dicts, lists, strings, bytes, numpy arrays) and refuses every other
    class or function, so that a crafted file in a data folder cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which CIFAR's files never hold")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path, dataset: str, root: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"{dataset} file {path} not found; expected {root}/{CIFAR_LAYOUTS[dataset].describe()} "
                         "(the python version that torchvision downloads)")
    try:
        with open(path, "rb") as f:
            return CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise UsageError(f"cannot read {dataset} file {path}: {err}; replace it with the file torchvision "
                         "downloads") from err


class Cifar(Dataset):
    """CIFAR-10 or CIFAR-100 from the pickles of torchvision's layout, without checking their md5 sums.

    `.data` is uint8 [N, 32, 32, 3], `.targets` the labels (fine labels for CIFAR-100), `.classes` the label
    names of the meta file; items are (PIL RGB image, label), the image passed through `transform` if given."""

    def __init__(self, dataset: str, root: str | Path, train: bool, transform: Optional[Callable] = None):
        layout = CIFAR_LAYOUTS[dataset]
        root = Path(root)
        batches = [_read_cifar_pickle(root / layout.folder / name, dataset, root)
                   for name in (layout.train_files if train else layout.test_files)]
        meta = _read_cifar_pickle(root / layout.folder / layout.meta_file, dataset, root)
        try:
            images = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
            self.targets = [int(label) for b in batches for label in b[layout.labels_key]]
            self.classes = [str(name) for name in meta[layout.names_key]]
        except KeyError as err:
            raise UsageError(f"{dataset} files under {root / layout.folder} lack the key {err}; "
                             f"expected torchvision's python version of {dataset}") from err
        if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or len(images) != len(self.targets):
            raise UsageError(f"{dataset} files under {root / layout.folder} hold images of shape {images.shape} and "
                             f"{len(self.targets)} labels; expected [N, 3072] and N labels")
        self.data = np.ascontiguousarray(images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index])
        return (self.transform(img) if self.transform else img), self.targets[index]


def train_dataset(dataset: str, data_dir: str, transform: Optional[Callable] = None) -> Dataset:
    """The real training split; items are (image, label) and the set has `.targets` and `.classes`."""
    if not data_dir or not Path(data_dir).is_dir():
        raise UsageError(f"data folder {data_dir!r} does not exist; pass --data_dir")
    if dataset in ("cifar10", "cifar100"):
        return Cifar(dataset, data_dir, train=True, transform=transform)
    if dataset == "fashion_mnist":
        return FashionMNIST(data_dir, train=True, transform=transform)
    if dataset in ("imagenet", "tiny_imagenet", "imagefolder"):
        return ImageFolderDataset(Path(data_dir) / "train", transform)
    raise UsageError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def val_dataset(dataset: str, data_dir: str, transform: Optional[Callable] = None,
                val_dir: str | None = None) -> Dataset:
    """The real validation/test split used to report accuracy: the ImageFolder `val_dir` when given, else the
    dataset's own."""
    if val_dir:
        return ImageFolderDataset(val_dir, transform)
    if not data_dir or not Path(data_dir).is_dir():
        raise UsageError(f"data folder {data_dir!r} does not exist; pass the dataset's folder")
    if dataset in ("cifar10", "cifar100"):
        return Cifar(dataset, data_dir, train=False, transform=transform)
    if dataset == "fashion_mnist":
        return FashionMNIST(data_dir, train=False, transform=transform)
    val = Path(data_dir) / "val"
    if dataset == "tiny_imagenet" and (val / "val_annotations.txt").is_file():
        classes = sorted(d.name for d in (Path(data_dir) / "train").iterdir() if d.is_dir())
        return TinyImageNetVal(val, classes, transform)
    if dataset in ("imagenet", "tiny_imagenet", "imagefolder"):
        return ImageFolderDataset(val, transform)
    raise UsageError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def class_count(dataset: str, data: Dataset) -> int:
    return NUM_CLASSES.get(dataset) or len(data.classes)
