"""Benchmark: stage-2 synthesis, the original's one-image-per-call loop vs this project's batched generation.

original:   one pipeline call per image, the prompt strings (label and negative) re-encoded by the text encoder
            in every call, classifier-free guidance.
batched:    gen_syn_image.py's way: prototypes of several classes per call, each class's prompt embeddings
            encoded once and reused, UNet and VAE channels_last on CUDA, optionally a compiled UNet (PNG writing,
            done by threads in the script, is left out).
UNet alone: the UNet's forward passes at the batched mode's size (2 x batch with guidance) on the device, turned
            into images/s as one image needs 2 x int(steps * strength) passes: the ceiling of both modes.
Both modes use the same prototypes and the same per-image generators, and the benchmark checks that they
make the same images (max abs difference of the float images in [0, 1]). Each mode is warmed up once first.
On CPU both run with gen_syn_image.py's batch-invariant kernels (exactly equal images) unless --no-invariant.

    python bench/bench_synthesis.py                  # CPU: the Fashion-MNIST model (else a tiny random one), 32 px
    python bench/bench_synthesis.py --sd15 --images 64 --batch-size 16 --compile --device cuda   # SD-1.5-sized, 512 px
    python bench/bench_synthesis.py --sd15 --steps 2 --size 64 --images 2 --batch-size 2   # CPU smoke check
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import numpy as np
import torch

from d4m.cli import finite_float
from d4m.data import default_prompt_file, load_prompts
from d4m.device import memory_format, pick_device
from d4m.diffusion import EmbeddingCache, batch_invariant, compile_unet, load_pipeline, pipeline_dtype, use_sdpa
from d4m.runtime import seeded_generator
from d4m.tiny_sd import build_sd15, build_tiny_sd
from measure import machine, peak_device_gb, print_rows, reset_peaks, timed, write_json
from scripts.pipeline_stable_diffusion_latents2img import StableDiffusionLatents2ImgPipeline

FASHION_MODEL = Path(__file__).resolve().parent.parent / "models" / "fashion_mnist" / "ldm"
NEGATIVE = "cartoon, anime, painting"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a diffusers SD folder (default: the Fashion-MNIST model when "
                                                 "present, else a tiny random one)")
    p.add_argument("--sd15", action="store_true", help="an SD-1.5-sized model with random weights (512 px default)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 32; 512 with --sd15)")
    p.add_argument("--images", type=int, default=30)
    p.add_argument("--original-images", type=int, default=1000,
                   help="make at most this many of them the original's way (it is slow on a GPU)")
    p.add_argument("--batch-size", type=int, default=10, help="images per call in the batched mode")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--strength", type=finite_float, default=0.7)
    p.add_argument("--guidance", type=finite_float, default=8.0)
    p.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"))
    p.add_argument("--device", default=None, help="cuda when present, else cpu")
    p.add_argument("--compile", action="store_true", help="compile the UNet for the batched mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-invariant", action="store_true",
                   help="on CPU, let kernels vary with the batch (faster; images then differ in the last bits)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); on a busy machine 1 thread is much faster than 2")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    args.size = args.size or (512 if args.sd15 else 32)
    return args


def build_sd15_pipeline(folder: Path, device: torch.device, dtype: torch.dtype) -> StableDiffusionLatents2ImgPipeline:
    pipe = StableDiffusionLatents2ImgPipeline(**build_sd15(folder, dtype))
    pipe.set_progress_bar_config(disable=True)
    use_sdpa(pipe)
    return pipe.to(device)


def load_model(args: argparse.Namespace, folder: Path, device: torch.device) -> tuple[object, str]:
    """(pipeline, its description)."""
    if args.sd15:
        return build_sd15_pipeline(folder, device, pipeline_dtype(device, args.dtype)), "SD-1.5-sized, random weights"
    path = Path(args.model) if args.model else FASHION_MODEL
    name = str(path)
    if not (path / "model_index.json").is_file():
        build_tiny_sd(folder / "tiny", image_size=args.size)
        path, name = folder / "tiny", "tiny SD, random weights"
    return load_pipeline(StableDiffusionLatents2ImgPipeline, str(path), device, dtype=args.dtype), name


Job = tuple[int, int]  # (class, image index within the class)


def original(pipe, args: argparse.Namespace, protos: torch.Tensor, prompts: list[str], jobs: list[Job]) -> np.ndarray:
    """One call per image, prompt strings encoded again in every call."""
    out = []
    for n, (c, j) in enumerate(jobs):
        out.append(pipe(prompt=prompts[c], negative_prompt=NEGATIVE, latents=protos[n : n + 1],
                        strength=args.strength, guidance_scale=args.guidance, num_inference_steps=args.steps,
                        generator=[seeded_generator(args.seed, c, j)], output_type="np").images)
    return np.concatenate(out)


def batched(pipe, args: argparse.Namespace, protos: torch.Tensor, prompts: list[str], jobs: list[Job]) -> np.ndarray:
    """Batches across classes, each class's prompt embeddings encoded once."""
    embeds = EmbeddingCache(pipe, NEGATIVE, args.guidance > 1)
    out = []
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        positive, negative = embeds.batch([prompts[c] for c, _ in batch])
        out.append(pipe(latents=protos[start : start + len(batch)], prompt_embeds=positive,
                        negative_prompt_embeds=negative, strength=args.strength, guidance_scale=args.guidance,
                        num_inference_steps=args.steps, generator=[seeded_generator(args.seed, c, j) for c, j in batch],
                        output_type="np").images)
    return np.concatenate(out)


def to_8bit(images: np.ndarray) -> np.ndarray:
    """As the pipeline's PIL output (and so the saved PNGs) rounds them."""
    return (images * 255).round().astype(np.uint8)


def unet_alone(pipe, batch: int, side: int, guidance: bool, device: torch.device, repeats: int = 5) -> float:
    """UNet forward passes per second at the batched mode's size, on random latents and embeddings."""
    samples = batch * (2 if guidance else 1)
    dtype = pipe.unet.dtype
    latents = torch.randn(samples, 4, side, side, device=device, dtype=dtype).contiguous(
        memory_format=memory_format(device))
    embeds = torch.randn(samples, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)
    step = torch.tensor(500, device=device)
    with torch.no_grad():
        pipe.unet(latents, step, encoder_hidden_states=embeds)
        _, seconds = timed(lambda: [pipe.unet(latents, step, encoder_hidden_states=embeds) for _ in range(repeats)],
                           device)
    return samples * repeats / seconds


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pipe, model = load_model(args, Path(tmp), device)
    prompts = load_prompts(default_prompt_file("fashion_mnist"))
    per_class = -(-args.images // len(prompts))
    jobs = [(c, j) for j in range(per_class) for c in range(len(prompts))][: args.images]
    jobs.sort()
    side = args.size // pipe.vae_scale_factor
    protos = torch.randn(len(jobs), 4, side, side, generator=torch.Generator().manual_seed(args.seed))
    invariant = device.type == "cpu" and not args.no_invariant
    guidance = args.guidance > 1
    passes = (2 if guidance else 1) * int(args.steps * args.strength)
    originals = min(len(jobs), args.original_images)
    with batch_invariant(pipe, device) if invariant else contextlib.nullcontext():
        original(pipe, args, protos[:1], prompts, jobs[:1])  # warm-up
        reference, t_original = timed(lambda: original(pipe, args, protos[:originals], prompts, jobs[:originals]),
                                      device)
        pipe.unet.to(memory_format=memory_format(device))
        pipe.vae.to(memory_format=memory_format(device))
        note = compile_unet(pipe, device) if args.compile else ""
        batched(pipe, args, protos[: args.batch_size], prompts, jobs[: args.batch_size])  # warm-up (and compile)
        reset_peaks(device)
        images, t_batched = timed(lambda: batched(pipe, args, protos, prompts, jobs), device)
        device_gb = peak_device_gb(device)
        alone = unet_alone(pipe, args.batch_size, side, guidance, device)
    rate_o, rate_b = originals / t_original, len(jobs) / t_batched
    compiled = ("yes" if not note else f"no ({note})") if args.compile else "no"
    diff = float(np.abs(images[:originals] - reference).max())
    figures = {"machine": machine(device), "model": model, "size": args.size, "original_img_s": rate_o,
               "batched_img_s": rate_b, "unet_alone_samples_s": alone, "unet_alone_img_s": alone / passes,
               "batch": args.batch_size, "compiled": compiled == "yes", "peak_device_gb": device_gb,
               "max_abs_diff": diff}
    rows = [
        ("machine", figures["machine"]),
        ("model", f"{model}, dtype {pipe.unet.dtype}, {args.size} px"),
        ("settings", f"{len(jobs)} images ({originals} the original's way), {args.steps} steps, strength "
                     f"{args.strength}, guidance {args.guidance}, batch {args.batch_size}, compiled UNet: {compiled}, "
                     f"batch-invariant CPU kernels: {'yes' if invariant else 'no'}"),
        ("original (1 image/call)", f"{rate_o:.3f} images/s ({t_original:.1f} s)"),
        ("batched, cached prompts", f"{rate_b:.3f} images/s ({t_batched:.1f} s)"),
        ("UNet alone", f"{alone:.1f} samples/s = {alone / passes:.3f} images/s at {passes} passes per image"),
        ("ratio batched/original", f"{rate_b / rate_o:.2f}x"),
        ("max abs diff of images", f"{diff:.3g} (float, 0..1); 8-bit values differing: "
                                   f"{int((to_8bit(images[:originals]) != to_8bit(reference)).sum())} of "
                                   f"{reference.size}"),
        ("peak device memory", f"{device_gb:.2f} GB" if device_gb is not None else "- (CPU)"),
    ]
    print_rows(rows)
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
