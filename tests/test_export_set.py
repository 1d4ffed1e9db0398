"""distillation/export_set.py: a set as a Hugging Face `datasets` image folder, loaded back with its class names,
and read by evaluate.py as the set itself."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from datasets.info import DatasetInfosDict
from huggingface_hub import DatasetCard
from PIL import Image

from conftest import make_image_folder, one_error_line, run_script
from dataset_files import write_fashion_mnist
from d4m.data import ImageFolderDataset, read_class_list

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = "distillation/export_set.py"


@pytest.fixture
def stage2_set(tiny_sd, tmp_path) -> Path:
    """A real stage-2 set: prototypes of a 3-class image folder, 2 images per class synthesised from them."""
    data = make_image_folder(tmp_path / "data")
    assert run_script("distillation/gen_prototype.py", [
        "--dataset", "imagefolder", "--data_dir", data, "--diffusion_checkpoints_path", tiny_sd, "--size", 32,
        "--ipc", 1, "--km_expand", 1, "--batch_size", 6, "--num_workers", 0, "--save_prototype_path",
        tmp_path / "protos", "--device", "cpu"]) == 0
    assert run_script("distillation/gen_syn_image.py", [
        "--dataset", "imagefolder", "--prototype_path", tmp_path / "protos" / "data-ipc1-kmexpand1.safetensors",
        "--diffusion_checkpoints_path", tiny_sd, "--ipc", 2, "--km_expand", 1, "--image_size", 32,
        "--num_inference_steps", 4, "--batch_size", 6, "--save_init_image_path", tmp_path / "syn", "--device",
        "cpu"]) == 0
    (root,) = (tmp_path / "syn").iterdir()
    return root


@pytest.fixture
def fashion_set(tmp_path) -> Path:
    """The random-real baseline of a tiny Fashion-MNIST: class names whose sorted order is not class order, one of
    them with a '/' ("T-shirt/top"), which no folder name can hold."""
    data = write_fashion_mnist(tmp_path / "fashion", per_class=3)
    assert run_script("distillation/sample_real.py", ["--dataset", "fashion_mnist", "--data_dir", data, "--ipc", 2,
                                                      "--seed", 3, "--output", tmp_path / "real"]) == 0
    return tmp_path / "real"


def load(folder: Path, cache: Path, as_imagefolder: bool) -> datasets.Dataset:
    if as_imagefolder:
        return datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(cache))["train"]
    return datasets.load_dataset(str(folder), cache_dir=str(cache))["train"]  # as from the hub: the card's configs


@pytest.mark.parametrize("which", ["stage2_set", "fashion_set"])
def test_export_loads_with_datasets_as_the_same_images_labels_and_classes(which, request, tmp_path):
    root = request.getfixturevalue(which)
    out = tmp_path / "exported"
    assert run_script(SCRIPT, [root, out]) == 0
    names = [row["name"] for row in read_class_list(root)]
    if which == "fashion_set":
        assert names[0] == "T-shirt/top" and names != sorted(names)
    original = ImageFolderDataset(root)
    for as_imagefolder in (True, False):
        loaded = load(out, tmp_path / "cache", as_imagefolder)
        assert loaded.features["label"].names == names
        assert len(loaded) == len(original.samples) == (6 if which == "stage2_set" else 20)
        for row, (path, label) in zip(loaded, original.samples):
            assert row["label"] == label
            with Image.open(path) as img:
                assert np.array_equal(np.asarray(row["image"]), np.asarray(img))
    card = DatasetCard.load(out / "README.md")
    infos = DatasetInfosDict.from_dataset_card_data(card.data)
    assert infos["default"].features["label"].names == names
    manifest = json.loads((root / "manifest.json").read_text())
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert f"- Seed: {manifest['seed']}." in card.text and "Su, Duo" in card.text and "(CVPR)" in card.text
    method = "D4M (Su et al., CVPR 2024)" if which == "stage2_set" else "random-real baseline"
    assert method in card.text.split("- Method:")[1].splitlines()[0]
    row = "| 0 | 0 | T-shirt/top | t-shirt |" if which == "fashion_set" else "| 2 | 2 | class2 | class2 |"
    assert row in card.text


def test_the_card_records_teacher_and_command_where_the_manifest_does(fashion_set, tmp_path):
    manifest = json.loads((fashion_set / "manifest.json").read_text())
    manifest.update(method="d4m", teacher="0123abcd", command=["python", "distillation/gen_syn_image.py", "--seed", "3"],
                    candidates=4, select="diverse")
    (fashion_set / "manifest.json").write_text(json.dumps(manifest))
    assert run_script(SCRIPT, [fashion_set, tmp_path / "out", "--title", "Fashion | D4M"]) == 0
    text = (tmp_path / "out" / "README.md").read_text()
    assert "- Teacher: 0123abcd (" in text and "- Command: `python distillation/gen_syn_image.py --seed 3`." in text
    assert "keeping diverse candidates of 4 per image" in text and "# Fashion | D4M" in text
    assert "pretty_name: Fashion | D4M" in text


def test_class_names_that_yaml_or_markdown_would_misread_survive(fashion_set, tmp_path):
    names = ["yes", "null", "1", "a: b", "# c", "'q'", '"d" \\ e', "é ü", "x | y", "- z"]
    classes = json.loads((fashion_set / "classes.json").read_text())
    for row, name in zip(classes["classes"], names):
        row["name"] = name
    (fashion_set / "classes.json").write_text(json.dumps(classes))
    out = tmp_path / "out"
    assert run_script(SCRIPT, [fashion_set, out]) == 0
    card = DatasetCard.load(out / "README.md")
    assert DatasetInfosDict.from_dataset_card_data(card.data)["default"].features["label"].names == names
    assert load(out, tmp_path / "cache", as_imagefolder=True).features["label"].names == names
    assert "| 8 | 8 | x \\| y | bag |" in card.text


def test_evaluate_reads_the_export_and_a_download_of_it_as_the_set(stage2_set, tmp_path):
    out = tmp_path / "exported"
    assert run_script(SCRIPT, [stage2_set, out]) == 0
    # what `hf download --local-dir` and `git clone` leave beside the files
    (out / ".cache" / "huggingface" / "download" / "0").mkdir(parents=True)
    (out / ".cache" / "huggingface" / "download" / "0" / "0.png.metadata").write_text("abc\n")
    (out / ".git" / "objects").mkdir(parents=True)
    (out / ".gitattributes").write_text("*.png filter=lfs\n")
    for a, b in ((stage2_set, out), (out, out)):
        theirs, ours = ImageFolderDataset(stage2_set), ImageFolderDataset(b)
        assert ours.classes == theirs.classes
        assert [(Path(p).relative_to(b), label) for p, label in ours.samples] == \
               [(Path(p).relative_to(stage2_set), label) for p, label in theirs.samples]
        assert [Path(p).read_bytes() for p, _ in ours.samples] == [Path(p).read_bytes() for p, _ in theirs.samples]
    assert read_class_list(out) == read_class_list(stage2_set)


def test_evaluate_trains_on_the_export_as_on_the_set(stage2_set, tmp_path):
    out = tmp_path / "exported"
    assert run_script(SCRIPT, [stage2_set, out]) == 0
    data = make_image_folder(tmp_path / "real")
    assert run_script("validate/evaluate.py", [
        "--set", f"made={stage2_set}", "--set", f"exported={out}", "--data-dir", data, "--protocols", "hard",
        "--models", "convnet", "--epochs", 2, "--batch-size", 3, "--input-size", 32, "-j", 0, "--device", "cpu",
        "--score-per-class", 0, "--output", tmp_path / "eval"]) == 0
    rows = {row["method"]: row for row in json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]}
    assert rows["made"]["runs"] == rows["exported"]["runs"] and rows["made"]["ipc"] == 2


def refusals() -> dict:
    """{message: a function that breaks a copy of the set, or a second argument}"""
    def remove_image(copy: Path):
        next(copy.glob("1/*.png")).unlink()

    def remove(name: str):
        return lambda copy: (copy / name).unlink()

    def extra_class(copy: Path):
        shutil.copytree(copy / "2", copy / "3")

    def edit_manifest(**changes):
        def edit(copy: Path):
            manifest = json.loads((copy / "manifest.json").read_text())
            (copy / "manifest.json").write_text(json.dumps({**manifest, **changes}))
        return edit

    def same_names(copy: Path):
        classes = json.loads((copy / "classes.json").read_text())
        classes["classes"][2]["name"] = classes["classes"][0]["name"]
        (copy / "classes.json").write_text(json.dumps(classes))

    def damage_image(copy: Path):
        next(copy.glob("0/*.png")).write_bytes(b"\x89PNG\r\n\x1a\n broken")

    return {
        "class folder 1 holds 1 image, manifest.json records ipc 2": remove_image,
        "it has no readable manifest.json": remove("manifest.json"),
        "it has no classes.json": remove("classes.json"),
        "classes.json lists other class folders than it holds (class 3: 'none' there, '3' here)": extra_class,
        "class folder 0 holds 2 images, manifest.json records ipc 3": edit_manifest(ipc=3),
        "is 32x32 px, manifest.json records 64": edit_manifest(image_size=64),
        "the prompts of classes.json are not those manifest.json records": edit_manifest(prompts="0" * 32),
        "0.png cannot be read (": damage_image,
        "classes.json names two classes 'class0'": same_names,
    }


def test_an_incomplete_set_is_refused_in_one_line_with_nothing_written(stage2_set, tmp_path, capsys):
    for k, (message, breaks) in enumerate(refusals().items()):
        copy = tmp_path / f"broken{k}"
        shutil.copytree(stage2_set, copy)
        breaks(copy)
        capsys.readouterr()
        assert run_script(SCRIPT, [copy, tmp_path / f"out{k}"]) == 2, message
        line = one_error_line(capsys)
        assert f"{copy} is not a complete set" in line and message in line, line
        assert not (tmp_path / f"out{k}").exists()
    assert not list(tmp_path.glob(".*export*"))  # no temporary folder left behind


def test_a_used_output_or_one_inside_the_set_is_refused(stage2_set, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine\n")
    cases = {tmp_path / "full": "exists and is not empty", stage2_set / "export": "lies inside the set",
             tmp_path / "nowhere": None}
    for out, message in cases.items():
        capsys.readouterr()
        argv = [tmp_path / "no-set", out] if message is None else [stage2_set, out]
        assert run_script(SCRIPT, argv) == 2
        line = one_error_line(capsys)
        assert (message or "is not a folder") in line, line
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["notes.txt"]
    assert not (stage2_set / "export").exists() and not (tmp_path / "nowhere").exists()
    (tmp_path / "empty").mkdir()  # an empty folder is taken
    assert run_script(SCRIPT, [stage2_set, tmp_path / "empty"]) == 0
    assert (tmp_path / "empty" / "metadata.parquet").is_file()
