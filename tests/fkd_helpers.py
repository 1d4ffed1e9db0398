"""Tiny FKD setup shared by test_fkd, test_matching and test_train_fkd: 3 classes x 4 images, a convnet teacher."""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import make_image_folder
from d4m.models import build_model, save_teacher

MATCH = "matching/generate_soft_label.py"
TRAIN = "validate/train_FKD.py"


def tiny_setup(root: Path) -> tuple[Path, Path]:
    """(data root with train/ and val/, teacher file)."""
    data = make_image_folder(root / "data", classes=3, per_class=4, size=32)
    torch.manual_seed(0)
    teacher = root / "teacher.pt"
    save_teacher(teacher, build_model("convnet", 3, 32), "convnet", 3, 32)
    return data, teacher


def match_args(data: Path, teacher: Path, store: Path, *extra) -> list[str]:
    """Matching on the tiny set; the teacher is untrained, so the label check (tested on its own) is off."""
    return ["--data", data / "train", "--teacher-path", teacher, "-b", 5, "--input-size", 32,
            "--fkd-path", store, "-j", 0, "--no-label-check", *extra]


def train_args(data: Path, store: Path, out: Path, *extra) -> list[str]:
    return ["--train-dir", data / "train", "--val-dir", data / "val", "--fkd-path", store, "--output-dir", out,
            "--batch-size", 5, "--input-size", 32, "--model", "convnet", "-j", 0, *extra]
