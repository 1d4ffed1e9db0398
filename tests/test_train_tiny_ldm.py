"""distillation/train_tiny_ldm.py: a few steps on a tiny image folder give a folder that SD's img2img loads and runs."""
from __future__ import annotations

import shutil

import pytest
import torch
from conftest import make_image_folder, run_script
from diffusers import StableDiffusionImg2ImgPipeline

SCRIPT = "distillation/train_tiny_ldm.py"
TINY = ["--vae_channels", "8", "16", "--unet_channels", "16", "32", "--text_dim", "16", "--text_layers", "1",
        "--vae_steps", "3", "--unet_steps", "3", "--batch_size", "4", "--image_size", "32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm")
    data = make_image_folder(root / "data")
    out = root / "model"
    args = ["--dataset", "imagefolder", "--data_dir", data, "--output", out, "--fp16", *TINY]
    assert run_script(SCRIPT, args) == 0
    return out


def test_folder_loads_and_runs_img2img(trained):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(trained, dtype=torch.float32, local_files_only=True,
                                                          safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.dtype == torch.float32 and pipe.vae.config.scaling_factor != 0.18215
    pipe.set_progress_bar_config(disable=True)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = pipe(["class1"], image=latent, strength=0.7, guidance_scale=8.0, num_inference_steps=4,
               negative_prompt=["cartoon, anime, painting"], generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()


def test_bad_input_exits_2(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    labels = tmp_path / "labels.txt"
    labels.write_text("only one\n")
    out = tmp_path / "model"
    common = ["--dataset", "imagefolder", "--output", out, "--device", "cpu", *TINY]
    assert run_script(SCRIPT, [*common, "--data_dir", tmp_path / "missing"]) == 2
    assert run_script(SCRIPT, [*common, "--data_dir", data, "--label_file_path", labels]) == 2
    assert run_script(SCRIPT, [*common, "--data_dir", data, "--image_size", "33"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert not out.exists()


def test_outputs_are_checked_before_the_work_and_a_model_replaced_only_with_overwrite(trained, tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    others = tmp_path / "others"
    others.mkdir()
    (others / "notes.txt").write_text("keep me")
    common = ["--dataset", "imagefolder", "--data_dir", data, "--device", "cpu", *TINY]
    cases = [(["--output", trained], "holds a model already; pass --overwrite"),
             (["--output", others, "--overwrite"], "holds files but no model"),
             (["--output", tmp_path / "model", "--samples", blocker / "grid.png"], "is a file, so"),
             (["--output", blocker / "model"], "is a file, so")]
    index = (trained / "model_index.json").read_bytes()
    for extra, says in cases:
        assert run_script(SCRIPT, common + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "model").exists() and (others / "notes.txt").read_text() == "keep me"
    assert (trained / "model_index.json").read_bytes() == index
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    assert run_script(SCRIPT, common + ["--output", copy, "--overwrite"]) == 0
    assert (copy / "model_index.json").is_file() and not (copy.parent / ".copy.tmp").exists()
