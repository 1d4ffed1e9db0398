"""Benchmark: stage-2 synthesis, the original's one-image-per-call loop vs this project's batched generation.

original: one pipeline call per image, the prompt strings (label and negative) re-encoded by the text encoder
          in every call, classifier-free guidance.
batched:  gen_syn_image.py's way: prototypes of several classes per call, each class's prompt embeddings
          encoded once and reused, optionally a compiled UNet.
Both modes use the same prototypes and the same per-image generators, and the benchmark checks that they
make the same images (max abs difference of the float images in [0, 1]). Each mode is warmed up once first.
On CPU both run with gen_syn_image.py's batch-invariant kernels (exactly equal images) unless --no-invariant.

    python bench/bench_synthesis.py                  # CPU: the Fashion-MNIST model (else a tiny random one), 32 px
    python bench/bench_synthesis.py --sd15 --images 64 --batch-size 16   # GPU: SD-1.5-sized, 512 px, fp16
    python bench/bench_synthesis.py --sd15 --steps 2 --size 64 --images 2 --batch-size 2   # CPU smoke check
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from d4m.data import default_prompt_file, load_prompts
from d4m.diffusion import EmbeddingCache, batch_invariant, compile_unet, load_pipeline, pipeline_dtype, use_sdpa
from d4m.runtime import pick_device, seeded_generator
from d4m.tiny_sd import SD15_SCHEDULER, build_tiny_sd, write_char_tokenizer
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
    p.add_argument("--batch-size", type=int, default=10, help="images per call in the batched mode")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--strength", type=float, default=0.7)
    p.add_argument("--guidance", type=float, default=8.0)
    p.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"))
    p.add_argument("--device", default=None, help="cuda when present, else cpu")
    p.add_argument("--compile", action="store_true", help="compile the UNet for the batched mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-invariant", action="store_true",
                   help="on CPU, let kernels vary with the batch (faster; images then differ in the last bits)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); on a busy machine 1 thread is much faster than 2")
    args = p.parse_args()
    args.size = args.size or (512 if args.sd15 else 32)
    return args


def build_sd15(folder: Path, device: torch.device, dtype: torch.dtype) -> StableDiffusionLatents2ImgPipeline:
    """SD-1.5's UNet, VAE and text encoder shapes with random weights (they time the same as trained ones)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
    )
    tokenizer = write_char_tokenizer(folder / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet, vae, text_encoder = (model.to(dtype) for model in (unet, vae, text_encoder))
    pipe = StableDiffusionLatents2ImgPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    use_sdpa(pipe)
    return pipe.to(device)


def load_model(args: argparse.Namespace, folder: Path, device: torch.device) -> tuple[object, str]:
    """(pipeline, its description)."""
    if args.sd15:
        return build_sd15(folder, device, pipeline_dtype(device, args.dtype)), "SD-1.5-sized, random weights"
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


def timed(run: Callable[[], np.ndarray], device: torch.device) -> tuple[np.ndarray, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    images = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images, time.perf_counter() - start


def to_8bit(images: np.ndarray) -> np.ndarray:
    """As the pipeline's PIL output (and so the saved PNGs) rounds them."""
    return (images * 255).round().astype(np.uint8)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


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
    with batch_invariant(pipe, device) if invariant else contextlib.nullcontext():
        original(pipe, args, protos[:1], prompts, jobs[:1])  # warm-up
        reference, t_original = timed(lambda: original(pipe, args, protos, prompts, jobs), device)
        note = compile_unet(pipe, device) if args.compile else ""
        batched(pipe, args, protos[: args.batch_size], prompts, jobs[: args.batch_size])  # warm-up (and compile)
        images, t_batched = timed(lambda: batched(pipe, args, protos, prompts, jobs), device)
    rate_o, rate_b = len(jobs) / t_original, len(jobs) / t_batched
    compiled = ("yes" if not note else f"no ({note})") if args.compile else "no"
    rows = [
        ("machine", f"{machine(device)}, torch {torch.__version__}"),
        ("model", f"{model}, dtype {pipe.unet.dtype}, {args.size} px"),
        ("settings", f"{len(jobs)} images, {args.steps} steps, strength {args.strength}, guidance {args.guidance}, "
                     f"batch {args.batch_size}, compiled UNet: {compiled}, "
                     f"batch-invariant CPU kernels: {'yes' if invariant else 'no'}"),
        ("original (1 image/call)", f"{rate_o:.3f} images/s ({t_original:.1f} s)"),
        ("batched, cached prompts", f"{rate_b:.3f} images/s ({t_batched:.1f} s)"),
        ("ratio batched/original", f"{rate_b / rate_o:.2f}x"),
        ("max abs diff of images", f"{float(np.abs(images - reference).max()):.3g} (float, 0..1); 8-bit values differing: "
                                   f"{int((to_8bit(images) != to_8bit(reference)).sum())} of {images.size}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
