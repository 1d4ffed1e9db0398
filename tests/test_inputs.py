"""The inputs users really have: damaged and unusual images, odd folders, damaged outputs, a second run, a
folder that cannot be written. Each is valid (and works) or gets one line and exit status 2, writing nothing."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, make_image_folder, one_error_line, run_script
from d4m.data import ImageFolderDataset, load_rgb, write_class_list
from d4m.prototypes import save_prototypes
from d4m.store import epoch_file, read_epoch, read_meta
from fkd_helpers import MATCH, TRAIN, match_args, tiny_setup, train_args

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(tmp_path):
    return tiny_setup(tmp_path)


def test_unusual_image_modes_are_read_as_8_bit_rgb(tmp_path):
    grey16 = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # up to 65472
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((8, 8), 77, np.uint8)).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.full((8, 8), 33, np.uint8), "L").save(tmp_path / "grey.png")
    pixels = np.asarray(load_rgb(tmp_path / "grey16.png"))
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    assert abs(pixels[..., 0].astype(float).mean() - (grey16 / 257).mean()) < 0.5  # scaled, not clipped to white
    Image.fromarray(np.full((8, 8), 200, np.uint16)).save(tmp_path / "dark16.png")  # 16 bits, all values < 256
    assert np.asarray(load_rgb(tmp_path / "dark16.png"))[0, 0].tolist() == [1, 1, 1]  # 200 / 257, not 200
    assert np.asarray(load_rgb(tmp_path / "rgba.png"))[0, 0].tolist() == [200, 0, 0]
    assert np.asarray(load_rgb(tmp_path / "palette.png"))[0, 0].tolist() == [77, 77, 77]
    assert np.asarray(load_rgb(tmp_path / "grey.png"))[0, 0].tolist() == [33, 33, 33]


def test_a_set_of_mixed_modes_matches_with_both_loaders(tiny, tmp_path):
    data, teacher = tiny
    odd = data / "train" / "class1"
    Image.fromarray((np.random.default_rng(0).random((32, 32)) * 65535).astype(np.uint16)).save(odd / "grey16.png")
    Image.open(odd / "0.png").convert("RGBA").save(odd / "rgba.png")
    Image.open(odd / "1.png").convert("P").save(odd / "palette.png")
    for loader in ("tensor", "pil"):
        store = tmp_path / f"store_{loader}"
        assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 1, "--loader", loader, "--device",
                                            "cpu")) == 0
    a, b = (read_epoch(tmp_path / f"store_{loader}", 0, read_meta(tmp_path / f"store_{loader}"))[1]
            for loader in ("tensor", "pil"))
    assert a.rows(0, 15).shape == (15, 3) and float((a.rows(0, 15) - b.rows(0, 15)).abs().max()) < 0.05


@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_image_is_named(tiny, tmp_path, capsys, workers):
    data, teacher = tiny
    (data / "train" / "class2" / "3.png").write_bytes(Image.open(data / "train" / "class2" / "3.png").tobytes()[:50])
    truncated = data / "train" / "class0" / "2.png"
    truncated.write_bytes(truncated.read_bytes()[:120])
    capsys.readouterr()
    assert run_script(MATCH, match_args(data, teacher, tmp_path / "store", "-j", workers, "--device", "cpu")) == 2
    line = one_error_line(capsys)
    assert "cannot read image" in line and ("class0/2.png" in line or "class2/3.png" in line)
    assert not (tmp_path / "store").exists()


def test_an_empty_class_folder_is_refused(tiny, tmp_path, capsys):
    data, teacher = tiny
    (data / "train" / "class1b").mkdir()
    assert run_script(MATCH, match_args(data, teacher, tmp_path / "store", "--device", "cpu")) == 2
    assert "class1b holds no images" in one_error_line(capsys)


def test_train_and_val_with_other_classes_are_refused(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=4)
    shutil.rmtree(data / "val" / "class1")
    args = ["--dataset", "imagefolder", "--data-dir", data, "-a", "convnet", "--epochs", 1, "--workers", 0,
            "--input-size", 32, "--output", tmp_path / "t.pt", "--device", "cpu"]
    assert run_script("matching/train_teacher.py", args) == 2
    assert "(class 1: 'class1' there, 'class2' here)" in one_error_line(capsys)


def test_validation_classes_must_be_those_of_the_synthetic_set(tiny, tmp_path, capsys):
    data, teacher = tiny
    store = tmp_path / "store"
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 1, "--device", "cpu")) == 0
    write_class_list(data / "train", ["cat", "dog", "fish"], ["a cat", "a dog", "a fish"])
    capsys.readouterr()
    assert run_script(TRAIN, train_args(data, store, tmp_path / "out", "--epochs", 1, "--device", "cpu")) == 2
    assert "class 0: 'cat' there, 'class0' here" in one_error_line(capsys)


def test_a_damaged_epoch_file_is_named_and_rewritten_by_matching(tiny, tmp_path, capsys):
    data, teacher = tiny
    store = tmp_path / "store"
    args = match_args(data, teacher, store, "--epochs", 2, "--device", "cpu")
    assert run_script(MATCH, args) == 0
    epoch1 = epoch_file(store, 1)
    whole = epoch1.read_bytes()
    epoch1.write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    assert run_script(TRAIN, train_args(data, store, tmp_path / "out", "--epochs", 2, "--device", "cpu")) == 2
    line = one_error_line(capsys)
    assert "epoch_0001.safetensors is damaged" in line and "rerun the matching command" in line
    assert run_script(MATCH, args) == 0  # the resume treats it as missing
    assert epoch1.read_bytes() == whole


def test_a_damaged_prototype_file_is_named(tmp_path, tiny_sd, capsys):
    path = tmp_path / "p.safetensors"
    save_prototypes(path, ["a", "b"], torch.zeros(2, 1, 4, 16, 16))
    path.write_bytes(path.read_bytes()[:-40])
    args = ["--dataset", "imagefolder", "--prototype_path", path, "--diffusion_checkpoints_path", tiny_sd,
            "--save_init_image_path", tmp_path / "syn", "--device", "cpu"]
    assert run_script("distillation/gen_syn_image.py", args) == 2
    line = one_error_line(capsys)
    assert str(path) in line and "regenerate it" in line
    assert not (tmp_path / "syn").exists()


HOLDER = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_the_same_output_is_refused_and_a_dead_runs_lock_taken_over(tiny, tmp_path, capsys):
    """While another process holds the store's lock the run is refused, writing nothing; once that process is
    killed (its lock file left behind), the next run takes the lock and removes the file when done."""
    data, teacher = tiny
    store = tmp_path / "store"
    store.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 1, "--device", "cpu")) == 2
        assert f"being written by another run (it holds {store / '.lock'})" in one_error_line(capsys)
        assert sorted(p.name for p in store.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 1, "--device", "cpu")) == 0
    assert (store / "meta.json").is_file() and not (store / ".lock").exists()


TAKER = """import os, sys, time
from d4m.cli import UsageError
from d4m.outputs import exclusive
lock, start, log = sys.argv[1], float(sys.argv[2]), sys.argv[3]
while time.time() < start:
    pass
for _ in range(20):
    try:
        with exclusive(lock, "the test's folder"):
            with open(log, "a") as f:
                f.write(f"in {os.getpid()}\\n")
            time.sleep(0.002)
            with open(log, "a") as f:
                f.write(f"out {os.getpid()}\\n")
    except UsageError:
        pass
"""


def test_the_lock_is_never_held_twice(tmp_path):
    """Eight processes start together and take and release one lock (on a folder each run creates and removes) 20
    times each: in the log of their holds no two overlap, and no lock file is left."""
    lock, log = tmp_path / "out" / ".lock", tmp_path / "log"
    start = time.time() + 2
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    takers = [subprocess.Popen([sys.executable, "-c", TAKER, str(lock), str(start), str(log)], env=env)
              for _ in range(8)]
    assert all(t.wait(timeout=120) == 0 for t in takers)
    events = log.read_text().split("\n")[:-1]
    assert events, "no process ever held the lock"
    assert all(a.split()[0] == "in" and b == f"out {a.split()[1]}" for a, b in zip(events[::2], events[1::2])), events
    assert not lock.exists()


def test_an_output_that_cannot_be_written_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    data, teacher = tiny
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run_script(MATCH, match_args(data, teacher, blocker / "store", "--epochs", 1, "--device", "cpu")) == 2
    assert "is a file, so" in one_error_line(capsys)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert run_script(TRAIN, train_args(data, tmp_path / "s", tmp_path / "out", "--protocol", "hard", "--epochs", 1,
                                        "--device", "cpu")) == 2
    assert "is not writable" in one_error_line(capsys)


def test_a_full_disk_during_the_run_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    data, _ = tiny

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "checkpoint.pth.tar"))

    monkeypatch.setattr(torch, "save", full)
    assert run_script(TRAIN, train_args(data, tmp_path / "s", tmp_path / "out", "--protocol", "hard", "--epochs", 1,
                                        "--device", "cpu")) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "checkpoint.pth.tar" in line
    assert not list((tmp_path / "out").glob("*.tar")) and not list((tmp_path / "out").glob(".*.tmp*"))


def test_a_prompt_file_with_more_lines_than_classes_is_refused(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=2)
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\n")
    args = ["--dataset", "imagefolder", "--data_dir", data, "--label_file_path", labels, "--output", tmp_path / "o"]
    assert run_script("distillation/sample_real.py", args + ["--ipc", 1]) == 2
    assert "has 4 prompts but the dataset has 3 classes" in one_error_line(capsys)
    assert ImageFolderDataset(data / "train").classes == ["class0", "class1", "class2"]


@pytest.mark.parametrize("script, args, named", [
    ("distillation/gen_prototype.py", ["--seed", -1], "--seed"),
    ("distillation/gen_syn_image.py", ["--prototype_path", "p.safetensors", "--seed", -1], "--seed"),
    ("distillation/sample_real.py", ["--data_dir", "d", "--output", "o", "--seed", -2], "--seed"),
    ("distillation/train_tiny_ldm.py", ["--dataset", "imagefolder", "--data_dir", "d", "--output", "o", "--seed", -1],
     "--seed"),
    ("distillation/train_tiny_ldm.py", ["--dataset", "imagefolder", "--data_dir", "d", "--output", "o", "--lr", 0],
     "--lr"),
    ("matching/train_teacher.py", ["--dataset", "imagefolder", "--data-dir", "d", "--output", "t.pt", "--seed", -1],
     "--seed"),
    ("matching/train_teacher.py", ["--dataset", "imagefolder", "--data-dir", "d", "--output", "t.pt",
                                   "--input-size", -32], "--input-size"),
    (MATCH, ["--data", "d", "--fkd-path", "s", "--fkd-seed", -1], "--fkd-seed"),
    (MATCH, ["--data", "d", "--fkd-path", "s", "--seed", -1], "--seed"),
    (TRAIN, ["--train-dir", "d", "--output-dir", "o", "--adamw-lr", -1], "--adamw-lr"),
    ("validate/evaluate.py", ["--set", "a=d", "--output", "o", "--adamw-lr", -1], "--adamw-lr"),
    ("validate/evaluate.py", ["--set", "a=d", "--output", "o", "--epochs", 0], "--epochs"),
])
def test_a_negative_seed_or_non_positive_rate_is_one_line(tmp_path, capsys, monkeypatch, script, args, named):
    monkeypatch.chdir(tmp_path)
    assert run_script(script, args) == 2
    line = one_error_line(capsys)
    assert named in line and "must be" in line, line
    assert list(tmp_path.iterdir()) == []


def test_input_sizes_too_small_for_the_teacher_are_one_line(tiny, tmp_path, capsys):
    data, teacher = tiny
    assert run_script(MATCH, match_args(data, teacher, tmp_path / "s", "--input-size", 4, "--epochs", 1,
                                        "--device", "cpu")) == 2
    assert "cannot take 4 px inputs; use --input-size 32" in one_error_line(capsys)
    args = ["--dataset", "imagefolder", "--data-dir", data, "-a", "convnet", "--epochs", 1, "--workers", 0,
            "--input-size", 4, "--output", tmp_path / "t.pt", "--device", "cpu"]
    assert run_script("matching/train_teacher.py", args) == 2
    assert "convnet cannot take 4 px images" in one_error_line(capsys)
    assert not (tmp_path / "s").exists() and not (tmp_path / "t.pt").exists()


def test_a_prompt_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    labels = tmp_path / "labels.txt"
    labels.write_bytes("caf\xe9\nth\xe9\n".encode("latin-1"))
    prototypes = tmp_path / "p.safetensors"
    save_prototypes(prototypes, ["class0", "class1"], torch.zeros(2, 1, 4, 2, 2))
    runs = [("distillation/gen_prototype.py", ["--dataset", "imagefolder", "--data_dir", data,
                                               "--save_prototype_path", tmp_path / "out", "--device", "cpu"]),
            ("distillation/gen_syn_image.py", ["--dataset", "imagefolder", "--prototype_path", prototypes,
                                               "--save_init_image_path", tmp_path / "out", "--device", "cpu"]),
            ("distillation/sample_real.py", ["--dataset", "imagefolder", "--data_dir", data, "--output",
                                             tmp_path / "out"])]
    for script, args in runs:
        assert run_script(script, args + ["--label_file_path", labels]) == 2, script
        line = one_error_line(capsys)
        assert str(labels) in line and "is not UTF-8 text (byte b'\\xe9' at offset 3); save it as UTF-8" in line
    assert not (tmp_path / "out").exists()


def test_an_image_named_in_another_encoding_is_used_and_such_a_class_folder_is_one_line(tiny, tmp_path, capsys):
    data, teacher = tiny
    odd = os.fsencode(data / "train" / "class1") + b"/caf\xe9.png"
    shutil.copy(data / "train" / "class1" / "0.png", odd)
    store = tmp_path / "store"
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 1, "--device", "cpu")) == 0
    assert json.loads((store / "meta.json").read_text())["num_images"] == 13
    assert run_script(TRAIN, train_args(data, store, tmp_path / "out", "--epochs", 1, "--device", "cpu")) == 0
    os.rename(data / "train" / "class2", os.fsencode(data / "train") + b"/\xff")
    capsys.readouterr()
    assert run_script(MATCH, match_args(data, teacher, tmp_path / "store2", "--epochs", 1, "--device", "cpu")) == 2
    assert "class folder b'\\xff' in" in one_error_line(capsys)


def test_an_output_folder_named_in_another_encoding_is_written_and_printed_escaped(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    out = os.fsdecode(os.fsencode(tmp_path) + b"/out\xff")
    capsys.readouterr()
    assert run_script("distillation/sample_real.py", ["--dataset", "imagefolder", "--data-dir", data, "--output", out,
                                                      "--ipc", "1"]) == 0
    assert f"wrote 2 images to {tmp_path}/out\\udcff" in capsys.readouterr().out
    assert os.path.isfile(os.fsencode(tmp_path) + b"/out\xff/classes.json")
