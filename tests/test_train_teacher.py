"""matching/train_teacher.py: trains on a tiny image folder, writes a loadable teacher file, rejects bad input."""
from __future__ import annotations

import pytest
import torch
from conftest import make_image_folder, run_script, top1_on

from d4m.models import load_teacher_file

SCRIPT = "matching/train_teacher.py"


def test_trains_and_writes_teacher_file(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "teacher.pt"
    args = ["--dataset", "imagefolder", "--data-dir", data, "-a", "convnet", "--epochs", "1",
            "--batch-size", "8", "--input-size", "32", "--workers", "0", "--output", out]
    assert run_script(SCRIPT, args) == 0
    model, record = load_teacher_file(out)
    assert record["arch"] == "convnet" and record["num_classes"] == 3 and record["input_size"] == 32
    assert record["dataset"] == "imagefolder"
    assert record["top1"] == pytest.approx(top1_on(model, data / "val", 32, record["mean"], record["std"]))
    assert len(record["mean"]) == 3 and len(record["std"]) == 3
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_bad_input_exits_2(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "teacher.pt"
    common = ["--dataset", "imagefolder", "--epochs", "1", "--workers", "0", "--output", out, "--device", "cpu"]
    assert run_script(SCRIPT, [*common, "--data-dir", data, "-a", "no_such_net"]) == 2
    assert run_script(SCRIPT, [*common, "--data-dir", tmp_path / "missing", "-a", "convnet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert not out.exists()


def test_an_existing_teacher_file_is_replaced_only_with_overwrite(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "teacher.pt"
    out.write_bytes(b"an earlier teacher")
    args = ["--dataset", "imagefolder", "--data-dir", data, "-a", "convnet", "--epochs", "1", "--batch-size", "8",
            "--input-size", "32", "--workers", "0", "--device", "cpu", "--output", out]
    assert run_script(SCRIPT, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out} exists; pass --overwrite to replace it" in err[0]
    assert out.read_bytes() == b"an earlier teacher"
    assert run_script(SCRIPT, args + ["--overwrite"]) == 0
    assert load_teacher_file(out)[1]["num_classes"] == 3
