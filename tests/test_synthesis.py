"""distillation/gen_syn_image.py: layout, determinism across batch size and processes, resume, bad input."""
import json
import os

import pytest
import torch

from conftest import run_script, run_torchrun
from d4m.data import read_class_list
from d4m.prototypes import save_prototypes
from test_prototypes import shown

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = "distillation/gen_syn_image.py"
PROMPTS = ["a red fish", "a green bird", "a blue car"]
FOLDER = "imagefolder_ipc2_4_s0.7_g8.0_kmexpand1"


def make_prototypes(folder):
    path = folder / "imagefolder-ipc2-kmexpand1.safetensors"
    tensor = torch.randn(3, 2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    save_prototypes(path, PROMPTS, tensor)
    return path


@pytest.fixture(scope="module")
def prototypes(tmp_path_factory):
    return make_prototypes(tmp_path_factory.mktemp("protos"))


def args(protos, sd, out, *extra):
    return ["--dataset", "imagefolder", "--prototype_path", protos, "--diffusion_checkpoints_path", sd,
            "--save_init_image_path", out, "--ipc", 4, "--km_expand", 1, "--strength", 0.7, "-g", 8,
            "--num_inference_steps", 4, "--image_size", 24, "--device", "cpu", "--seed", 1, *extra]


def images(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def make_reference(prototypes, tiny_sd, out):
    """One run with batch size 3: the images every other run must reproduce byte for byte."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_script(SCRIPT, args(prototypes, tiny_sd, out, "--batch_size", 3)) == 0
    finally:
        torch.set_num_threads(threads)
    return images(out / FOLDER)


@pytest.fixture(scope="module")
def reference(prototypes, tiny_sd, tmp_path_factory):
    return make_reference(prototypes, tiny_sd, tmp_path_factory.mktemp("syn-b3"))


def test_layout_sorts_in_class_order(reference):
    assert sorted(reference) == [f"{c}/{j}.png" for c in range(3) for j in range(4)]
    from PIL import Image
    import io
    assert Image.open(io.BytesIO(reference["2/3.png"])).size == (24, 24)


def test_batch_size_does_not_change_images(prototypes, tiny_sd, tmp_path, reference):
    assert run_script(SCRIPT, args(prototypes, tiny_sd, tmp_path, "--batch_size", 1)) == 0
    assert images(tmp_path / FOLDER) == reference
    classes = read_class_list(tmp_path / FOLDER)  # what each class folder holds, for the label check of matching
    assert [(c["folder"], c["name"], c["prompt"]) for c in classes] == [(str(i), str(i), PROMPTS[i]) for i in range(3)]


def test_resume_remakes_only_missing_images(prototypes, tiny_sd, tmp_path, reference):
    assert run_script(SCRIPT, args(prototypes, tiny_sd, tmp_path, "--batch_size", 5)) == 0
    root = tmp_path / FOLDER
    (root / "1/2.png").unlink()
    before = {p: os.stat(p).st_mtime_ns for p in root.rglob("*.png")}
    assert run_script(SCRIPT, args(prototypes, tiny_sd, tmp_path, "--batch_size", 5)) == 0
    assert {p: os.stat(p).st_mtime_ns for p in before} == before
    assert (root / "1/2.png").read_bytes() == reference["1/2.png"]
    assert images(root) == reference


def test_a_resume_with_other_settings_is_refused_and_mixes_nothing(prototypes, tiny_sd, tmp_path, reference, capsys):
    assert run_script(SCRIPT, args(prototypes, tiny_sd, tmp_path, "--batch_size", 6)) == 0
    root = tmp_path / FOLDER
    (root / "1/2.png").unlink()
    manifest = (root / "manifest.json").read_text()
    capsys.readouterr()
    assert run_script(SCRIPT, args(prototypes, tiny_sd, tmp_path) + ["--seed", 2]) == 2
    err = shown(capsys.readouterr().err)
    assert len(err) == 1 and "was made with other settings (seed 1 there, 2 here)" in err[0], err
    assert not (root / "1/2.png").exists() and (root / "manifest.json").read_text() == manifest
    assert run_script(SCRIPT, args(prototypes, tiny_sd, tmp_path)) == 0  # the recorded settings resume
    assert images(root) == reference


def test_images_without_a_manifest_are_refused_and_an_empty_claim_is_taken_over(prototypes, tiny_sd, tmp_path,
                                                                               capsys):
    root = tmp_path / FOLDER
    (root / "0").mkdir(parents=True)
    (root / "0/0.png").write_bytes(b"made by someone else")
    capsys.readouterr()
    assert run_script(SCRIPT, args(prototypes, tiny_sd, tmp_path)) == 2
    assert "holds files but no readable manifest.json" in shown(capsys.readouterr().err)[0]
    (root / "0/0.png").unlink()
    (root / "manifest.json").write_text('{"seed": 7}')  # a run that stopped before its first image
    assert run_script(SCRIPT, args(prototypes, tiny_sd, tmp_path)) == 0
    assert json.loads((root / "manifest.json").read_text())["seed"] == 1


def test_torchrun_two_processes_make_the_same_images(prototypes, tiny_sd, tmp_path, reference):
    done = run_torchrun(SCRIPT, args(prototypes, tiny_sd, tmp_path, "--batch_size", 3))
    assert done.returncode == 0, done.stderr[-2000:]
    assert images(tmp_path / FOLDER) == reference


def test_a_resumed_run_shares_what_is_left_equally():
    from conftest import load_script

    my_share = load_script(SCRIPT).my_share
    todo = list(range(7))
    shares = [my_share(todo, rank, 3) for rank in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert [my_share([9], rank, 2) for rank in range(2)] == [[9], []]


def test_prints_its_device_line(prototypes, tiny_sd, tmp_path, capsys, reference):
    assert run_script(SCRIPT, args(prototypes, tiny_sd, tmp_path, "--batch_size", 6)) == 0
    assert capsys.readouterr().out.splitlines()[0] == ("synthesis: cpu (1 threads), float32, 1 process, batch 6, "
                                                       "12 of 12 images to make")


def _labels(tmp_path, lines):
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(lines) + "\n")
    return ["--label_file_path", path]


BAD = {
    "prompts differ": lambda tmp: (_labels(tmp, ["a red fish", "a cat", "a blue car"]), "'a cat'"),
    "class count differs": lambda tmp: (_labels(tmp, PROMPTS[:2]), "has 3 classes but label file"),
    "ipc not a multiple": lambda tmp: (["--ipc", 3], "not a multiple of the 2 prototypes"),
    "strength zero": lambda tmp: (["--strength", 0], "--strength must be in (0, 1]"),
    "strength above one": lambda tmp: (["-s", 1.5], "--strength must be in (0, 1]"),
    "not a model": lambda tmp: (["--diffusion_checkpoints_path", tmp], "model_index.json"),
    "missing prototypes": lambda tmp: (["--prototype_path", tmp / "none.safetensors"], "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, prototypes, tiny_sd, tmp_path, capsys):
    override, message = BAD[case](tmp_path)
    out = tmp_path / "syn"
    capsys.readouterr()
    assert run_script(SCRIPT, args(prototypes, tiny_sd, out) + override) == 2
    err = shown(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists()


def test_dtype_auto_is_float32_on_cpu_and_float16_on_cuda():
    from d4m.diffusion import pipeline_dtype

    assert pipeline_dtype(torch.device("cpu")) == torch.float32
    assert pipeline_dtype(torch.device("cuda")) == torch.float16
    assert pipeline_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16


def test_dtype_flag_sets_the_pipeline_dtype_and_float32_keeps_the_images(prototypes, tiny_sd, tmp_path, reference):
    from d4m.diffusion import load_pipeline
    from scripts.pipeline_stable_diffusion_latents2img import StableDiffusionLatents2ImgPipeline

    pipe = load_pipeline(StableDiffusionLatents2ImgPipeline, str(tiny_sd), torch.device("cpu"), dtype="bfloat16")
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert run_script(SCRIPT, args(prototypes, tiny_sd, tmp_path, "--batch_size", 6, "--dtype", "float32")) == 0
    assert images(tmp_path / FOLDER) == reference


def test_attention_runs_on_sdpa(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from d4m.diffusion import load_pipeline, use_sdpa
    from scripts.pipeline_stable_diffusion_latents2img import StableDiffusionLatents2ImgPipeline

    pipe = load_pipeline(StableDiffusionLatents2ImgPipeline, str(tiny_sd), torch.device("cpu"))
    for model in (pipe.unet, pipe.vae):
        assert all(isinstance(p, AttnProcessor2_0) for p in model.attn_processors.values())
    pipe.unet.set_attn_processor(AttnProcessor())
    use_sdpa(pipe)
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())


def test_compile_wraps_the_unet_where_available(tiny_sd):
    from d4m.diffusion import compile_unavailable, compile_unet, load_pipeline
    from scripts.pipeline_stable_diffusion_latents2img import StableDiffusionLatents2ImgPipeline

    cpu = torch.device("cpu")
    if compile_unavailable(cpu):
        pytest.skip(compile_unavailable(cpu))
    pipe = load_pipeline(StableDiffusionLatents2ImgPipeline, str(tiny_sd), cpu)
    assert compile_unet(pipe, cpu) == ""
    assert pipe.unet._compiled_call_impl is not None  # what nn.Module.compile() sets; compiling runs on first use


def test_compile_unavailable_is_skipped_with_a_message(prototypes, tiny_sd, tmp_path, reference, monkeypatch, capsys):
    import d4m.diffusion

    monkeypatch.setattr(d4m.diffusion, "compile_unavailable", lambda device: "no compiler here")
    capsys.readouterr()
    assert run_script(SCRIPT, args(prototypes, tiny_sd, tmp_path, "--batch_size", 6, "--compile")) == 0
    assert "--compile skipped: no compiler here; the UNet runs uncompiled" in capsys.readouterr().err
    assert images(tmp_path / FOLDER) == reference
