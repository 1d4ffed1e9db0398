"""The soft-label store under misuse: two runs on one store, foreign or damaged files, an edited meta.json, images
changed in place, a failed first run, a killed one. Each is refused with one line naming the file and the fix
(exit status 2, nothing half-written), or works."""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, one_error_line, run_script
from d4m import outputs, views
from d4m.store import META_NAME, epoch_file
from fkd_helpers import MATCH, TRAIN, match_args, tiny_setup, train_args

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(tmp_path):
    return tiny_setup(tmp_path)


def contents(folder) -> list[tuple[str, bytes]]:
    return sorted((p.name, p.read_bytes()) for p in folder.iterdir())


def match(data, teacher, store, *extra) -> int:
    return run_script(MATCH, match_args(data, teacher, store, "--epochs", 2, "--device", "cpu", *extra))


def train(data, store, out, *extra) -> int:
    return run_script(TRAIN, train_args(data, store, out, "--epochs", 2, "--device", "cpu", *extra))


def dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_a_store_created_meanwhile_by_a_run_of_other_settings_is_refused(tiny, tmp_path, capsys, monkeypatch):
    """Two runs start on one store, the other one (say on another machine) creating it while this one decodes its
    images: its settings stay, this run is refused and writes nothing. With the same settings both may go on."""
    data, teacher = tiny
    other = tmp_path / "other"
    assert match(data, teacher, other, "-b", 4) == 0
    build_source = views.build_source

    def racing_into(store):
        def racing(*args, **kwargs):
            shutil.copytree(other, store, dirs_exist_ok=True)
            return build_source(*args, **kwargs)
        return racing

    store, same = tmp_path / "store", tmp_path / "same"
    monkeypatch.setattr(views, "build_source", racing_into(store))
    capsys.readouterr()
    assert match(data, teacher, store) == 2
    line = one_error_line(capsys)
    assert f"the soft-label store {store} was made with other settings (batch_size 4 there, 5 here" in line
    assert contents(store) == contents(other)
    monkeypatch.setattr(views, "build_source", racing_into(same))
    assert match(data, teacher, same, "-b", 4) == 0
    assert contents(same) == contents(other)


def test_an_epoch_file_of_another_run_is_named_by_training_and_by_the_resume(tiny, tmp_path, capsys):
    data, teacher = tiny
    store, other = tmp_path / "store", tmp_path / "other"
    assert match(data, teacher, store) == 0
    assert match(data, teacher, other, "--fkd-seed", 7) == 0
    shutil.copy(epoch_file(other, 1), epoch_file(store, 1))
    before = contents(store)
    capsys.readouterr()
    assert train(data, store, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert f"{epoch_file(store, 1)} does not belong to this store's meta.json" in line
    assert "delete it" in line and "rerun the matching command" in line
    assert not (tmp_path / "out").exists()
    assert match(data, teacher, store) == 2
    assert f"{epoch_file(store, 1)} does not belong" in one_error_line(capsys)
    assert contents(store) == before
    epoch_file(store, 1).unlink()
    assert match(data, teacher, store) == 0
    assert train(data, store, tmp_path / "out") == 0


def test_an_edited_meta_json_is_not_trained_on(tiny, tmp_path, capsys):
    """Batches of 5 read as batches of 4 would pair views with other views' soft labels: refused by name."""
    data, teacher = tiny
    store = tmp_path / "store"
    assert match(data, teacher, store, "--mix-type", "cutmix") == 0
    meta = json.loads((store / META_NAME).read_text())
    (store / META_NAME).write_text(json.dumps({**meta, "batch_size": 4}))
    capsys.readouterr()
    assert train(data, store, tmp_path / "out", "--batch-size", 4) == 2
    line = one_error_line(capsys)
    assert f"{epoch_file(store, 0)} does not belong to this store's meta.json" in line and "edited" in line
    assert not (tmp_path / "out").exists()
    assert match(data, teacher, store, "--mix-type", "cutmix", "-b", 4) == 2
    assert f"{epoch_file(store, 0)} does not belong" in one_error_line(capsys)


def test_images_changed_in_place_are_refused(tiny, tmp_path, capsys):
    """An image rewritten with other pixels but the same file size (uncompressed PNGs of one size) is noticed and
    named; a store without the record of its images (made before stores kept one) names the folder."""
    data, teacher = tiny
    image = data / "train" / "class0" / "0.png"
    for path in (data / "train").rglob("*.png"):
        Image.open(path).save(path, compress_level=0)
    store = tmp_path / "store"
    assert match(data, teacher, store) == 0
    size = image.stat().st_size
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image, compress_level=0)
    assert image.stat().st_size == size
    capsys.readouterr()
    assert train(data, store, tmp_path / "out") == 2
    assert f"{data / 'train'}/class0/0.png is not the image the store was made from" in one_error_line(capsys)
    assert match(data, teacher, store) == 2
    assert "was made with other settings (images " in one_error_line(capsys)
    (store / "images.txt").unlink()
    assert train(data, store, tmp_path / "out") == 2
    assert f"the images in {data / 'train'} are not the ones the store was made from" in one_error_line(capsys)


def damage_meta(meta, how: str) -> None:
    text = meta.read_text()
    if how == "truncated":
        meta.write_text(text[: len(text) // 2])
    elif how == "not an object":
        meta.write_text("[5, 2]")
    elif how in ("a string", "null", "true"):
        meta.write_text(json.dumps({**json.loads(text), "epochs": {"a string": "3", "null": None, "true": True}[how]}))
    else:
        meta.write_text(json.dumps({k: v for k, v in json.loads(text).items() if k != "batch_size"}))


@pytest.mark.parametrize("how,said", [("truncated", "is damaged ("), ("not an object", "is damaged (not a JSON object)"),
                                      ("incomplete", "lacks batch_size (incomplete, or made by an older version)"),
                                      ("a string", "is damaged (epochs is '3', not a positive integer)"),
                                      ("null", "is damaged (epochs is None, not a positive integer)"),
                                      ("true", "is damaged (epochs is True, not a positive integer)")])
def test_a_damaged_or_incomplete_meta_json_is_one_line(tiny, tmp_path, capsys, how, said):
    data, teacher = tiny
    store = tmp_path / "store"
    assert match(data, teacher, store) == 0
    meta = store / META_NAME
    damage_meta(meta, how)
    before = contents(store)
    for run in (lambda: train(data, store, tmp_path / "out"), lambda: match(data, teacher, store)):
        capsys.readouterr()
        assert run() == 2
        line = one_error_line(capsys)
        assert line.startswith(f"error: {meta} {said}")
        assert line.endswith(f"delete the folder {store} and rerun matching/generate_soft_label.py")
    assert contents(store) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0, 4, 100, 0.5])
def test_a_truncated_epoch_file_stops_training_before_it_starts(tiny, tmp_path, capsys, keep):
    data, teacher = tiny
    store = tmp_path / "store"
    assert match(data, teacher, store) == 0
    whole = epoch_file(store, 1).read_bytes()
    epoch_file(store, 1).write_bytes(whole[: int(keep * len(whole)) if keep < 1 else keep])
    capsys.readouterr()
    assert train(data, store, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert f"{epoch_file(store, 1)} is damaged" in line and "rerun the matching command" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("loader", ["tensor", "pil"])
def test_a_failed_run_does_not_block_its_corrected_rerun(tiny, tmp_path, capsys, loader):
    """A truncated image (its header intact, so it fails when decoded) or a bad seed: nothing is written, and the
    rerun with the image replaced or the seed corrected works."""
    data, teacher = tiny
    store = tmp_path / "store"
    image = data / "train" / "class2" / "1.png"
    whole = image.read_bytes()
    image.write_bytes(whole[:120])
    capsys.readouterr()
    assert match(data, teacher, store, "--loader", loader) == 2
    assert f"cannot read image {image}" in one_error_line(capsys)
    assert not store.exists()
    image.write_bytes(whole)
    assert match(data, teacher, store, "--loader", loader, "--fkd-seed", -1) == 2
    assert "argument --fkd-seed: must be an integer from 0 to 2**63 - 1" in one_error_line(capsys)
    assert not store.exists()
    assert match(data, teacher, store, "--loader", loader) == 0


def test_temporaries_of_dead_processes_are_removed(tiny, tmp_path):
    """A run killed while writing meta.json or an epoch leaves `.NAME.tmpPID` files: the rerun removes them (those
    of live processes stay) and completes the store."""
    data, teacher = tiny
    store = tmp_path / "store"
    store.mkdir()
    dead = dead_pid()
    (store / f".{META_NAME}.tmp{dead}").write_text('{"batch_size": 5')
    (store / ".lock").write_text(f"{dead} {socket.gethostname()}")
    assert match(data, teacher, store) == 0
    assert sorted(p.name for p in store.iterdir()) == ["epoch_0000.safetensors", "epoch_0001.safetensors",
                                                      "images.txt", META_NAME]
    epoch_file(store, 1).unlink()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = store / f".epoch_0001.safetensors.tmp{sleeper.pid}"
        live.write_bytes(b"written by a live process")
        (store / f".epoch_0001.safetensors.tmp{dead}").write_bytes(b"half an epoch")
        assert match(data, teacher, store) == 0
        assert sorted(p.name for p in store.iterdir()) == [live.name, "epoch_0000.safetensors",
                                                           "epoch_0001.safetensors", "images.txt", META_NAME]
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_epoch_files_have_the_permissions_of_meta_json(tiny, tmp_path, umask):
    data, teacher = tiny
    store = tmp_path / "store"
    old = os.umask(umask)
    try:
        assert match(data, teacher, store) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in store.iterdir()}
    assert modes == dict.fromkeys([META_NAME, "images.txt", "epoch_0000.safetensors", "epoch_0001.safetensors"],
                                  0o666 & ~umask)


def test_a_failure_in_a_log_file_is_the_error_line_alone(tiny, tmp_path):
    """stderr to a pipe, as in a logged job; an image that fails in the first epoch (PIL loader, worker processes)."""
    data, teacher = tiny
    image = data / "train" / "class1" / "3.png"
    image.write_bytes(image.read_bytes()[:120])
    args = match_args(data, teacher, tmp_path / "store", "--epochs", 2, "--loader", "pil", "-j", 2, "--device", "cpu")
    done = subprocess.run([sys.executable, str(REPO / MATCH), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(f"error: cannot read image {image}")
    assert not (tmp_path / "store").exists()


def no_hard_links(*args) -> None:
    raise OSError(errno.EPERM, "Operation not permitted")


@pytest.mark.parametrize("hard_links", [True, False])
def test_meta_json_is_created_once(tmp_path, monkeypatch, hard_links):
    """Of two writers the first creates the file and the second learns that it did not, with no temporary left;
    also where the file system has no hard links."""
    if not hard_links:
        monkeypatch.setattr(os, "link", no_hard_links)
    path = tmp_path / META_NAME
    assert outputs.create_once(path, "first") is True
    assert outputs.create_once(path, "second") is False
    assert path.read_text() == "first" and os.listdir(tmp_path) == [META_NAME]
