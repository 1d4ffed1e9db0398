"""Benchmark: what one synthetic image costs with D4M and with each successor (MGD3, D3HR, CaO2), one class of IPC
images made the way each script makes them (its pipeline calls, at its defaults), PNG writing left out.

d4m    img2img from a prototype: int(50 x 0.7) = 35 steps, guidance 8
mgd3   50 DDPM steps from noise, guidance 4, mode guidance for 24 steps
d3hr   per image: 30 DDIM decoding steps, guidance 4, plus the class's 100,000-group search shared by its IPC images;
       the inversion (30 steps, guidance 4) is timed per real image: it is made once per class, for
       --inversion-images real images, and reused by every seed and IPC
cao2   per kept image: K = 4 candidates of 50 DDPM steps at guidance 2.7, the teacher on them, and 100 Adam steps
       of the latent (one forward and backward UNet pass each)

    python bench/bench_successors.py                      # CPU, the Fashion-MNIST model, 32 px, IPC 10
    python bench/bench_successors.py --sd15 --device cuda  # SD-1.5-sized random model, 512 px, fp16
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import tempfile
from pathlib import Path

import torch

from d4m.device import pick_device
from d4m.diffusion import EmbeddingCache, batch_invariant, load_pipeline, pipeline_dtype, use_scheduler, use_sdpa
from d4m.models import build_model
from d4m.runtime import seeded_generator
from d4m.tiny_sd import build_sd15
from measure import machine, peak_device_gb, print_rows, reset_peaks, timed, write_json
from scripts.pipeline_stable_diffusion_latents2img import StableDiffusionLatents2ImgPipeline
from scripts.pipeline_stable_diffusion_sampler import StableDiffusionSamplerPipeline

REPO = Path(__file__).resolve().parent.parent
FASHION_MODEL = REPO / "models" / "fashion_mnist" / "ldm"


def script(name: str):
    """A generator script of distillation/ as a module (its helpers: group search, keep rule, optimisation)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "distillation" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd15", action="store_true", help="an SD-1.5-sized model with random weights (512 px)")
    p.add_argument("--ipc", type=int, default=10, help="images of the class made at once (the scripts' batch)")
    p.add_argument("--inversion-images", type=int, default=500, help="D3HR's real images per class")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    return p.parse_args()


def load(args: argparse.Namespace, folder: Path, device: torch.device):
    """(img2img pipeline, sampler pipeline sharing its modules, side in pixels, model name)."""
    if args.sd15:
        components = build_sd15(folder, pipeline_dtype(device, args.dtype))
        d4m = StableDiffusionLatents2ImgPipeline(**components)
        use_sdpa(d4m)
        d4m = d4m.to(device)
        d4m.set_progress_bar_config(disable=True)
        side, name = 512, "SD-1.5-sized, random weights"
    else:
        d4m = load_pipeline(StableDiffusionLatents2ImgPipeline, str(FASHION_MODEL), device, dtype=args.dtype)
        side, name = 32, "the Fashion-MNIST LDM"
    sampler = StableDiffusionSamplerPipeline(**d4m.components, requires_safety_checker=False)
    sampler.set_progress_bar_config(disable=True)
    return d4m, sampler, side, name


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        d4m, sampler, side, model = load(args, Path(tmp), device)
    n = args.ipc
    shape = (4, side // d4m.vae_scale_factor, side // d4m.vae_scale_factor)
    generators = lambda count, offset=0: [seeded_generator(0, 0, offset + j) for j in range(count)]
    noise = lambda count: torch.stack([torch.randn(shape, generator=g) for g in generators(count)])
    d4m_embeds = EmbeddingCache(d4m, "cartoon, anime, painting", True)
    null_embeds = EmbeddingCache(sampler, "", True)
    d3hr, cao2 = script("gen_d3hr"), script("gen_cao2")
    teacher = build_model("resnet18" if args.sd15 else "convnet", 1000 if args.sd15 else 10,
                          224 if args.sd15 else 32).to(device).eval()
    opt = argparse.Namespace(num_inference_steps=50, optimization_levels=11, optimization_lr=6e-4,
                             optimization_steps=100, linf_weight=10.0)
    cpu = device.type == "cpu"

    def run_d4m():
        pos, neg = d4m_embeds.batch(["a shirt"] * n)
        return d4m(latents=noise(n), prompt_embeds=pos, negative_prompt_embeds=neg, strength=0.7, guidance_scale=8,
                   num_inference_steps=50, generator=generators(n)).images

    def run_mgd3():
        use_scheduler(sampler, "DDPMScheduler")
        pos, neg = null_embeds.batch(["a shirt"] * n)
        return sampler(pos, noise(n), neg, guidance_scale=4, num_inference_steps=50, generator=generators(n),
                       modes=noise(n), mode_scale=0.1, mode_stop=24)

    def run_d3hr_decode():
        use_scheduler(sampler, "DDIMScheduler")
        pos, neg = null_embeds.batch(["a shirt"] * n)
        return sampler(pos, noise(n), neg, guidance_scale=4, num_inference_steps=50, start_step=20)

    def run_d3hr_groups():
        mean = torch.zeros(shape[0] * shape[1] * shape[2], device=device)
        return d3hr.best_group(mean, torch.ones_like(mean), n, 100_000, 0, 0)

    def run_d3hr_invert():
        use_scheduler(sampler, "DDIMScheduler")
        pos, neg = null_embeds.batch(["a shirt"] * n)
        return sampler.invert(noise(n).to(device), pos, neg, 4, 50, 30)

    def run_cao2():
        use_scheduler(sampler, "DDPMScheduler")
        pos, neg = null_embeds.batch(["a shirt"] * n)
        candidates = torch.cat([sampler(pos, noise(n), neg, guidance_scale=2.7, num_inference_steps=50,
                                        generator=generators(n, k * n), output_type="latent").float()
                                for k in range(4)])
        images = [image for part in candidates.split(n) for image in sampler.decode_latents_to(part)]
        record = {"input_size": 224 if args.sd15 else 32, "mean": [0.5] * 3, "std": [0.25] * 3}
        probabilities = cao2.teacher_probabilities(teacher, record, images, record["input_size"], "lanczos", device)
        kept = cao2.keep_rule(probabilities, 0, n)
        null = null_embeds.batch([""])[0]
        latents = cao2.optimise_latents(sampler, candidates[kept], null.expand(n, -1, -1), generators(n, 4 * n), opt)
        return sampler.decode_latents_to(latents)

    runs = {"d4m": run_d4m, "mgd3": run_mgd3, "d3hr decoding": run_d3hr_decode, "d3hr groups (per class)": run_d3hr_groups,
            "d3hr inversion": run_d3hr_invert, "cao2": run_cao2}
    seconds = {}
    with batch_invariant(d4m, device) if cpu else contextlib.nullcontext():
        for name, run in runs.items():
            run()  # warm-up
            reset_peaks(device)
            seconds[name] = timed(run, device)[1]
    per_image = {"d4m": seconds["d4m"] / n, "mgd3": seconds["mgd3"] / n, "cao2": seconds["cao2"] / n,
                 "d3hr": seconds["d3hr decoding"] / n + seconds["d3hr groups (per class)"] / n,
                 "d3hr_inversion_per_real_image": seconds["d3hr inversion"] / n}
    per_image["d3hr_with_inversion"] = per_image["d3hr"] + per_image["d3hr_inversion_per_real_image"] * \
        args.inversion_images / n
    figures = {"machine": machine(device), "model": model, "size": side, "ipc": n, "dtype": str(d4m.unet.dtype),
               "seconds_per_image": per_image, "peak_device_gb": peak_device_gb(device)}
    rows = [("machine", figures["machine"]), ("model", f"{model}, {side} px, {d4m.unet.dtype}, IPC {n}")]
    rows += [(name, f"{value:.3f} s per image") for name, value in per_image.items()]
    rows += [("d3hr with inversion", f"at {args.inversion_images} real images per class and IPC {n}")]
    print_rows(rows)
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
