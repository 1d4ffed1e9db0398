"""Export a distilled set as a Hugging Face `datasets` image folder that others can load with its class names.

    python distillation/export_set.py outputs/syn/fashion_mnist_ipc10_10_s0.7_g8.0_kmexpand1 exported/fashion_mnist_d4m

SET is a folder written by distillation/gen_syn_image.py (stage 2) or distillation/sample_real.py: zero-padded
class folders of images, manifest.json (the settings it was made with) and classes.json (each class's name and
prompt). OUT holds the same files at the same paths, plus
  metadata.parquet  each image's file name and label, the label a ClassLabel of the class names in class order;
  README.md         the dataset card: features and class names in its YAML header (the hub's form), the method
                    and settings of manifest.json, the teacher, the seed and the command where recorded, the
                    classes, the citation of D4M.
`datasets.load_dataset("imagefolder", data_dir=OUT)` (or `load_dataset(OUT)`, or the hub repository OUT is uploaded
to) gives the images with `features["label"].names` the class names; `validate/evaluate.py --set NAME=OUT` trains
on OUT, or on a download of it, as on SET.

Refused in one line, with nothing written: a SET that is not a complete set (no manifest.json or classes.json,
class folders other than classes.json lists, a class with missing or unreadable images, images of another size
or prompts other than the manifest records), and an OUT that exists and is not empty.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from d4m.cli import ArgumentParser, UsageError, cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set", type=Path, help="the set's folder (stage 2's, or sample_real.py's)")
    parser.add_argument("out", type=Path, help="the folder to write (absent, or empty)")
    parser.add_argument("--title", default=None, help="the dataset card's title (default: the set folder's name)")
    args = parser.parse_args(argv)
    if not args.set.is_dir():
        raise UsageError(f"set {args.set} is not a folder; give a folder written by distillation/gen_syn_image.py or "
                         "distillation/sample_real.py")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise UsageError(f"{args.out} exists and is not empty; choose a new folder to export to")
    if args.out.resolve().is_relative_to(args.set.resolve()):
        raise UsageError(f"{args.out} lies inside the set {args.set}; export to a folder outside it")
    return args


if __name__ == "__main__":  # the flags are checked before torch and datasets load (seconds): --help answers at once
    ARGS = cli(parse_args)()

import json
import os
import shlex
import shutil
from dataclasses import dataclass

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from d4m.cli import first_line
from d4m.data import CLASS_LIST, IMAGE_ERRORS, ImageFolderDataset, check_same_classes, read_class_list
from d4m.outputs import MANIFEST, text_digest

METADATA = "metadata.parquet"
CARD = "README.md"
# the set's own records, copied beside the images (nothing else in SET is: no file that was not written by the chain)
RECORDS = (MANIFEST, CLASS_LIST, "selection.json")

SIZE_CATEGORIES = (("n<1K", 10**3), ("1K<n<10K", 10**4), ("10K<n<100K", 10**5), ("100K<n<1M", 10**6),
                   ("1M<n<10M", float("inf")))
CITATION = """@inproceedings{su2024d4m,
  title     = {D4M: Dataset Distillation via Disentangled Diffusion Model},
  author    = {Su, Duo and Hou, Junjie and Gao, Weizhi and Tian, Yingjie and Tang, Bowen},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2024}
}"""


@dataclass
class DistilledSet:
    """A complete set, as read and checked: its folder, manifest, class rows and images (paths relative to root,
    per class in ImageFolderDataset's order)."""

    root: Path
    manifest: dict
    names: list[str]
    prompts: list[str]
    folders: list[str]
    images: list[list[Path]]

    @property
    def size(self) -> int:
        return sum(len(files) for files in self.images)


def incomplete(root: Path, why: str, fix: str = "finish it with the command that made it, then export") -> UsageError:
    return UsageError(f"{root} is not a complete set: {why}; {fix}")


def read_set(root: str | Path) -> DistilledSet:
    """Read a set's folder and check that it is complete and matches its manifest.json and classes.json."""
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        manifest = None
    if not isinstance(manifest, dict):
        raise incomplete(root, f"it has no readable {MANIFEST} (the settings it was made with)",
                         "export a folder written by distillation/gen_syn_image.py or distillation/sample_real.py")
    rows = read_class_list(root)
    if rows is None:
        raise incomplete(root, f"it has no {CLASS_LIST} (the class names)", "rerun the command that made it")
    if [row.get("index") for row in rows] != list(range(len(rows))):
        raise incomplete(root, f"the rows of {CLASS_LIST} are not classes 0 to {len(rows) - 1} in order",
                         "regenerate the set")
    folders = [row["folder"] for row in rows]
    found = ImageFolderDataset(root)  # the classes and images as evaluate.py reads them (and will read the export)
    check_same_classes(folders, found.classes, f"{root} is not a complete set: {CLASS_LIST} lists other class "
                       "folders than it holds", "regenerate the set, or restore its class folders")
    names = [str(row["name"]) for row in rows]
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise incomplete(root, f"{CLASS_LIST} names two classes {twice!r}", "give every class its own name")
    images: list[list[Path]] = [[] for _ in folders]
    for path, label in found.samples:
        images[label].append(Path(path).relative_to(root))
    check_counts(root, manifest, folders, images)
    check_images(root, manifest, images)
    prompts = [str(row.get("prompt", name)) for row, name in zip(rows, names)]
    if "prompts" in manifest and manifest["prompts"] != text_digest("\n".join(prompts)):
        raise incomplete(root, f"the prompts of {CLASS_LIST} are not those {MANIFEST} records", "regenerate the set")
    return DistilledSet(root, manifest, names, prompts, folders, images)


def check_counts(root: Path, manifest: dict, folders: list[str], images: list[list[Path]]) -> None:
    """Every class holds the images per class the manifest records (else as many as the first class)."""
    ipc = manifest.get("ipc")
    expected = ipc if isinstance(ipc, int) else len(images[0])
    for folder, files in zip(folders, images):
        if len(files) != expected:
            where = f"{MANIFEST} records ipc {ipc}" if isinstance(ipc, int) else f"class folder {folders[0]} holds {expected}"
            count = f"{len(files)} image" + ("s" if len(files) != 1 else "")
            raise incomplete(root, f"class folder {folder} holds {count}, {where}")
        for path in files:
            try:
                path.as_posix().encode("utf-8")
            except UnicodeEncodeError:
                raise incomplete(root, f"image {os.fsencode(root / path)!r} is not named in UTF-8",
                                 "rename it") from None


def check_images(root: Path, manifest: dict, images: list[list[Path]]) -> None:
    """Every image decodes, at the size the manifest records (stage 2's image_size, sample_real's size)."""
    side = manifest.get("image_size", manifest.get("size"))
    for files in images:
        for path in files:
            try:
                with Image.open(root / path) as img:
                    img.load()
                    size = img.size
            except IMAGE_ERRORS as err:
                raise incomplete(root, f"image {root / path} cannot be read ({first_line(err)})",
                                 "regenerate the image with the command that made the set") from err
            if isinstance(side, int) and size != (side, side):
                raise incomplete(root, f"image {root / path} is {size[0]}x{size[1]} px, {MANIFEST} records {side}",
                                 "regenerate the image with the command that made the set")


GENERATORS = {  # the `method` a generator records in its manifest
    "d4m": "D4M (Su et al., CVPR 2024): Stable Diffusion img2img from each class's k-means prototypes of the VAE "
           "latents of the real images (stage 2, distillation/gen_syn_image.py)",
    "mgd3": "MGD3 (Chan-Santiago et al., ICML 2025): sampled from noise under each class's prompt, guided towards "
            "the class's k-means prototypes (distillation/gen_mgd3.py)",
    "d3hr": "D3HR (Zhao et al., ICML 2025): DDIM-inverted real latents, a Gaussian per class, the most representative "
            "group of samples decoded (distillation/gen_d3hr.py)",
}


def method(manifest: dict) -> str:
    """What made the set: the method its manifest records, else told from the settings it records."""
    name = manifest.get("method")
    if name is None and "strength" in manifest and "guidance_scale" in manifest:
        name = "d4m"  # stage 2 before manifests named their method
    if name is not None:
        text = GENERATORS.get(name, str(name))
        if "mode_guidance" in manifest:
            text += ", with mode guidance (MGD3, Chan-Santiago et al., ICML 2025)"
        if "candidates" in manifest:
            text += (f", keeping {manifest.get('select')} candidates of {manifest['candidates']} per image "
                     "(CaO2, Wang et al., arXiv 2506.22637)")
        return text
    if manifest.get("select") == "random":
        return "real training images drawn at random per class (the random-real baseline, distillation/sample_real.py)"
    if manifest.get("select") == "nearest":
        return ("the real training images nearest to each k-means prototype of stage 1 (the nearest-real baseline, "
                "distillation/sample_real.py)")
    return "not recorded"


def synthetic(manifest: dict) -> bool:
    return "method" in manifest or "strength" in manifest


def cell(value: object) -> str:
    """A value as one Markdown table cell."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def card_header(data: DistilledSet, title: str) -> dict:
    """The YAML header the hub reads: the features with the class names, the files of the one split."""
    extensions = sorted({path.suffix for files in data.images for path in files})
    return {
        "pretty_name": title,
        "task_categories": ["image-classification"],
        "tags": ["dataset-distillation", "synthetic" if synthetic(data.manifest) else "real-subset", "d4m"],
        "size_categories": [next(name for name, limit in SIZE_CATEGORIES if data.size < limit)],
        "dataset_info": {"features": [
            {"name": "image", "dtype": "image"},
            {"name": "label", "dtype": {"class_label": {"names": {str(c): name for c, name in enumerate(data.names)}}}},
        ]},
        "configs": [{"config_name": "default", "data_files": [
            {"split": "train", "path": [f"**/*{ext}" for ext in extensions] + [METADATA]}]}],
    }


def dataset_card(data: DistilledSet, title: str) -> str:
    """README.md: YAML header, then what the set is, how it was made, its classes and the citation."""
    m = data.manifest
    ipc = len(data.images[0])
    command = m.get("command")
    if isinstance(command, list):
        command = shlex.join(str(part) for part in command)
    teacher = m.get("teacher")
    lines = [
        "---", yaml.safe_dump(card_header(data, title), sort_keys=False, allow_unicode=True).rstrip(), "---", "",
        f"# {title}", "",
        ("A distilled training set" if synthetic(m) else "A training set of real images (a baseline for distilled "
         "sets)") + f": {data.size} images, {ipc} per class, of {len(data.names)} classes"
        + (f" ({m['dataset']})" if isinstance(m.get("dataset"), str) else "") + ".", "",
        "```python",
        "from datasets import load_dataset",
        'data = load_dataset("imagefolder", data_dir="FOLDER")["train"]  # or load_dataset("USER/REPO") from the hub',
        'data.features["label"].names  # the class names, in class order',
        "```", "",
        "The folder keeps the layout of the set as it was made (zero-padded class folders, `manifest.json`, "
        "`classes.json`), so the project that made it trains students on it as is: "
        "`python validate/evaluate.py --set NAME=FOLDER ...`.", "",
        "## How it was made", "",
        f"- Method: {method(m)}.",
        f"- Teacher: {cell(teacher) if teacher is not None else 'none recorded'}"
        + (" (its blake2b digest, or its torchvision architecture)" if teacher is not None else "") + ".",
        f"- Seed: {m['seed'] if 'seed' in m else 'not recorded'}.",
        f"- Command: `{command}`." if command else "- Command: not recorded.",
        "- Settings (`manifest.json`; digests are blake2b of the files, paths those of the machine that made it):", "",
        "| setting | value |", "| --- | --- |",
        *(f"| {cell(key)} | {cell(value)} |" for key, value in sorted(m.items())), "",
        "## Classes", "",
        "| label | folder | name | prompt |", "| --- | --- | --- | --- |",
        *(f"| {c} | {folder} | {cell(name)} | {cell(prompt)} |"
          for c, (folder, name, prompt) in enumerate(zip(data.folders, data.names, data.prompts))), "",
        "## Citation", "",
        "```bibtex", CITATION, "```", "",
    ]
    return "\n".join(lines)


def write_metadata(data: DistilledSet, path: Path) -> None:
    """metadata.parquet: file_name and label per image. Its schema carries the label's ClassLabel, which the image
    folder builder of `datasets` takes as the feature; a metadata.jsonl could only give plain strings or ints."""
    features = datasets.Features({"file_name": datasets.Value("string"), "label": datasets.ClassLabel(names=data.names)})
    files = [path.as_posix() for images in data.images for path in images]
    labels = [c for c, images in enumerate(data.images) for _ in images]
    pq.write_table(pa.table({"file_name": files, "label": labels}, schema=features.arrow_schema), path)


def export(data: DistilledSet, out: Path, title: str) -> None:
    """Write the export into a temporary folder beside OUT, renamed to OUT once complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for files in data.images:
            for path in files:
                (tmp / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(data.root / path, tmp / path)
        for name in RECORDS:
            if (data.root / name).is_file():
                shutil.copyfile(data.root / name, tmp / name)
        write_metadata(data, tmp / METADATA)
        (tmp / CARD).write_text(dataset_card(data, title), encoding="utf-8")
        try:
            os.rename(tmp, out)  # replaces an empty folder
        except OSError:
            if not out.is_dir() or not any(out.iterdir()):
                raise
            raise UsageError(f"{out} was filled by another process during the export; choose a new folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@cli
def main(args: argparse.Namespace) -> None:
    data = read_set(args.set)
    export(data, args.out, args.title or args.set.resolve().name)
    print(f"exported {data.size} images of {len(data.names)} classes to {args.out} "
          f'(load with datasets.load_dataset("imagefolder", data_dir="{args.out}"))')


if __name__ == "__main__":
    main(ARGS)
