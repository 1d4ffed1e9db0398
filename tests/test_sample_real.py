"""distillation/sample_real.py: the random-real and nearest-real baselines, for any dataset."""
from __future__ import annotations


import pytest
import torch
from PIL import Image

from conftest import run_script
from d4m.data import ImageFolderDataset, read_class_list
from d4m.prototypes import PrototypeFile, save_prototypes

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = "distillation/sample_real.py"


def test_random_draw_is_seeded_and_records_the_classes(image_folder, tmp_path):
    common = ["--dataset", "imagefolder", "--data_dir", image_folder, "--ipc", 2]
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert run_script(SCRIPT, common + ["--seed", seed, "--output", tmp_path / name]) == 0
    pictures = {name: [Image.open(p).tobytes() for p, _ in ImageFolderDataset(tmp_path / name).samples]
                for name in "abc"}
    assert len(pictures["a"]) == 6 and pictures["a"] == pictures["b"] != pictures["c"]
    classes = read_class_list(tmp_path / "a")
    assert [(c["folder"], c["name"], c["prompt"]) for c in classes] == [(str(i), f"class{i}", f"class{i}") for i in range(3)]


def test_nearest_copies_the_images_the_prototype_file_names(image_folder, tiny_sd, tmp_path):
    protos = tmp_path / "protos"
    assert run_script("distillation/gen_prototype.py", [
        "--dataset", "imagefolder", "--data_dir", image_folder, "--diffusion_checkpoints_path", tiny_sd,
        "--save_prototype_path", protos, "--size", 32, "--ipc", 2, "--km_expand", 2, "--batch_size", 4,
        "--num_workers", 0, "--device", "cpu"]) == 0
    path = protos / "data-ipc2-kmexpand2.safetensors"
    nearest = PrototypeFile(path).nearest()
    assert run_script(SCRIPT, ["--dataset", "imagefolder", "--data_dir", image_folder, "--select", "nearest",
                               "--prototype_path", path, "--output", tmp_path / "near"]) == 0
    real = ImageFolderDataset(image_folder / "train")
    copied = ImageFolderDataset(tmp_path / "near")
    assert len(copied.samples) == 6
    for (path_copy, label), index in zip(copied.samples, nearest.flatten().tolist()):
        source, source_label = real.samples[index]
        assert label == source_label
        assert Image.open(path_copy).tobytes() == Image.open(source).convert("RGB").tobytes()


def test_bad_input_is_one_line_and_exit_2(image_folder, tmp_path, capsys):
    old = tmp_path / "old.safetensors"
    save_prototypes(old, ["class0", "class1", "class2"], torch.zeros(3, 2, 4, 2, 2))  # records no nearest images
    common = ["--dataset", "imagefolder", "--data_dir", image_folder, "--output", tmp_path / "out"]
    cases = {
        "needs --prototype_path": ["--select", "nearest"],
        "does not record the real images nearest": ["--select", "nearest", "--prototype_path", old],
        "fewer than --ipc 9": ["--ipc", 9],
    }
    for message, extra in cases.items():
        capsys.readouterr()
        assert run_script(SCRIPT, common + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_second_draw_into_the_same_folder_is_refused(image_folder, tmp_path, capsys):
    common = ["--dataset", "imagefolder", "--data_dir", image_folder, "--output", tmp_path / "out", "--ipc", 2]
    assert run_script(SCRIPT, common + ["--seed", 1]) == 0
    assert run_script(SCRIPT, common + ["--seed", 1]) == 0  # the same draw again
    before = sorted(p.read_bytes() for p in (tmp_path / "out").rglob("*.png"))
    capsys.readouterr()
    assert run_script(SCRIPT, common + ["--seed", 2]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (seed 1 there, 2 here)" in err[0], err
    assert sorted(p.read_bytes() for p in (tmp_path / "out").rglob("*.png")) == before
