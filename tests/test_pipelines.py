"""The two pipelines of scripts/: they load from a stock SD folder and match stock diffusers."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from d4m.diffusion import load_pipeline
from scripts.pipeline_stable_diffusion_gen_latents import StableDiffusionGenLatentsPipeline
from scripts.pipeline_stable_diffusion_latents2img import StableDiffusionLatents2ImgPipeline

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
NEGATIVE = "cartoon, anime, painting"


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_gen_latents_loads_only_vae_and_scheduler(tiny_sd):
    pipe = load_pipeline(StableDiffusionGenLatentsPipeline, str(tiny_sd), CPU)
    assert set(pipe.components) == {"vae", "scheduler"}


def test_gen_latents_is_the_scaled_posterior_sample_per_image(tiny_sd):
    pipe = load_pipeline(StableDiffusionGenLatentsPipeline, str(tiny_sd), CPU)
    images = torch.rand(2, 3, 32, 32)
    out = pipe(images, generator=generators(5, 6), strength=0.7, num_inference_steps=10)
    posterior = pipe.vae.encode(images[1:] * 2 - 1).latent_dist
    expected = posterior.sample(torch.Generator().manual_seed(6)) * pipe.vae.config.scaling_factor
    torch.testing.assert_close(out.latents[1:], expected, atol=1e-5, rtol=0)
    assert out.latents.shape == (2, 4, 16, 16)
    # the noisy latent starts where img2img starts: step 10 - int(10 * 0.7) of the schedule
    pipe.scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(6)
    torch.randn((1, 4, 16, 16), generator=gen)  # the posterior's draw comes first
    noisy = pipe.scheduler.add_noise(out.latents[1:], torch.randn((1, 4, 16, 16), generator=gen),
                                     pipe.scheduler.timesteps[3:4])
    torch.testing.assert_close(out.noisy_latents[1:], noisy, atol=1e-6, rtol=0)
    pil = [Image.fromarray((images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for i in range(2)]
    from_pil = pipe(pil, generator=generators(5, 6)).latents
    torch.testing.assert_close(from_pil, out.latents, atol=0.05, rtol=0)  # only 8-bit rounding differs


def test_latents2img_matches_stock_img2img(tiny_sd):
    ours = load_pipeline(StableDiffusionLatents2ImgPipeline, str(tiny_sd), CPU)
    stock = load_pipeline(StableDiffusionImg2ImgPipeline, str(tiny_sd), CPU)
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["tench, Tinca tinca", "goldfish", "a red car"]
    common = dict(strength=0.7, guidance_scale=8.0, num_inference_steps=6, output_type="np")
    expected = stock(prompt=prompts, image=latents, negative_prompt=[NEGATIVE] * 3, generator=generators(1, 2, 3),
                     **common).images
    got = ours(prompt=prompts, latents=latents, negative_prompt=NEGATIVE, is_init=True, generator=generators(1, 2, 3),
               **common).images
    assert np.abs(got - expected).max() <= 1e-5
    # cached per-class embeddings, as gen_syn_image passes them
    pairs = [ours.encode_prompt([p], CPU, 1, True, [NEGATIVE]) for p in prompts]
    embedded = ours(latents=latents, prompt_embeds=torch.cat([p for p, _ in pairs]),
                    negative_prompt_embeds=torch.cat([n for _, n in pairs]), generator=generators(1, 2, 3),
                    **common).images
    assert np.abs(embedded - expected).max() <= 1e-5


def test_batch_invariant_latents_hold_for_large_batches(tiny_sd):
    """16 images or more once took another convolution kernel (NNPACK) than smaller batches."""
    from d4m.diffusion import batch_invariant

    pipe = load_pipeline(StableDiffusionGenLatentsPipeline, str(tiny_sd), CPU)
    images = torch.rand(17, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with batch_invariant(pipe, CPU):
        whole = pipe(images, generator=generators(*range(17))).latents
        alone = torch.cat([pipe(images[i : i + 1], generator=generators(i)).latents for i in range(17)])
    assert torch.equal(whole, alone)
