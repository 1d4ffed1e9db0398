"""The inputs users really have: damaged and unusual images, odd folders, damaged outputs, a second run, a
folder that cannot be written. Each is valid (and works) or gets one line and exit status 2, writing nothing."""
from __future__ import annotations

import json
import os
import resource
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, load_script, make_image_folder, one_error_line, run_main, run_script
from d4m.cli import UsageError
from d4m.data import ImageFolderDataset, load_rgb, write_class_list
from d4m.models import build_model, save_teacher
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


def limited_run(script: str, args: list, max_bytes: int) -> subprocess.CompletedProcess:
    """Run a script in a process that may write no file larger than `max_bytes`: the kernel refuses the write
    (EFBIG), the way a full disk refuses one (ENOSPC), inside torch's and safetensors' own writers too."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          preexec_fn=limit, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                                          "D4M_CPU_NOTED": "1"})


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path):
    """Matching (safetensors epoch files), training (checkpoints) and the teacher (torch.save) on a disk that
    refuses their files: one line naming the file, exit status 2, no temporary or partial file; the rerun with room
    completes."""
    data = make_image_folder(tmp_path / "data", classes=3, per_class=100, size=8)
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    save_teacher(teacher, build_model("convnet", 3, 8), "convnet", 3, 8)
    store, out = tmp_path / "store", tmp_path / "out"
    match = ["--data", data / "train", "--teacher-path", teacher, "-b", 50, "--input-size", 8, "--fkd-path", store,
             "-j", 0, "--no-label-check", "--epochs", 1, "--device", "cpu"]
    train = ["--train-dir", data / "train", "--val-dir", data / "val", "--output-dir", out, "--protocol", "hard",
             "--batch-size", 50, "--input-size", 8, "--model", "convnet", "-j", 0, "--epochs", 1, "--device", "cpu"]
    teach = ["--dataset", "imagefolder", "--data-dir", data, "-a", "convnet", "--epochs", 1, "--batch-size", 50,
             "--input-size", 8, "--workers", 0, "--output", tmp_path / "teacher" / "t.pt"]
    for script, args, folder in [(MATCH, match, store), (TRAIN, train, out),
                                 ("matching/train_teacher.py", teach, tmp_path / "teacher")]:
        done = limited_run(script, args, 4096)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
        assert lines[0].startswith(f"error: cannot write {folder}/") and "File too large" in lines[0], lines
        written = lines[0].split(":")[0].removeprefix("error: cannot write ")
        assert not Path(written).exists() and not list(folder.rglob(".*.tmp*")), list(folder.rglob("*"))
        assert limited_run(script, args, 1 << 30).returncode == 0


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


def test_a_damaged_classes_json_is_one_line(tiny, tmp_path, capsys):
    """matching and train_FKD read the set's classes.json: not JSON, or not a class list, is named in one line."""
    data, teacher = tiny
    store = tmp_path / "store"
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 1, "--device", "cpu")) == 0
    classes = data / "train" / "classes.json"
    for text in ('{"classes": [', '{"classes": [{"index": 0}]}', '[1, 2]'):
        classes.write_text(text)
        checked = [a for a in match_args(data, teacher, tmp_path / "s2", "--epochs", 1, "--device", "cpu")
                   if a != "--no-label-check"]
        for script, args in ((MATCH, checked),
                             (TRAIN, train_args(data, store, tmp_path / "out", "--epochs", 1, "--device", "cpu"))):
            assert run_script(script, args) == 2
            line = one_error_line(capsys)
            assert f"{classes} is damaged (" in line and "regenerate the set, or remove classes.json" in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "s2").exists()


def test_an_image_that_claims_too_many_pixels_is_named(tiny, tmp_path, capsys):
    """A PNG whose header claims 20000 x 10000 pixels (a decompression bomb, or a damaged header)."""
    data, teacher = tiny
    bomb = data / "train" / "class1" / "bomb.png"
    Image.new("L", (20000, 10000)).save(bomb, optimize=True)
    assert run_script(MATCH, match_args(data, teacher, tmp_path / "store", "--epochs", 1, "--device", "cpu")) == 2
    line = one_error_line(capsys)
    assert f"image {bomb} claims more pixels than PIL opens safely" in line and "replace or remove the file" in line
    with pytest.raises(UsageError, match="claims more pixels than PIL opens safely"):
        load_rgb(bomb)


@pytest.mark.parametrize("flag, value", [("-g", "inf"), ("-g", "nan"), ("-g", "-1"), ("-s", "nan")])
def test_synthesis_takes_finite_guidance_and_strength_only(flag, value, tmp_path, capsys):
    args = ["--prototype_path", tmp_path / "p.safetensors", "--save_init_image_path", tmp_path / "syn", flag, value]
    assert run_script("distillation/gen_syn_image.py", args) == 2
    assert flag in one_error_line(capsys) or "--strength" in one_error_line(capsys)
    assert not (tmp_path / "syn").exists()


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs", "..", ""])
def test_a_prototype_file_cannot_name_a_folder_outside_the_output(name, tiny_sd, tmp_path, capsys):
    """The output folder of stage 2 is named after the prototype file's recorded name: a name with a separator, or
    '..', is refused in one line and nothing is written anywhere."""
    path = tmp_path / "p.safetensors"
    save_prototypes(path, ["a", "b"], torch.zeros(2, 1, 4, 8, 8), metadata={"name": name})
    out = tmp_path / "deep" / "syn"
    args = ["--dataset", "imagefolder", "--prototype_path", path, "--diffusion_checkpoints_path", tiny_sd,
            "--save_init_image_path", out, "--device", "cpu", "--num_inference_steps", 2]
    assert run_script("distillation/gen_syn_image.py", args) == 2
    line = one_error_line(capsys)
    assert f"prototype file {path} records the name {name!r}, which is not a plain file name" in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["p.safetensors"]
    assert run_script("distillation/gen_syn_image.py", args[:-2] + ["--name", "../x"]) == 2
    assert "--name: must be a plain file name" in one_error_line(capsys)


def test_a_failed_prototype_run_leaves_no_build_file(tmp_path, tiny_sd, capsys, monkeypatch):
    """gen_prototype.py writes a full-size `.NAME.build<pid>` first: a run that fails while encoding removes it, and a
    killed run's (a dead process's) is removed by the next run."""
    data = make_image_folder(tmp_path / "data", classes=2, per_class=3, size=16)
    out = tmp_path / "protos"
    args = ["--dataset", "imagefolder", "--data_dir", data, "--diffusion_checkpoints_path", tiny_sd, "--ipc", 1,
            "--size", 16, "--num_workers", 0, "--save_prototype_path", out, "--device", "cpu"]
    module = load_script("distillation/gen_prototype.py")

    def crash(*a, **kw):
        raise RuntimeError("a crash while clustering")

    monkeypatch.setattr(module, "class_centres", crash)
    with pytest.raises(RuntimeError, match="a crash while clustering"):
        run_main(module, args)
    assert not out.exists() or not list(out.iterdir())
    monkeypatch.undo()
    out.mkdir(exist_ok=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    leftover = out / f".data-ipc1-kmexpand10.safetensors.build{dead}"
    leftover.write_bytes(b"\0" * 4096)
    assert run_script("distillation/gen_prototype.py", args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["data-ipc1-kmexpand10.safetensors"]
