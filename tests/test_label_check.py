"""The label-order check before matching: teacher, synthetic folders, prompts and validation folders."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_script
from d4m import labelcheck
from d4m.cli import UsageError
from d4m.data import FashionMNIST, write_class_list
from d4m.models import load_teacher_file, save_teacher
from fkd_helpers import MATCH, tiny_setup

pytestmark = pytest.mark.usefixtures("one_thread")
TEACHER = REPO / "models" / "fashion_mnist" / "teacher_convnet.pt"
FASHION = next((p for p in (REPO / "data" / "fashion_mnist", Path("/usr/share/datasets/fashion-mnist")) if p.exists()),
               None)


def test_floor_is_three_times_chance_or_halfway_to_certainty():
    assert labelcheck.floor(1000) == pytest.approx(0.3)
    assert labelcheck.floor(10) == pytest.approx(30.0)
    assert labelcheck.floor(3) == pytest.approx((100 + 100 / 3) / 2)


def test_names_agree_by_name_or_within_the_prompt():
    rows = [{"name": "n01440764", "prompt": "tench, Tinca tinca"}, {"name": "Bag", "prompt": "a bag"}]
    assert labelcheck.name_mismatch(["tench", "bag"], rows) is None
    assert labelcheck.name_mismatch(["bag", "tench"], rows).startswith("class 0 is 'bag' for the teacher")
    assert labelcheck.name_mismatch(None, rows) is None and labelcheck.name_mismatch(["x"], None) is None


def test_check_stops_near_chance():
    good, bad = torch.full((10,), 90.0), torch.full((10,), 12.0)
    labelcheck.check(good, 90.0, None, 10)
    with pytest.raises(UsageError, match="synthetic images' folders on 12.0%"):
        labelcheck.check(bad, 90.0, None, 10)
    with pytest.raises(UsageError, match="real validation split"):
        labelcheck.check(good, 12.0, None, 10)


@pytest.fixture(scope="module")
def fashion_set(tmp_path_factory) -> Path:
    """10 real Fashion-MNIST test images per class as a synthetic-like set, with its classes.json."""
    if FASHION is None:
        pytest.fail("Fashion-MNIST not found: run setup.sh")
    root = tmp_path_factory.mktemp("fashion_set") / "set"
    data = FashionMNIST(FASHION, train=False)
    counts = [0] * 10
    for index in range(len(data)):
        image, label = data[index]
        if counts[label] < 10:
            (root / str(label)).mkdir(parents=True, exist_ok=True)
            image.save(root / str(label) / f"{counts[label]}.png")
            counts[label] += 1
        if min(counts) == 10:
            break
    write_class_list(root, FashionMNIST.classes, [name.lower() for name in FashionMNIST.classes])
    return root


def match(data: Path, store: Path, *extra) -> list:
    return ["--data", data, "--teacher-path", TEACHER, "-b", 50, "--epochs", 1, "--input-size", 32,
            "--fkd-path", store, "-j", 0, "--device", "cpu", *extra]


def test_a_consistent_set_passes_and_the_figures_are_stored(fashion_set, tmp_path, capsys):
    """The shipped teacher was trained on Fashion-MNIST: its recorded top-1 stands for the validation pass. The same
    weights without that record are measured on the validation split."""
    model, record = load_teacher_file(TEACHER)
    unrecorded = tmp_path / "unrecorded.pt"
    save_teacher(unrecorded, model, record["arch"], record["num_classes"], record["input_size"], record["mean"],
                 record["std"], classes=record["classes"])
    for teacher in (TEACHER, unrecorded):
        store = tmp_path / teacher.stem
        argv = match(fashion_set, store, "--dataset", "fashion_mnist", "--data-dir", FASHION, "--teacher-path", teacher)
        assert run_script(MATCH, argv) == 0
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("label check:"))
        figures = json.loads((store / "label_check.json").read_text())
        assert figures["class_names"] == FashionMNIST.classes and sum(figures["synthetic_top1"]) / 10 > 80
        if teacher == TEACHER:
            assert "teacher top-1 88.8% on the real validation split (recorded in the teacher file)" in line
            assert figures["real_top1"] is None and figures["recorded_real_top1"] == record["top1"]
        else:
            assert "on the real validation split, " in line and "(chance 10.0%)" in line
            assert len(figures["real_top1"]) == 10 and sum(figures["real_top1"]) / 10 > 80


def shifted(fashion_set: Path, root: Path) -> Path:
    """The same images with every class folder's content moved to the next folder."""
    for c in range(10):
        shutil.copytree(fashion_set / str(c), root / str((c + 1) % 10))
    shutil.copy(fashion_set / "classes.json", root / "classes.json")
    return root


def test_mismatched_orders_stop_before_anything_is_written(fashion_set, tmp_path, capsys):
    renamed = tmp_path / "renamed"
    shutil.copytree(fashion_set, renamed)
    write_class_list(renamed, FashionMNIST.classes[1:] + FashionMNIST.classes[:1], ["?"] * 10)
    _, untrained = tiny_setup(tmp_path / "tiny")
    cases = {
        "not in the teacher's class order": match(shifted(fashion_set, tmp_path / "shifted"), tmp_path / "s1"),
        "class 0 is 'T-shirt/top' for the teacher but 'Trouser'": match(renamed, tmp_path / "s2"),
        "lists other class folders": match(fashion_set, tmp_path / "s3", "--data", tmp_path / "tiny" / "data" / "train"),
    }
    for message, args in cases.items():
        capsys.readouterr()
        assert run_script(MATCH, args) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: label check:") or "lists other" in err[0], err
        assert message in err[0] and "--no-label-check" in err[0] or message == "lists other class folders", err
    untrained_run = ["--data", tmp_path / "tiny" / "data" / "train", "--teacher-path", untrained, "-b", 5,
                     "--input-size", 32, "--fkd-path", tmp_path / "s4", "-j", 0, "--device", "cpu"]
    assert run_script(MATCH, untrained_run) == 2
    assert not any((tmp_path / f"s{i}").exists() for i in range(1, 5))
    assert run_script(MATCH, untrained_run + ["--no-label-check", "--epochs", 1]) == 0
