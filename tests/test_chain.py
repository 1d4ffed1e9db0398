"""A reduced run of the whole default chain (issue 4) on real Fashion-MNIST with the carried models:
IPC 1, a few epochs, a subset of the data. Checks every stage's outputs and that the student beats chance."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from conftest import REPO, run_script
from d4m.data import _find_idx, _read_idx

LDM = REPO / "models" / "fashion_mnist" / "ldm"
TEACHER = REPO / "models" / "fashion_mnist" / "teacher_convnet.pt"
FASHION = [REPO / "data" / "fashion_mnist", Path("/usr/share/datasets/fashion-mnist")]


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fashion_subset(tmp_path_factory) -> Path:
    """The first 50 training images of each class and the first 1000 test images, as IDX files."""
    source = next((p for p in FASHION if p.exists()), None)
    assert source is not None, "Fashion-MNIST not found: run setup.sh"
    root = tmp_path_factory.mktemp("fashion")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find_idx(source, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find_idx(source, f"{prefix}-labels-idx1-ubyte"))
        keep = np.concatenate([np.flatnonzero(labels == c)[:50] for c in range(10)]) if split == "train" else np.arange(1000)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[keep])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels[keep])
    return root


def test_reduced_chain(fashion_subset, tmp_path, one_thread):
    out = tmp_path / "out"
    common = ["--dataset", "fashion_mnist", "--diffusion_checkpoints_path", LDM,
              "--label_file_path", REPO / "distillation/label-prompt/fashion_mnist.txt", "--ipc", 1, "--km_expand", 10]
    assert run_script("distillation/gen_prototype.py", common + [
        "--data_dir", fashion_subset, "--size", 32, "--batch_size", 50, "--num_workers", 0,
        "--save_prototype_path", out / "prototypes"]) == 0
    proto_file = out / "prototypes" / "fashion_mnist-ipc1-kmexpand10.safetensors"
    with safe_open(str(proto_file), "pt") as f:
        assert f.get_tensor("prototypes").shape[:2] == (10, 1)

    assert run_script("distillation/gen_syn_image.py", common + [
        "--prototype_path", proto_file, "--save_init_image_path", out / "syn", "--strength", 0.7,
        "--guidance_scale", 8, "--image_size", 32, "--num_inference_steps", 20, "--batch_size", 10]) == 0
    syn = out / "syn" / "fashion_mnist_ipc1_1_s0.7_g8.0_kmexpand10"
    assert sorted(p.name for p in syn.iterdir() if p.is_dir()) == [str(c) for c in range(10)]
    assert (syn / "classes.json").is_file()
    assert len(list(syn.glob("*/*.png"))) == 10

    assert run_script("matching/generate_soft_label.py", [
        "--data", syn, "--teacher-path", TEACHER, "--fkd-path", out / "fkd", "-b", 10, "--epochs", 30,
        "--input-size", 32, "--mix-type", "cutmix", "-j", 0]) == 0
    assert len(list((out / "fkd").glob("epoch_*.safetensors"))) == 30

    assert run_script("validate/train_FKD.py", [
        "--train-dir", syn, "--fkd-path", out / "fkd", "--output-dir", out / "student", "--dataset", "fashion_mnist",
        "--data-dir", fashion_subset, "--model", "convnet", "--batch-size", 10, "--epochs", 30, "--input-size", 32,
        "-j", 0, "--cos", "-T", 20, "--eval-interval", 30]) == 0
    result = json.loads((out / "student" / "results.json").read_text())
    assert (out / "student" / "model_best.pth.tar").is_file()
    assert result["top1"] > 20.0, f"student top-1 {result['top1']}% is not above chance (10%)"


@pytest.mark.heavy
def test_demo_chain_at_ipc10(tmp_path, one_thread):
    """The demo's D4M arm on the full Fashion-MNIST data (7 minutes on 2 cores): the student must land
    near the README's 80.9 % top-1."""
    data = next((p for p in FASHION if p.exists()), None)
    assert data is not None, "Fashion-MNIST not found: run setup.sh"
    out = tmp_path / "out"
    common = ["--dataset", "fashion_mnist", "--diffusion_checkpoints_path", LDM, "--ipc", 10, "--km_expand", 1]
    assert run_script("distillation/gen_prototype.py", common + [
        "--data_dir", data, "--size", 32, "--num_workers", 0, "--save_prototype_path", out / "prototypes"]) == 0
    assert run_script("distillation/gen_syn_image.py", common + [
        "--prototype_path", out / "prototypes" / "fashion_mnist-ipc10-kmexpand1.safetensors",
        "--save_init_image_path", out / "syn", "--strength", 0.7, "--guidance_scale", 8, "--image_size", 32]) == 0
    syn = out / "syn" / "fashion_mnist_ipc10_10_s0.7_g8.0_kmexpand1"
    assert run_script("matching/generate_soft_label.py", [
        "--data", syn, "--teacher-path", TEACHER, "--fkd-path", out / "fkd", "-b", 50, "--epochs", 150,
        "--input-size", 32, "--use-fp16", "--mix-type", "cutmix", "-j", 0]) == 0
    assert run_script("validate/train_FKD.py", [
        "--train-dir", syn, "--fkd-path", out / "fkd", "--output-dir", out / "student", "--dataset", "fashion_mnist",
        "--data-dir", data, "--model", "convnet", "--batch-size", 50, "--epochs", 150, "--input-size", 32,
        "-j", 0, "--cos", "-T", 20]) == 0
    assert json.loads((out / "student" / "results.json").read_text())["top1"] > 78.0
