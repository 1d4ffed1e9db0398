"""D4M's successors (distillation/gen_mgd3.py, gen_d3hr.py, gen_cao2.py) and their sampler pipeline
(scripts/pipeline_stable_diffusion_sampler.py): DDIM inversion, MGD3's mode guidance, x̂0 and σ per step, D3HR's
group score, CaO2's keep rule, images independent of batch size and process count, resume, bad input."""
import math
import os
import shutil

import pytest
import torch

from conftest import make_image_folder, one_error_line, run_script, run_torchrun
from d4m.prototypes import save_prototypes

pytestmark = pytest.mark.usefixtures("one_thread")
MGD3, D3HR, CAO2 = "distillation/gen_mgd3.py", "distillation/gen_d3hr.py", "distillation/gen_cao2.py"
PROMPTS = ["a red fish", "a green bird"]
CPU = torch.device("cpu")


def images(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def in_one_thread(fn):
    """Module fixtures run outside the one_thread fixture: the same one-thread setting for them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sampler(tiny_sd):
    from d4m.diffusion import load_sampler

    return load_sampler(str(tiny_sd), CPU, "float32", "DDIMScheduler")


def embeddings(pipe, prompts, guidance_scale):
    from d4m.diffusion import EmbeddingCache

    return EmbeddingCache(pipe, "", guidance_scale > 1).batch(prompts)


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


# ---- 1. DDIM inversion


@pytest.mark.parametrize("guidance_scale, bound", [(1.0, 0.27), (4.0, 0.34)])
def test_ddim_inversion_then_decoding_returns_the_latents(sampler, guidance_scale, bound):
    """Tolerance: on the tiny (random) model, 6 steps of which 3 inverted, x0 = 0.5 N(0, I), the measured relative L2
    error of decode(invert(x0)) is 0.245 without CFG and 0.312 with CFG 4; bounds 0.27 and 0.34. The error is the
    inversion's usual approximation (the model's output at x_(t_k) stands in for x_(t_(k+1))'s) on a model whose
    output changes fast with its input (with DDIM's default clipping of x̂0 to [-1, 1], which load_sampler turns off
    as SD-1.5's configuration does, it was 0.288 / 0.345). A decode of random
    noise at the same level instead lands at 1.27 (checked: the bound separates the two)."""
    n, k = 6, 3
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    positive, negative = embeddings(sampler, PROMPTS, guidance_scale)
    inverted = sampler.invert(x0, positive, negative, guidance_scale=guidance_scale, num_inference_steps=n, steps=k)
    back = sampler(positive, inverted, negative, guidance_scale=guidance_scale, num_inference_steps=n,
                   start_step=n - k, output_type="latent")
    assert relative_error(back, x0) < bound
    t = sampler.scheduler.timesteps[n - k]
    a = sampler.scheduler.alphas_cumprod[int(t)]
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    random = sampler(positive, noisy, negative, guidance_scale=guidance_scale, num_inference_steps=n,
                     start_step=n - k, output_type="latent")
    assert relative_error(random, x0) > 1.0


def constant_prediction(sample, t, encoder_hidden_states=None, return_dict=False, **_):
    """A UNet forward whose prediction depends on the prompt only: ε is then the same at every level, so that DDIM
    inversion is exact and x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε in closed form."""
    per_prompt = encoder_hidden_states.mean((1, 2)).view(-1, 1, 1, 1) * 20
    pattern = torch.linspace(-1, 1, sample[0].numel()).view(sample.shape[1:])
    return ((per_prompt + pattern).expand_as(sample).contiguous(),)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_ddim_inversion_reaches_the_level_of_its_start_step_exactly(sampler, guidance_scale, monkeypatch):
    """With a prediction that depends on neither x_t nor t, inversion lands on the closed form at the noise level
    of timesteps[N - K] (float32 rounding only), and decoding from there returns x0: a wrong level or step would
    not."""
    n, k = 6, 3
    x0 = (torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.3).clamp(-0.9, 0.9)
    positive, negative = embeddings(sampler, PROMPTS, guidance_scale)
    monkeypatch.setattr(sampler.unet, "forward", constant_prediction)
    eps = sampler.model_output(x0, torch.tensor(1), torch.cat([negative, positive]) if guidance_scale > 1 else positive,
                               guidance_scale)
    inverted = sampler.invert(x0, positive, negative, guidance_scale=guidance_scale, num_inference_steps=n, steps=k)
    # x0 sits at the level that DDIM decoding ends at (the schedule's final ᾱ, ᾱ_0 here: set_alpha_to_one False)
    final = sampler.scheduler.final_alpha_cumprod.double()
    assert final == sampler.scheduler.alphas_cumprod[0].double()
    clean = (x0.double() - (1 - final).sqrt() * eps.double()) / final.sqrt()
    a = sampler.scheduler.alphas_cumprod[int(sampler.scheduler.timesteps[n - k])].double()
    expected = a.sqrt() * clean + (1 - a).sqrt() * eps.double()
    torch.testing.assert_close(inverted.double(), expected, atol=1e-5, rtol=1e-5)
    back = sampler(positive, inverted, negative, guidance_scale=guidance_scale, num_inference_steps=n,
                   start_step=n - k, output_type="latent")
    torch.testing.assert_close(back, x0, atol=1e-5, rtol=1e-5)


# ---- 2. D3HR's group score


def d3hr():
    from conftest import load_script

    return load_script(D3HR)


def score_by_loops(group, mean, std):
    """D3HR's score of one group [ipc][D] (lists of floats), written out: the L2 gaps of the group's mean and
    (unbiased) standard deviation per dimension to the class's, plus 0.1 x the L2 norm over the members of each
    member's skewness across dimensions after standardising each dimension by the group's own mean and deviation,
    with the factor d / ((d - 1)(d - 2))."""
    n, d = len(group), len(mean)
    means = [sum(member[i] for member in group) / n for i in range(d)]
    score = math.sqrt(sum((means[i] - mean[i]) ** 2 for i in range(d)))
    if n == 1:
        return score
    stds = [math.sqrt(sum((member[i] - means[i]) ** 2 for member in group) / (n - 1)) for i in range(d)]
    score += math.sqrt(sum((stds[i] - std[i]) ** 2 for i in range(d)))
    skews = [sum(((member[i] - means[i]) / stds[i]) ** 3 for i in range(d)) * d / ((d - 1) * (d - 2))
             for member in group]
    return score + 0.1 * math.sqrt(sum(s * s for s in skews))


@pytest.mark.parametrize("ipc", [1, 2, 3, 5])
def test_d3hr_group_score_is_mean_std_and_skewness_gaps(ipc):
    gen = torch.Generator().manual_seed(ipc)
    mean, std = torch.randn(7, generator=gen), torch.rand(7, generator=gen) + 0.5
    samples = mean + std * torch.randn(4, ipc, 7, generator=gen) * torch.tensor([0.5, 1.0, 2.0, 1.0]).view(4, 1, 1)
    expected = [score_by_loops(group.tolist(), mean.tolist(), std.tolist()) for group in samples.double()]
    scores = d3hr().group_scores(samples, mean, std)
    assert scores.shape == (4,)
    torch.testing.assert_close(scores.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    if ipc == 1:
        torch.testing.assert_close(scores, (samples[:, 0] - mean).norm(dim=1))


def test_d3hr_best_group_is_the_argmin_over_all_chunks_of_its_seed_and_label():
    from d4m.runtime import seeded_generator

    module = d3hr()
    assert module.GROUP_CHUNK == 1000
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.randn(6, generator=gen), torch.rand(6, generator=gen) + 0.5
    best = module.best_group(mean, std, 3, 2500, seed=4, label=2)
    # the same 2500 groups drawn by hand (chunks of 1000, 1000, 500 from generators seeded (seed, label, chunk)),
    # all scored at once
    noise = torch.cat([torch.randn(size, 3, 6, generator=seeded_generator(4, 2, k))
                       for k, size in enumerate((1000, 1000, 500))])
    samples = mean + std * noise
    scores = module.group_scores(samples, mean, std)
    assert best.shape == (3, 6)
    assert torch.equal(best, samples[int(scores.argmin())])
    assert int(scores.argmin()) >= 1000  # the best is in a later chunk here: chunks are compared, not only scored
    # a function of (seed, label) and the Gaussian only: the same on a second call, another for another label or seed
    assert torch.equal(module.best_group(mean, std, 3, 2500, seed=4, label=2), best)
    assert not torch.equal(module.best_group(mean, std, 3, 2500, seed=4, label=3), best)
    assert not torch.equal(module.best_group(mean, std, 3, 2500, seed=5, label=2), best)
    # fewer groups: the best of the first chunk only
    first = samples[:1000]
    assert torch.equal(module.best_group(mean, std, 3, 1000, seed=4, label=2),
                       first[int(module.group_scores(first, mean, std).argmin())])


# ---- 3. MGD3's mode guidance: the steps it touches, the schedulers it takes


def sampler_module():
    import scripts.pipeline_stable_diffusion_sampler as module

    return module


def scheduler_from(pipe, name, **overrides):
    import diffusers

    return getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)


def ddpm_sigma(config, steps, index):
    """σ of step `index` of a `steps`-step schedule, as DDPMScheduler (fixed_small) computes its variance."""
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(config, variance_type="fixed_small")
    ddpm.set_timesteps(steps)
    return float(ddpm._get_variance(ddpm.timesteps[index])) ** 0.5


@torch.no_grad()
def guided_by_hand(pipe, noise, embeds, modes, scale, stop, steps, generators):
    """MGD3's sampler written out: each step of the scheduler, then for steps of index < stop the latent moves by
    λ σ_i (mode - x̂0), x̂0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t) and σ_i from DDPMScheduler's own variance."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    extra = {"generator": generators} if type(scheduler).__name__ == "DDPMScheduler" else {"eta": 0.0,
                                                                                         "generator": generators}
    for i, t in enumerate(scheduler.timesteps):
        eps = pipe.unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=embeds).sample
        after = scheduler.step(eps, t, x, **extra).prev_sample
        if i < stop:
            a = scheduler.alphas_cumprod[int(t)]
            clean = (x - (1 - a).sqrt() * eps) / a.sqrt()
            after = after + scale * ddpm_sigma(scheduler.config, steps, i) * (modes - clean)
        x = after
    return x


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("stop", [0, 2, 5])
def test_mode_guidance_touches_exactly_the_steps_before_stop(sampler, name, stop, monkeypatch):
    module = sampler_module()
    monkeypatch.setattr(sampler, "scheduler", scheduler_from(sampler, name))
    guided_at = []
    sigma = module.stochastic_sigma
    monkeypatch.setattr(module, "stochastic_sigma", lambda s, i: guided_at.append(i) or sigma(s, i))
    steps, scale = 5, 0.7
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    modes = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2)) * 0.5
    positive, _ = embeddings(sampler, PROMPTS, 1.0)
    seeds = lambda: [torch.Generator().manual_seed(10 + k) for k in range(2)]
    out = sampler(positive, noise, guidance_scale=1.0, num_inference_steps=steps, generator=seeds(), modes=modes,
                  mode_scale=scale, mode_stop=stop, output_type="latent")
    assert guided_at == list(range(stop))
    expected = guided_by_hand(sampler, noise, positive, modes, scale, stop, steps, seeds())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if stop:  # the guidance moved the result (so that the comparison above can fail)
        plain = guided_by_hand(sampler, noise, positive, modes, scale, 0, steps, seeds())
        assert relative_error(out, plain) > 0.01
    # from a later start_step (an inverted latent), the guided steps are still counted from the schedule's first
    guided_at.clear()
    sampler(positive, noise, guidance_scale=1.0, num_inference_steps=steps, start_step=2, generator=seeds(),
            modes=modes, mode_scale=scale, mode_stop=stop, output_type="latent")
    assert guided_at == list(range(2, stop))


@pytest.mark.parametrize("name", ["PNDMScheduler", "EulerDiscreteScheduler"])
def test_mode_guidance_refuses_schedulers_it_cannot_steer(sampler, name, monkeypatch):
    module = sampler_module()
    scheduler = scheduler_from(sampler, name)
    with pytest.raises(ValueError) as refused:
        module.check_guidable(scheduler)
    assert "\n" not in str(refused.value) and name in str(refused.value)
    monkeypatch.setattr(sampler, "scheduler", scheduler)
    positive, _ = embeddings(sampler, PROMPTS[:1], 1.0)
    noise, modes = torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 16, 16)
    with pytest.raises(ValueError, match=name):
        sampler(positive, noise, guidance_scale=1.0, num_inference_steps=3, modes=modes, mode_scale=0.5,
                mode_stop=2, output_type="latent")
    # unguided, it samples
    unguided = sampler(positive, noise, guidance_scale=1.0, num_inference_steps=3, output_type="latent")
    assert unguided.shape == noise.shape
    for fine in ("DDPMScheduler", "DDIMScheduler"):
        module.check_guidable(scheduler_from(sampler, fine))


# ---- 4. x̂0 by prediction type, σ per step


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_predicted_clean_is_the_closed_form_of_the_prediction_type(sampler, kind):
    module = sampler_module()
    scheduler = scheduler_from(sampler, "DDPMScheduler", prediction_type=kind, clip_sample=False)
    gen = torch.Generator().manual_seed(3)
    x, output = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    scheduler.set_timesteps(10)
    for t in scheduler.timesteps:
        a = scheduler.alphas_cumprod[int(t)].double()
        closed = {"epsilon": (x.double() - (1 - a).sqrt() * output.double()) / a.sqrt(),
                  "v_prediction": a.sqrt() * x.double() - (1 - a).sqrt() * output.double(),
                  "sample": output.double()}[kind]
        clean = module.predicted_clean(scheduler, x, output, t)
        torch.testing.assert_close(clean.double(), closed, rtol=1e-5, atol=1e-5)
        # and as the scheduler's own step reads it
        torch.testing.assert_close(clean, scheduler.step(output, t, x).pred_original_sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [1, 5, 50])
def test_stochastic_sigma_is_ddpm_own_standard_deviation_at_every_step(sampler, steps):
    module = sampler_module()
    for name in ("DDPMScheduler", "DDIMScheduler"):  # the schedule's, whichever sampler runs it
        scheduler = scheduler_from(sampler, name)
        scheduler.set_timesteps(steps)
        sigmas = [module.stochastic_sigma(scheduler, i) for i in range(steps)]
        expected = [ddpm_sigma(sampler.scheduler.config, steps, i) for i in range(steps)]
        assert sigmas == pytest.approx(expected, rel=1e-5, abs=1e-9)
        assert sigmas[-1] == 0 and all(s > 0 for s in sigmas[:-1])


# ---- the scripts: MGD3, D3HR, CaO2 on two classes of the tiny model


def mgd3_args(protos, sd, out, *extra):
    return ["--dataset", "imagefolder", "--prototype_path", protos, "--diffusion_checkpoints_path", sd,
            "--save_init_image_path", out, "--ipc", 3, "--size", 32, "--image_size", 24, "--num_inference_steps", 5,
            "--mode_guidance_scale", 0.5, "--mode_guidance_stop", 3, "-g", 2, "--device", "cpu", "--seed", 1, *extra]


def d3hr_args(data, sd, out, *extra):
    return ["--dataset", "imagefolder", "--data_dir", data, "--diffusion_checkpoints_path", sd,
            "--save_init_image_path", out, "--statistics_dir", out / "stats", "--ipc", 3, "--size", 32,
            "--image_size", 24, "--num_inference_steps", 5, "--inversion_steps", 3, "--inversion_images", 4,
            "--groups", 30, "--num_workers", 0, "-g", 2, "--device", "cpu", "--seed", 1, *extra]


def cao2_args(data, sd, out, *extra, teacher=None):
    return ["--dataset", "imagefolder", "--data_dir", data, "--diffusion_checkpoints_path", sd,
            "--save_init_image_path", out, *(["--teacher_path", teacher] if teacher else []), "--ipc", 2,
            "--candidates", 2, "--size", 32, "--image_size", 24, "--num_inference_steps", 4,
            "--optimization_steps", 2, "--optimization_levels", 2, "--device", "cpu", "--seed", 1, *extra]


MGD3_SET, D3HR_SET, CAO2_SET = "imagefolder_mgd3_ipc3_seed1", "data_d3hr_ipc3_seed1", "data_cao2_ipc2_seed1"


@pytest.fixture(scope="module")
def prototypes(tmp_path_factory):
    path = tmp_path_factory.mktemp("protos") / "modes.safetensors"
    save_prototypes(path, PROMPTS, torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("d3hr") / "data", classes=2, per_class=5, size=32)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from d4m.models import build_model, save_teacher

    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(0)
    save_teacher(path, build_model("convnet", 2, 24), "convnet", 2, 24)
    return path


def reference_run(script, arguments, out, folder):
    assert in_one_thread(lambda: run_script(script, arguments)) == 0
    return images(out / folder)


@pytest.fixture(scope="module")
def mgd3_reference(prototypes, tiny_sd, tmp_path_factory):
    """Batch size 5: a batch across the two classes, then one of a single image."""
    out = tmp_path_factory.mktemp("mgd3-b5")
    return out, reference_run(MGD3, mgd3_args(prototypes, tiny_sd, out, "--batch_size", 5), out, MGD3_SET)


@pytest.fixture(scope="module")
def d3hr_reference(data, tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("d3hr-b3")
    return out, reference_run(D3HR, d3hr_args(data, tiny_sd, out, "--batch_size", 3), out, D3HR_SET)


@pytest.fixture(scope="module")
def cao2_reference(data, tiny_sd, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("cao2-b3")
    return out, reference_run(CAO2, cao2_args(data, tiny_sd, out, "--batch_size", 3, teacher=teacher), out, CAO2_SET)


def selections(root):
    return {p.name: p.read_text() for p in sorted((root / ".selection").iterdir())}


# ---- 6. the same images whatever the batch size or process count


def test_mgd3_images_do_not_depend_on_batch_size_or_processes(prototypes, tiny_sd, tmp_path, mgd3_reference):
    _, reference = mgd3_reference
    assert sorted(reference) == [f"{c}/{j}.png" for c in range(2) for j in range(3)]
    assert run_script(MGD3, mgd3_args(prototypes, tiny_sd, tmp_path / "b1", "--batch_size", 1)) == 0
    assert images(tmp_path / "b1" / MGD3_SET) == reference
    done = run_torchrun(MGD3, mgd3_args(prototypes, tiny_sd, tmp_path / "p2", "--batch_size", 2))
    assert done.returncode == 0, done.stderr[-2000:]
    assert images(tmp_path / "p2" / MGD3_SET) == reference


def test_d3hr_images_do_not_depend_on_batch_size_or_processes(data, tiny_sd, tmp_path, d3hr_reference):
    out, reference = d3hr_reference
    assert sorted(reference) == [f"{c}/{j}.png" for c in range(2) for j in range(3)]
    assert len(set(reference.values())) == 6
    assert run_script(D3HR, d3hr_args(data, tiny_sd, tmp_path / "b1", "--batch_size", 1)) == 0
    assert images(tmp_path / "b1" / D3HR_SET) == reference
    # the class statistics too (inverted with another batch size, in another folder)
    for c in range(2):
        name = next((out / "stats").iterdir()).name
        assert ((tmp_path / "b1" / "stats" / name / f"{c}.safetensors").read_bytes()
                == (out / "stats" / name / f"{c}.safetensors").read_bytes())
    done = run_torchrun(D3HR, d3hr_args(data, tiny_sd, tmp_path / "p2", "--batch_size", 2))
    assert done.returncode == 0, done.stderr[-2000:]
    assert images(tmp_path / "p2" / D3HR_SET) == reference


def test_cao2_images_do_not_depend_on_batch_size_or_processes(data, tiny_sd, teacher, tmp_path, cao2_reference):
    out, reference = cao2_reference
    assert sorted(reference) == [f"{c}/{j}.png" for c in range(2) for j in range(2)]
    assert run_script(CAO2, cao2_args(data, tiny_sd, tmp_path / "b1", "--batch_size", 1, teacher=teacher)) == 0
    assert images(tmp_path / "b1" / CAO2_SET) == reference
    assert selections(tmp_path / "b1" / CAO2_SET) == selections(out / CAO2_SET)
    done = run_torchrun(CAO2, cao2_args(data, tiny_sd, tmp_path / "p2", "--batch_size", 2, teacher=teacher))
    assert done.returncode == 0, done.stderr[-2000:]
    assert images(tmp_path / "p2" / CAO2_SET) == reference


# ---- 3 (the script). λ = 0 is the unguided sampler, bit for bit


def test_mgd3_lambda_zero_is_the_unguided_sampler_bit_for_bit(prototypes, tiny_sd, tmp_path, mgd3_reference):
    from d4m.diffusion import EmbeddingCache, batch_invariant, load_sampler
    from d4m.imageset import save_image
    from d4m.runtime import seeded_generator

    assert run_script(MGD3, mgd3_args(prototypes, tiny_sd, tmp_path / "zero", "--mode_guidance_scale", 0,
                                      "--batch_size", 6)) == 0
    assert run_script(MGD3, mgd3_args(prototypes, tiny_sd, tmp_path / "stop0", "--mode_guidance_stop", 0,
                                      "--batch_size", 6)) == 0
    zero = images(tmp_path / "zero" / MGD3_SET)
    assert images(tmp_path / "stop0" / MGD3_SET) == zero
    # the pipeline called with no modes at all, image by image, from the generators the script seeds by (seed, c, j)
    pipe = load_sampler(str(tiny_sd), CPU, "float32", "DDPMScheduler")
    embeds = EmbeddingCache(pipe, "", True)
    with batch_invariant(pipe, CPU):
        for c in range(2):
            for j in range(3):
                generator = seeded_generator(1, c, j)
                noise = torch.randn(4, 16, 16, generator=generator)[None]
                positive, negative = embeds.batch([PROMPTS[c]])
                image = pipe(positive, noise, negative, guidance_scale=2.0, num_inference_steps=5,
                             generator=[generator])[0]
                save_image(image, tmp_path / "direct" / f"{c}/{j}.png", 24, "lanczos")
    assert images(tmp_path / "direct") == zero
    # and guidance (the reference, λ 0.5 for 3 steps) changes every image
    _, guided = mgd3_reference
    assert all(guided[k] != zero[k] for k in zero)


# ---- 5. CaO2's keep rule


def keep_by_hand(probabilities, label, keep):
    rows = [(max(p), p.index(max(p)), i) for i, p in enumerate(probabilities)]
    right = [i for _, _, i in sorted((r for r in rows if r[1] == label), key=lambda r: (-r[0], r[2]))]
    wrong = [i for _, _, i in sorted((r for r in rows if r[1] != label), key=lambda r: (-r[0], r[2]))]
    return (right + wrong)[:keep]


def test_cao2_keep_rule_keeps_the_surest_right_then_the_surest_wrong():
    from conftest import load_script

    keep_rule = load_script(CAO2).keep_rule
    probabilities = [[0.2, 0.5, 0.3],  # 0 right, 0.5
                     [0.7, 0.2, 0.1],  # 1 wrong, 0.7
                     [0.1, 0.8, 0.1],  # 2 right, 0.8
                     [0.1, 0.5, 0.4],  # 3 right, 0.5 (ties with 0: index order)
                     [0.05, 0.05, 0.9],  # 4 wrong, 0.9
                     [0.25, 0.05, 0.7],  # 5 wrong, 0.7 (ties with 1: index order)
                     [0.1, 0.3, 0.6]]  # 6 wrong, 0.6
    p = torch.tensor(probabilities)
    assert keep_rule(p, 1, 2) == [2, 0]
    assert keep_rule(p, 1, 3) == [2, 0, 3]
    assert keep_rule(p, 1, 5) == [2, 0, 3, 4, 1]  # the shortfall: the surest wrong ones
    assert keep_rule(p, 1, 7) == [2, 0, 3, 4, 1, 5, 6]
    assert keep_rule(p, 0, 3) == [1, 4, 2]  # only candidate 1 says class 0
    for label in range(3):
        for keep in range(1, 8):
            assert keep_rule(p, label, keep) == keep_by_hand(probabilities, label, keep)
    # random matrices, with ties
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        q = torch.randint(1, 5, (9, 4), generator=gen).float()
        q = q / q.sum(1, keepdim=True)
        assert keep_rule(q, 2, 4) == keep_by_hand(q.tolist(), 2, 4)


# ---- 7. bad values: one line, exit 2, nothing written


BAD = {
    "mgd3 negative lambda": (MGD3, ["--mode_guidance_scale", -0.1], "--mode_guidance_scale"),
    "mgd3 stop past the steps": (MGD3, ["--mode_guidance_stop", 6], "--mode_guidance_stop 6 is past the 5 steps"),
    "mgd3 PNDM": (MGD3, ["--scheduler", "PNDMScheduler"], "--scheduler PNDMScheduler cannot be mode-guided"),
    "mgd3 Euler": (MGD3, ["--scheduler", "EulerDiscreteScheduler"], "EulerDiscreteScheduler cannot be mode-guided"),
    "mgd3 no scheduler": (MGD3, ["--scheduler", "NotAScheduler"], "NotAScheduler"),
    "mgd3 no scheduler, unguided": (MGD3, ["--scheduler", "NotAScheduler", "--mode_guidance_scale", 0],
                                    "--scheduler NotAScheduler is not a diffusers scheduler class"),
    "cao2 no candidates": (CAO2, ["--candidates", 0], "--candidates"),
    "cao2 no teacher": (CAO2, ["--no-teacher"], "give --teacher_path"),
    "d3hr inverting past the steps": (D3HR, ["--inversion_steps", 6],
                                      "--inversion_steps 6 is more than the 5 steps"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_are_one_line_exit_2_and_write_nothing(case, prototypes, data, tiny_sd, teacher, tmp_path, capsys):
    script, extra, says = BAD[case]
    out = tmp_path / "out"
    if script == MGD3:
        arguments = mgd3_args(prototypes, tiny_sd, out, *extra)
    elif script == D3HR:
        arguments = d3hr_args(data, tiny_sd, out, *extra)
    else:
        with_teacher = extra != ["--no-teacher"]
        arguments = cao2_args(data, tiny_sd, out, *(extra if with_teacher else []),
                              teacher=teacher if with_teacher else None)
    capsys.readouterr()
    assert run_script(script, arguments) == 2
    line = one_error_line(capsys)
    assert says in line, line
    assert not out.exists()


# ---- 8. resume


def test_mgd3_resume_remakes_the_same_bytes_and_refuses_other_settings(prototypes, tiny_sd, tmp_path, mgd3_reference,
                                                                       capsys):
    out, reference = mgd3_reference
    shutil.copytree(out, tmp_path / "out")
    root = tmp_path / "out" / MGD3_SET
    for name in ("0/2.png", "1/0.png", "1/1.png"):
        (root / name).unlink()
    kept = {p: os.stat(p).st_mtime_ns for p in root.rglob("*.png")}
    manifest = (root / "manifest.json").read_text()
    capsys.readouterr()
    assert run_script(MGD3, mgd3_args(prototypes, tiny_sd, tmp_path / "out", "--guidance_scale", 3)) == 2
    line = one_error_line(capsys)
    assert "other settings" in line and "guidance_scale" in line, line
    assert not (root / "1/0.png").exists() and (root / "manifest.json").read_text() == manifest
    assert run_script(MGD3, mgd3_args(prototypes, tiny_sd, tmp_path / "out", "--batch_size", 2)) == 0
    assert {p: os.stat(p).st_mtime_ns for p in kept} == kept
    assert images(root) == reference


def test_d3hr_resume_remakes_the_same_bytes_and_refuses_other_settings(data, tiny_sd, tmp_path, d3hr_reference,
                                                                       capsys):
    out, reference = d3hr_reference
    shutil.copytree(out, tmp_path / "out")
    root = tmp_path / "out" / D3HR_SET
    (root / "1/2.png").unlink()
    (root / "0/0.png").unlink()
    kept = {p: os.stat(p).st_mtime_ns for p in root.rglob("*.png")}
    capsys.readouterr()
    assert run_script(D3HR, d3hr_args(data, tiny_sd, tmp_path / "out", "--guidance_scale", 3)) == 2
    line = one_error_line(capsys)
    assert "other settings" in line and "guidance_scale" in line, line
    assert not (root / "1/2.png").exists()
    assert run_script(D3HR, d3hr_args(data, tiny_sd, tmp_path / "out", "--batch_size", 2)) == 0
    assert {p: os.stat(p).st_mtime_ns for p in kept} == kept
    assert images(root) == reference


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("script", ["mgd3", "d3hr", "cao2"])
def test_every_successor_runs_on_cuda_and_repeats_itself(script, prototypes, data, tiny_sd, teacher, tmp_path):
    """On a GPU (float16 by default), each generator makes its whole set, and with --deterministic the same bytes
    twice."""
    def arguments(out):
        made = {"mgd3": lambda: mgd3_args(prototypes, tiny_sd, out), "d3hr": lambda: d3hr_args(data, tiny_sd, out),
                "cao2": lambda: cao2_args(data, tiny_sd, out, teacher=teacher)}[script]()
        made[made.index("--device") + 1] = "cuda"
        return made + ["--deterministic"]

    path = {"mgd3": MGD3, "d3hr": D3HR, "cao2": CAO2}[script]
    folder = {"mgd3": MGD3_SET, "d3hr": D3HR_SET, "cao2": CAO2_SET}[script]
    runs = []
    for name in ("a", "b"):
        assert run_script(path, arguments(tmp_path / name)) == 0
        runs.append(images(tmp_path / name / folder))
    assert len(runs[0]) == (2 * 2 if script == "cao2" else 2 * 3) and runs[0] == runs[1]


@pytest.mark.heavy
def test_compare_runs_every_set_on_an_image_folder(tiny_sd, tmp_path):
    """validate/compare.sh imagefolder end to end on a tiny folder with the tiny model and an untrained teacher
    (about 3 minutes on 2 cores): every set is made per seed, trained under both protocols, scored and drawn."""
    import json
    import subprocess
    import sys

    from conftest import REPO
    from d4m.models import build_model, save_teacher

    data = make_image_folder(tmp_path / "shoes", classes=3, per_class=8, size=16)
    torch.manual_seed(0)
    save_teacher(tmp_path / "teacher.pt", build_model("convnet", 3, 16), "convnet", 3, 16)
    env = {**os.environ, "DATA_DIR": str(data), "SD_MODEL": str(tiny_sd), "TEACHER": str(tmp_path / "teacher.pt"),
           "OUT_DIR": str(tmp_path / "out"), "IMAGE_SIZE": "16", "LDM_SIZE": "16", "EPOCHS": "2", "IPCS": "1 2",
           "SEEDS": "2", "EVAL_FLAGS": "--no-label-check", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    run = subprocess.run(["bash", str(REPO / "validate/compare.sh"), "imagefolder"], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "results_compare.json").read_text())
    sets = ("d4m", "mgd3", "d3hr", "cao2", "random", "nearest")
    assert {(r["method"], r["ipc"], r["protocol"]) for r in result["rows"]} == {
        (s, ipc, p) for s in sets for ipc in (1, 2) for p in ("fkd", "hard")}
    assert all(len(r["runs"]) == 2 for r in result["rows"])
    assert {(c["ipc"], c["method"]) for c in result["make_seconds"]} == {(ipc, s) for s in sets for ipc in (1, 2)}
    assert sorted(p.name for p in (tmp_path / "out" / "compare_sets").iterdir()) == sorted(
        f"{s}.png" for s in sets if s != "random")
