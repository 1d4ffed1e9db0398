"""Ctrl-C (SIGINT) and SIGTERM during stages 2, 3 and 4 (issue 24): one line, "interrupted; rerun the same command
to resume", exit status 130 or 143, no traceback, the lock released and its file removed, no temporary file left;
the same command then resumes, to the bytes (stage 4: the weights) of an uninterrupted run. And stage 2 run as a
whole into an output whose class folder links elsewhere."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_script
from d4m.cli import INTERRUPTED
from d4m.prototypes import save_prototypes
from fkd_helpers import MATCH, TRAIN, match_args, tiny_setup, train_args

pytestmark = pytest.mark.usefixtures("one_thread")
SYNTH = "distillation/gen_syn_image.py"
EPOCHS = 60
SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM")]


def command(script: str, args: list) -> list[str]:
    return [sys.executable, str(REPO / script), *[str(a) for a in args]]


def run(script: str, args: list) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command(script, args), capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def interrupt(script: str, args: list, started, signum: int) -> subprocess.CompletedProcess:
    """Run the script, send `signum` once `started()` holds (its first output is written), wait for its end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen(command(script, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=REPO)
    deadline = time.monotonic() + 600  # a guard against a hang, not a speed check: a loaded machine is slow
    while not started():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run wrote nothing in 10 minutes"
        time.sleep(0.02)
    process.send_signal(signum)
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def check_interrupted(done: subprocess.CompletedProcess, signum: int, output) -> None:
    assert done.returncode == 128 + signum, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().splitlines()[-1] == INTERRUPTED, done.stderr
    leftovers = [p.name for p in output.rglob(".*") if p.name.endswith(".lock") or ".tmp" in p.name]
    assert leftovers == [], leftovers


def files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny set, its teacher and an uninterrupted store of EPOCHS epochs."""
    root = tmp_path_factory.mktemp("signals")
    data, teacher = tiny_setup(root)
    assert run_script(MATCH, match_args(data, teacher, root / "store", "--epochs", EPOCHS, "--device", "cpu")) == 0
    return data, teacher, root / "store"


@pytest.mark.parametrize("signum", SIGNALS)
def test_stage_3_interrupted_resumes_to_the_same_bytes(tiny, tmp_path, signum):
    data, teacher, reference = tiny
    store = tmp_path / "store"
    args = match_args(data, teacher, store, "--epochs", EPOCHS, "--device", "cpu")
    check_interrupted(interrupt(MATCH, args, (store / "epoch_0001.safetensors").is_file, signum), signum, store)
    assert not (store / f"epoch_{EPOCHS - 1:04d}.safetensors").exists()
    assert run(MATCH, args).returncode == 0
    assert files(store) == files(reference)


@pytest.mark.parametrize("signum", SIGNALS)
def test_stage_4_interrupted_resumes_to_the_same_weights(tiny, tmp_path, signum):
    data, _, store = tiny
    common = ["--epochs", EPOCHS, "--eval-interval", EPOCHS, "--device", "cpu"]
    assert run(TRAIN, train_args(data, store, tmp_path / "straight", *common)).returncode == 0
    out = tmp_path / "out"
    done = interrupt(TRAIN, train_args(data, store, out, *common), (out / "checkpoint.pth.tar").is_file, signum)
    check_interrupted(done, signum, out)
    assert torch.load(out / "checkpoint.pth.tar", weights_only=True)["epoch"] < EPOCHS
    assert run(TRAIN, train_args(data, store, out, *common, "--resume")).returncode == 0
    straight, resumed = (torch.load(folder / "checkpoint.pth.tar", weights_only=True)["model"]
                         for folder in (tmp_path / "straight", out))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.fixture(scope="module")
def synthesis(tiny_sd, tmp_path_factory):
    """Prototypes of 3 classes and an uninterrupted stage-2 run of 6 images per class, one image per batch."""
    root = tmp_path_factory.mktemp("synthesis")
    protos = root / "imagefolder-ipc6-kmexpand1.safetensors"
    save_prototypes(protos, ["a red fish", "a green bird", "a blue car"],
                    torch.randn(3, 6, 4, 16, 16, generator=torch.Generator().manual_seed(0)))

    def args(out):
        return ["--dataset", "imagefolder", "--prototype_path", protos, "--diffusion_checkpoints_path", tiny_sd,
                "--save_init_image_path", out, "--ipc", 6, "--km_expand", 1, "--strength", 0.7, "-g", 8,
                "--num_inference_steps", 4, "--image_size", 24, "--device", "cpu", "--seed", 1, "--batch_size", 1]

    assert run(SYNTH, args(root / "reference")).returncode == 0
    return args, root / "reference"


@pytest.mark.parametrize("signum", SIGNALS)
def test_stage_2_interrupted_resumes_to_the_same_bytes(synthesis, tmp_path, signum):
    args, reference = synthesis
    out = tmp_path / "syn"
    started = lambda: any(out.rglob("*.png"))  # noqa: E731
    check_interrupted(interrupt(SYNTH, args(out), started, signum), signum, out)
    assert len(list(out.rglob("*.png"))) < len(list(reference.rglob("*.png")))
    assert run(SYNTH, args(out)).returncode == 0
    assert files(out) == files(reference)


def test_stage_2_refuses_a_class_folder_linked_elsewhere(synthesis, tmp_path):
    """Issue 24's case: a class folder of an existing stage-2 output replaced by a symlink to a folder elsewhere;
    the rerun is refused in one line and writes nothing there."""
    args, reference = synthesis
    out, elsewhere = tmp_path / "syn", tmp_path / "elsewhere"
    shutil.copytree(reference, out)
    elsewhere.mkdir()
    folder = next(p for p in out.rglob("1") if p.is_dir())
    shutil.rmtree(folder)
    folder.symlink_to(elsewhere)
    done = run(SYNTH, args(out))
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: "), done.stderr
    assert f"{folder} leads outside the output" in done.stderr and "Traceback" not in done.stderr
    assert not any(elsewhere.iterdir())
