"""distillation/train_tiny_ldm.py: a few steps on a tiny image folder give a folder that SD's img2img loads and runs."""
from __future__ import annotations

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
