"""Beyond D4M: mode guidance and candidate selection in stage 2, group sampling in stage 1, and the set scores
(coverage, Fréchet distance) of the evaluation."""
import json

import numpy as np
import pytest
import torch

from conftest import make_image_folder, run_script, run_torchrun
from d4m.kmeans import group_sample
from d4m.models import build_model, save_teacher
from d4m.scores import coverage, frechet
from d4m.selection import Scored, keep_confident, keep_diverse
from test_synthesis import FOLDER, SCRIPT, args, images, make_prototypes, make_reference

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prototypes(tmp_path_factory):
    return make_prototypes(tmp_path_factory.mktemp("protos"))


@pytest.fixture(scope="module")
def reference(prototypes, tiny_sd, tmp_path_factory):
    """The faithful images, which λ = 0 and candidate 0 must reproduce."""
    return make_reference(prototypes, tiny_sd, tmp_path_factory.mktemp("faithful"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(0)
    save_teacher(path, build_model("convnet", 3, 24), "convnet", 3, 24)
    return path


# ---- mode guidance


def test_lambda_zero_gives_the_faithful_images_and_guidance_changes_them(prototypes, tiny_sd, tmp_path, reference):
    assert run_script(SCRIPT, args(prototypes, tiny_sd, tmp_path / "zero", "--mode_guidance", 0,
                                   "--mode_guidance_stop", 3)) == 0
    assert images(tmp_path / "zero" / FOLDER) == reference
    assert run_script(SCRIPT, args(prototypes, tiny_sd, tmp_path / "mg", "--mode_guidance", 0.5,
                                   "--mode_guidance_stop", 4)) == 0
    guided = images(tmp_path / "mg" / f"{FOLDER}_mg0.5-4")
    assert sorted(guided) == sorted(reference) and all(guided[k] != reference[k] for k in reference)


def test_mode_guidance_pulls_the_latents_towards_the_prototype(tiny_sd):
    """With the same noise, a guided run ends nearer its mode (in latent space) than an unguided one."""
    from d4m.diffusion import load_pipeline
    from scripts.pipeline_stable_diffusion_latents2img import StableDiffusionLatents2ImgPipeline

    pipe = load_pipeline(StableDiffusionLatents2ImgPipeline, tiny_sd, torch.device("cpu"))
    start = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    mode = torch.zeros_like(start)
    ends = []
    for scale in (0.0, 1.0):
        ends.append(pipe(prompt=["a", "b"], latents=start, strength=1.0, guidance_scale=1.0, num_inference_steps=4,
                         generator=[torch.Generator().manual_seed(k) for k in range(2)], output_type="latent",
                         mode_latents=mode, mode_scale=scale, mode_stop=4).images)
    assert (ends[1] - mode).norm() < (ends[0] - mode).norm()


# ---- candidate selection


def scored(confidence, correct, features):
    return Scored(torch.tensor(confidence), torch.tensor(correct), torch.tensor(features, dtype=torch.float32))


def test_confidence_keeps_per_slot_the_surest_right_candidate():
    # two slots of three candidates; slot 0's surest (0.9) is wrong, so its surest right one (0.6) is kept;
    # slot 1 has no right candidate, so its surest is kept
    s = scored([0.9, 0.6, 0.5, 0.3, 0.7, 0.2], [False, True, True, False, False, False], [[0.0]] * 6)
    assert keep_confident(s, 3) == [1, 4]


def test_diverse_spreads_the_kept_candidates_over_the_features():
    # four right candidates: two near 0, two near 10; confidence alone would keep the two near 0
    s = scored([0.9, 0.8, 0.5, 0.4, 0.99], [True, True, True, True, False], [[0.0], [0.1], [10.0], [9.9], [5.0]])
    assert keep_diverse(s, 2) == [0, 2]
    # too few right ones: the surest wrong ones fill up
    assert keep_diverse(scored([0.2, 0.9, 0.5], [True, False, False], [[0.0], [1.0], [2.0]]), 2) == [0, 1]


def test_candidates_are_seeded_per_slot_and_candidate(prototypes, tiny_sd, teacher, tmp_path, reference):
    """The kept images are made from noise seeded by (seed, class, slot, candidate): the same whatever the batch size
    or process count; candidate 0 of each slot is the faithful image."""
    folder = f"{FOLDER}_c2-confidence"
    extra = ["--candidates", 2, "--select", "confidence", "--teacher_path", teacher]
    assert run_script(SCRIPT, args(prototypes, tiny_sd, tmp_path / "b1", *extra, "--batch_size", 1)) == 0
    one = images(tmp_path / "b1" / folder)
    done = run_torchrun(SCRIPT, args(prototypes, tiny_sd, tmp_path / "p2", *extra, "--batch_size", 5))
    assert done.returncode == 0, done.stderr[-2000:]
    assert images(tmp_path / "p2" / folder) == one and sorted(one) == sorted(reference)
    log = json.loads((tmp_path / "b1" / folder / "selection.json").read_text())
    assert sorted(log) == ["0", "1", "2"] and all(row["made"] == 8 and row["kept"] == 4 for row in log.values())
    for c, row in log.items():
        for j, (slot, candidate) in enumerate(row["kept_candidates"]):
            assert slot == j  # the confidence rule keeps one candidate per slot, in slot order
            if candidate == 0:
                assert one[f"{c}/{j}.png"] == reference[f"{c}/{j}.png"]
    assert not list(tmp_path.glob("b1/.*.candidates"))  # the candidates are removed once kept


@pytest.mark.parametrize("extra, says", [
    (["--mode_guidance", -0.5], "--mode_guidance: must be 0 or a positive number"),
    (["--mode_guidance", 0.5, "--mode_guidance_stop", 1], "--mode_guidance_stop 1 is outside the steps that run"),
    (["--mode_guidance", 0.5, "--mode_guidance_stop", 9], "--mode_guidance_stop 9 is outside the steps that run"),
    (["--candidates", 3], "--candidates needs a teacher"),
    (["--candidates", 0], "--candidates: must be a positive integer")])
def test_bad_options_are_one_line(prototypes, tiny_sd, tmp_path, capsys, extra, says):
    assert run_script(SCRIPT, args(prototypes, tiny_sd, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not list(tmp_path.iterdir())


# ---- group sampling


def test_group_sampling_keeps_real_latents_whose_moments_match_the_class():
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(200, 16, generator=gen) * 3 + 1
    chosen = group_sample(latents, 10, seed=0, label=4)
    assert chosen.shape == (10, 16)
    rows = {tuple(r) for r in latents.numpy()}
    assert all(tuple(r) in rows for r in chosen)  # real latents, not averages
    np.testing.assert_array_equal(chosen, group_sample(latents, 10, seed=0, label=4))
    # its spread is near the class's (k-means centres' is far smaller)
    assert abs(float(torch.tensor(chosen).std(0).mean()) - float(latents.std(0).mean())) < 0.5


def test_stage_1_group_sampling_writes_its_own_file(tmp_path, tiny_sd):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=6, size=16)
    common = ["--dataset", "imagefolder", "--data_dir", data, "--diffusion_checkpoints_path", tiny_sd, "--ipc", 2,
              "--km_expand", 1, "--size", 16, "--num_workers", 0, "--save_prototype_path", tmp_path / "p",
              "--device", "cpu"]
    assert run_script("distillation/gen_prototype.py", common) == 0
    assert run_script("distillation/gen_prototype.py", common + ["--kmeans", "groups"]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["data-ipc2-kmexpand1.safetensors",
                                                                  "data_groups-ipc2-kmexpand1.safetensors"]


# ---- set scores


def test_frechet_distance_of_a_set_to_itself_is_zero_and_of_a_shift_its_square():
    a = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert frechet(a, a) == pytest.approx(0, abs=1e-8)
    assert frechet(a, a + 2) == pytest.approx(8 * 4, rel=1e-6)


def test_coverage_counts_the_real_images_near_a_set_image():
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    overall, per_class = coverage(real, labels, real, labels)
    assert overall == 100 and per_class == [100, 100]
    # class 0: radius 1 (the median nearest-neighbour distance): 0 and 1 lie within 1 of the set image 0.5
    overall, per_class = coverage(real, labels, torch.tensor([[0.5], [30.0]]), torch.tensor([0, 1]))
    assert per_class == pytest.approx([200 / 3, 0]) and overall == pytest.approx(100 * 2 / 6)
