"""Issue 24's inputs: JSON nested 100000 deep wherever JSON is read, sizes no model can take, damaged model
folders, crafted teachers and checkpoints, a newline in a class name, inputs only a later step reads (refused before
the work), writes through a symlink in the output, and stage 1's lock taken before its model loads. Each is one line
naming the file or flag, exit status 2, and nothing written outside the output or left by the refusal."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import one_error_line, run_script
from d4m import diffusion, outputs
from d4m.cli import UsageError
from fkd_helpers import MATCH, TRAIN, match_args, tiny_setup, train_args
from scripts.pipeline_stable_diffusion_gen_latents import StableDiffusionGenLatentsPipeline

pytestmark = pytest.mark.usefixtures("one_thread")
PROTO = "distillation/gen_prototype.py"
REAL = "distillation/sample_real.py"
DEEP = "[" * 100000


def stage1(data, sd, out, *extra) -> list:
    return ["--dataset", "imagefolder", "--data_dir", data, "--diffusion_checkpoints_path", sd,
            "--save_prototype_path", out, "--size", 32, "--ipc", 2, "--km_expand", 2, "--batch_size", 4,
            "--num_workers", 0, "--device", "cpu", *extra]


def real(data, out, *extra) -> list:
    return ["--dataset", "imagefolder", "--data_dir", data, "--ipc", 2, "--output", out, *extra]


class Payload:
    """What a crafted pickle holds: a call that would leave a file behind if it ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# ----------------------------------------------------------------------------- nested JSON


def test_a_deeply_nested_classes_json_is_refused(tmp_path, capsys):
    data, _ = tiny_setup(tmp_path)
    (data / "train" / "classes.json").write_text(DEEP)
    assert run_script(TRAIN, ["--train-dir", data / "train", "--val-dir", data / "val", "--protocol", "hard",
                              "--output-dir", tmp_path / "out", "--batch-size", 5, "--input-size", 32, "--model",
                              "convnet", "-j", 0, "--epochs", 1, "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert f"{data / 'train' / 'classes.json'} is damaged (nested more than 64 levels deep)" in line
    assert not (tmp_path / "out").exists()


def test_a_deeply_nested_manifest_is_refused(image_folder, tmp_path, capsys):
    out = tmp_path / "real"
    assert run_script(REAL, real(image_folder, out)) == 0
    (out / "manifest.json").write_text(DEEP)
    assert run_script(REAL, real(image_folder, out)) == 2
    assert f"{out} holds files but no readable manifest.json" in one_error_line(capsys)


def test_a_deeply_nested_json_prototype_file_is_refused(image_folder, tmp_path, capsys):
    path = tmp_path / "protos.json"
    path.write_text(DEEP)
    assert run_script(REAL, real(image_folder, tmp_path / "out", "--select", "nearest", "--prototype_path", path)) == 2
    line = one_error_line(capsys)
    assert f"prototype file {path} is not a valid prototype file" in line and "nested more than 64" in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("script, flags", [
    (TRAIN, ["--train-dir", "x", "--output-dir", "o", "--protocol", "hard", "--input-size", 1000000]),
    (MATCH, ["--data", "x", "--fkd-path", "s", "--input-size", 1000000]),
    (PROTO, ["--data_dir", "x", "--size", 1000000]),
    (REAL, ["--dataset", "imagefolder", "--data_dir", "x", "--output", "o", "--size", 1000000]),
])
def test_an_image_size_no_model_takes_is_refused_with_the_arguments(script, flags, capsys):
    assert run_script(script, flags) == 2
    assert "must be a side in pixels from 1 to 4096, got '1000000'" in one_error_line(capsys)


# ----------------------------------------------------------------------------- damaged model folders


@pytest.fixture
def sd_copy(tiny_sd, tmp_path):
    return shutil.copytree(tiny_sd, tmp_path / "sd")


def damage_index(contents):
    return lambda sd: (sd / "model_index.json").write_text(contents)


def truncate(sd):
    path = sd / "text_encoder" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def payload_bin(sd):
    (sd / "text_encoder" / "model.safetensors").unlink()
    torch.save({"weight": Payload(sd.parent / "ran")}, sd / "text_encoder" / "pytorch_model.bin")


def delete_unet(sd):
    (sd / "unet" / "diffusion_pytorch_model.safetensors").unlink()


@pytest.mark.parametrize("damage, named, why", [
    (damage_index("[]"), "model_index.json", "is not a JSON object of the pipeline's components"),
    (damage_index("null"), "model_index.json", "is not a JSON object of the pipeline's components"),
    (damage_index(DEEP), "model_index.json", "is not valid JSON (nested more than 64 levels deep)"),
    (truncate, "text_encoder/model.safetensors", "is damaged (Error while deserializing header"),
    (payload_bin, "text_encoder/pytorch_model.bin", "does not load (it asks for posix.mkdir, which is no tensor"),
    (delete_unet, "unet/diffusion_pytorch_model.safetensors", "is missing (no weights in"),
], ids=["index []", "index null", "index nested", "truncated text encoder", "payload .bin", "unet deleted"])
def test_a_damaged_model_folder_is_one_line_naming_the_file(image_folder, sd_copy, tmp_path, capsys, damage, named,
                                                           why):
    damage(sd_copy)
    out = tmp_path / "protos"
    assert run_script(PROTO, stage1(image_folder, sd_copy, out)) == 2
    line = one_error_line(capsys)
    assert f"{sd_copy / named} {why}" in line and "re-download the checkpoint" in line, line
    assert not (tmp_path / "ran").exists()  # the payload never ran
    assert not out.exists() or not any(out.iterdir())


def test_a_checkpoint_with_only_a_bin_of_tensors_passes_the_check(tiny_sd, tmp_path):
    """The check opens what diffusers would: a .bin of tensors (no .safetensors beside it) passes."""
    sd = shutil.copytree(tiny_sd, tmp_path / "sd")
    weights = load_file(sd / "text_encoder" / "model.safetensors")
    (sd / "text_encoder" / "model.safetensors").unlink()
    torch.save(weights, sd / "text_encoder" / "pytorch_model.bin")
    diffusion._check_local_folder(StableDiffusionGenLatentsPipeline, sd)


# ----------------------------------------------------------------------------- crafted teacher and checkpoint


def test_a_teacher_that_asks_for_code_is_one_short_line_without_unsafe_advice(tmp_path, capsys):
    data, _ = tiny_setup(tmp_path)
    teacher = tmp_path / "payload.pt"
    torch.save({"arch": Payload(tmp_path / "ran")}, teacher)
    assert run_script(TRAIN, ["--train-dir", data / "train", "--val-dir", data / "val", "--protocol", "online",
                              "--teacher-path", teacher, "--output-dir", tmp_path / "out", "--batch-size", 5,
                              "--input-size", 32, "--model", "convnet", "-j", 0, "--epochs", 1, "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert f"teacher file {teacher} does not load" in line and "it asks for posix.mkdir" in line
    assert "weights_only" not in line and "likely succeed" not in line and len(line) < 250, line
    assert not (tmp_path / "ran").exists()


def test_a_checkpoint_that_asks_for_code_is_one_short_line(tmp_path, capsys):
    data, teacher = tiny_setup(tmp_path)
    store = tmp_path / "store"
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 1, "--device", "cpu")) == 0
    checkpoint = tmp_path / "ckpt.pth.tar"
    torch.save({"model": Payload(tmp_path / "ran")}, checkpoint)
    capsys.readouterr()
    assert run_script(TRAIN, train_args(data, store, tmp_path / "out", "--epochs", 1, "--device", "cpu",
                                        "--resume", checkpoint)) == 2
    line = one_error_line(capsys)
    assert f"checkpoint {checkpoint} does not load (it asks for posix.mkdir" in line
    assert "likely succeed" not in line and len(line) < 300, line
    assert not (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------- names


def test_a_newline_in_a_class_name_stays_on_the_line(image_folder, tiny_sd, tmp_path, capsys):
    (image_folder / "train" / "class0").rename(image_folder / "train" / "a\nodd")
    assert run_script(PROTO, stage1(image_folder, tiny_sd, tmp_path / "p", "--ipc", 9)) == 2
    assert "class a\\nodd has 6 images, fewer than --ipc 9" in one_error_line(capsys)


def test_the_classes_line_escapes_a_newline():
    from d4m.data import describe_prompts
    assert describe_prompts(["odd\nname"], ["a prompt"]) == "classes and prompts: odd\\nname -> 'a prompt'"


# ----------------------------------------------------------------------------- refused before the work


def test_an_unreadable_validation_image_is_refused_before_the_first_epoch(tmp_path, capsys):
    data, teacher = tiny_setup(tmp_path)
    store = tmp_path / "store"
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 3, "--device", "cpu")) == 0
    bad = data / "val" / "class1" / "broken.png"
    bad.write_bytes(b"not an image at all")
    capsys.readouterr()
    out = tmp_path / "out"
    assert run_script(TRAIN, train_args(data, store, out, "--epochs", 3, "--device", "cpu")) == 2
    assert f"cannot read image {bad}" in one_error_line(capsys)
    assert not out.exists()  # no checkpoint, no metrics row: not one epoch was trained


def test_a_damaged_real_image_leaves_no_output(image_folder, tmp_path, capsys):
    for path in sorted((image_folder / "train" / "class2").glob("*.png")):
        path.write_bytes(b"damaged")
    out = tmp_path / "real"
    assert run_script(REAL, real(image_folder, out, "--ipc", 6)) == 2
    assert "cannot read image" in one_error_line(capsys)
    assert not out.exists()


# ----------------------------------------------------------------------------- symlinks in the output


def test_a_symlinked_class_folder_in_the_output_is_refused(image_folder, tmp_path, capsys):
    out, elsewhere = tmp_path / "real", tmp_path / "elsewhere"
    assert run_script(REAL, real(image_folder, out)) == 0
    elsewhere.mkdir()
    shutil.rmtree(out / "1")
    (out / "1").symlink_to(elsewhere)
    assert run_script(REAL, real(image_folder, out)) == 2
    line = one_error_line(capsys)
    assert f"{out / '1'} leads outside the output {out} (through a symbolic link)" in line, line
    assert not any(elsewhere.iterdir())
    assert not (out / ".lock").exists()


def test_every_stage_that_writes_under_a_folder_lock_is_confined_to_it(tmp_path):
    """Stage 2 (and any stage) writes its images through atomic_path under exclusive_run: a class folder that
    links elsewhere is refused, on every process, before a folder is made or a file written through it."""
    out, elsewhere = tmp_path / "syn", tmp_path / "elsewhere"
    (out / "000").mkdir(parents=True)
    elsewhere.mkdir()
    (out / "001").symlink_to(elsewhere)
    for rank in (0, 1):
        with outputs.exclusive_run(out / ".lock", "image folder", 0, 1) if rank == 0 else \
                outputs._confined_to(out / ".lock"):
            with outputs.atomic_path(out / "000" / "0.png") as tmp:
                tmp.write_bytes(b"inside")
            with pytest.raises(UsageError, match="leads outside the output"):
                with outputs.atomic_path(out / "001" / "sub" / "0.png"):
                    pass
    assert (out / "000" / "0.png").read_bytes() == b"inside" and not any(elsewhere.iterdir())
    with outputs.atomic_path(out / "001" / "0.png") as tmp:  # no lock held: the user's own links are theirs
        tmp.write_bytes(b"mine")


def test_a_symlinked_seed_folder_is_refused_before_anything_is_removed_through_it(tmp_path, capsys):
    data, teacher = tiny_setup(tmp_path)
    store, out, elsewhere = tmp_path / "store", tmp_path / "out", tmp_path / "elsewhere"
    assert run_script(MATCH, match_args(data, teacher, store, "--epochs", 1, "--device", "cpu")) == 0
    assert run_script(TRAIN, train_args(data, store, out, "--epochs", 1, "--device", "cpu", "--seeds", 2)) == 0
    shutil.move(out / "seed1", elsewhere)
    (out / "seed1").symlink_to(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    capsys.readouterr()
    assert run_script(TRAIN, train_args(data, store, out, "--epochs", 1, "--device", "cpu", "--seeds", 2,
                                        "--overwrite")) == 2
    assert f"{out / 'seed1'} leads outside the output {out}" in one_error_line(capsys)
    assert sorted(p.name for p in elsewhere.iterdir()) == before


# ----------------------------------------------------------------------------- stage 1's lock


def test_stage_1_takes_its_lock_before_its_model_loads(image_folder, tiny_sd, tmp_path, capsys, monkeypatch):
    """A second stage-1 run on one prototype file (another --seed) is refused before it loads a model, so that of
    two runs only one writes the file."""
    out = tmp_path / "protos"
    target = out / "data-ipc2-kmexpand2.safetensors"

    def loading(*args, **kwargs):
        raise AssertionError("the model loaded before the lock was taken")

    monkeypatch.setattr(diffusion, "load_pipeline", loading)
    out.mkdir()
    with outputs.exclusive(target.with_name(f".{target.name}.lock"), f"prototype file {target}"):
        assert run_script(PROTO, stage1(image_folder, tiny_sd, out, "--seed", 1)) == 2
    assert f"prototype file {target} is being written by another run" in one_error_line(capsys)
    assert not target.exists()
