"""Shared fixtures: a tiny SD checkpoint, a small ImageFolder, and a way to run a script's main()."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def load_script(relpath: str):
    """Import a script file (e.g. distillation/gen_prototype.py) as a module, by its path."""
    path = REPO / relpath
    name = "script_" + relpath.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_main(module, args: list) -> None:
    """A script's command line in this process: its flags parsed (a refusal exits with status 2), then its main."""
    from d4m.cli import cli

    module.main(cli(module.parse_args)([str(a) for a in args]))


def run_script(relpath: str, args: list) -> int:
    """Run a script's command line in this process; returns its exit status."""
    try:
        run_main(load_script(relpath), args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def one_error_line(capsys) -> str:
    """stderr (not a terminal here) holds the error line and nothing else: no progress bar, no loading noise."""
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(relpath: str, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """Run a script under torchrun with `nproc` CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(REPO / relpath), *[str(a) for a in args]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A randomly initialised SD-shaped checkpoint (32 px images, 16 px latents) in diffusers' layout."""
    from d4m.tiny_sd import build_tiny_sd

    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd(folder, image_size=32)
    return folder


def make_image_folder(root: Path, classes: int = 3, per_class: int = 6, size: int = 32, seed: int = 0) -> Path:
    """root/train/<class>/<i>.png and root/val/<class>/<i>.png of class-coloured noisy images."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", max(2, per_class // 2))):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            base = np.zeros((size, size, 3), np.float32)
            base[..., c % 3] = 200
            for i in range(count):
                img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))
DEVICES = ["cpu", CUDA]  # parametrize a test over both; the CUDA case is skipped without a GPU


def device_flags(device: str) -> list[str]:
    """A script's flags for `device`; on CUDA with --deterministic, since exact repeats are what tests check."""
    return ["--device", device] + (["--deterministic"] if device == "cuda" else [])


@pytest.fixture(autouse=True)
def restore_torch_flags():
    """Scripts run in-process set torch's global kernel flags (--deterministic, cuDNN benchmark): undo them."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved[2:]


@pytest.fixture
def one_thread():
    """Run the test's in-process torch work on one thread: on a shared 2-core machine, two OpenMP threads
    that wait on each other are many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def top1_on(model: torch.nn.Module, folder: Path, input_size: int, mean, std) -> float:
    """The top-1 (%) of `model` on an ImageFolder, computed here with the validation transform, to hold a script's
    reported figure against."""
    from d4m.data import ImageFolderDataset
    from d4m.labelcheck import eval_transform

    data = ImageFolderDataset(folder, eval_transform(input_size, mean, std))
    images = torch.stack([image for image, _ in data])
    labels = torch.tensor([label for _, label in data])
    return 100.0 * (model.eval()(images).argmax(1) == labels).float().mean().item()
