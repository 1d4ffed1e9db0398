"""Benchmark: stage-1 prototypes, the original's encoding and k-means vs this project's.

Encoding, on the same images with the same per-image generators (the latents must agree):
  original: batches of 10; per batch the text encoder runs on the class prompt with classifier-free guidance
            (prompt and empty negative), the VAE encodes, the latents are noised to img2img's start timestep
            (strength 0.7 of 50 steps); all but the clean latents is discarded.
  project:  the VAE alone, batches of 64, DataLoader workers, pinned memory on CUDA.
On CPU both run with gen_prototype.py's batch-invariant kernels (exactly equal latents) unless --no-invariant.
K-means, on the project's latents of every class at --ipc: the faithful per-class MiniBatchKMeans fed
km_expand*ipc latents at a time vs full-batch k-means (k-means++, Lloyd) on the device; time and mean
per-class inertia (sum of squared distances of a class's latents to their nearest centre).

    python bench/bench_prototypes.py                        # Fashion-MNIST model (else tiny random), 32 px
    python bench/bench_prototypes.py --size 64 --images 2000 --device cuda
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
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import transforms

from d4m.data import FashionMNIST, default_prompt_file, load_prompts
from d4m.diffusion import batch_invariant, load_pipeline
from d4m.kmeans import class_centres
from d4m.runtime import UsageError, pick_device, seeded_generator
from d4m.tiny_sd import build_tiny_sd
from scripts.pipeline_stable_diffusion_gen_latents import StableDiffusionGenLatentsPipeline
from scripts.pipeline_stable_diffusion_latents2img import StableDiffusionLatents2ImgPipeline

FASHION_MODEL = Path(__file__).resolve().parent.parent / "models" / "fashion_mnist" / "ldm"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a diffusers SD folder (default: the Fashion-MNIST model when "
                                                 "present, else a tiny random one)")
    p.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist",
                   help="Fashion-MNIST IDX files; random images when absent")
    p.add_argument("--images", type=int, default=1000, help="the first N training images")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--original-batch", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--km-expand", type=int, default=1, help="as the launchers (the original's default is 10)")
    p.add_argument("--device", default=None, help="cuda when present, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); on a busy machine 1 thread is much faster than 2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-invariant", action="store_true",
                   help="on CPU, let kernels vary with the batch (faster; latents then differ in the last bits)")
    return p.parse_args()


def images(args: argparse.Namespace) -> tuple[Dataset, str]:
    """(dataset of (image [3,size,size] in [0,1], label), its description)."""
    resize = transforms.Compose([transforms.Resize((args.size, args.size)), transforms.ToTensor()])
    try:
        real = FashionMNIST(args.data_dir, train=True, transform=resize)
        return Subset(real, range(min(args.images, len(real)))), f"Fashion-MNIST train[:{args.images}]"
    except UsageError:
        gen = torch.Generator().manual_seed(args.seed)
        low = torch.rand(args.images, 3, max(1, args.size // 8), max(1, args.size // 8), generator=gen)
        pixels = torch.nn.functional.interpolate(low, size=args.size, mode="bilinear")
        return TensorDataset(pixels, torch.arange(args.images) % 10), "random smooth images"


def load_model(args: argparse.Namespace, folder: Path, device: torch.device):
    """(the full img2img pipeline, its VAE-only latents pipeline, description)."""
    path = Path(args.model) if args.model else FASHION_MODEL
    name = str(path)
    if not (path / "model_index.json").is_file():
        build_tiny_sd(folder / "tiny", image_size=args.size)
        path, name = folder / "tiny", "tiny SD, random weights"
    full = load_pipeline(StableDiffusionLatents2ImgPipeline, str(path), device)
    return full, StableDiffusionGenLatentsPipeline(vae=full.vae, scheduler=full.scheduler), name


def encode_all(loader: DataLoader, seed: int, encode: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, labels) of every image, one generator per image seeded by (seed, label, index)."""
    latents, labels, start = [], [], 0
    for pixels, label in loader:
        gens = [seeded_generator(seed, int(c), start + i) for i, c in enumerate(label)]
        latents.append(encode(pixels, label, gens).float().cpu())
        labels.append(label)
        start += len(label)
    return torch.cat(latents), torch.cat(labels)


def original_encoder(full, gen, prompts: list[str]) -> Callable:
    def encode(pixels: torch.Tensor, label: torch.Tensor, gens: list) -> torch.Tensor:
        full.encode_prompt([prompts[int(label[0])]], full.device, 1, True, [""])  # discarded, as in the original
        return gen(pixels, generator=gens, strength=0.7, num_inference_steps=50).latents  # noisy latents discarded
    return encode


def project_encoder(gen) -> Callable:
    return lambda pixels, label, gens: gen(pixels, generator=gens).latents


def timed(run: Callable, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def kmeans_rows(args: argparse.Namespace, latents: torch.Tensor, labels: torch.Tensor,
                device: torch.device) -> list[tuple[str, str]]:
    rows = []
    classes = [int(c) for c in labels.unique() if int((labels == c).sum()) >= args.ipc]
    for method in ("faithful", "full"):
        fits, seconds = timed(lambda: [class_centres(method, latents[labels == c].flatten(1), args.ipc,
                                                     args.km_expand, args.seed, c, device) for c in classes], device)
        rows.append((f"k-means {method}", f"{seconds:.2f} s for {len(classes)} classes, mean per-class inertia "
                                          f"{np.mean([score for _, score in fits]):.6g}"))
    return rows


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    data, source = images(args)
    prompts = load_prompts(default_prompt_file("fashion_mnist"))
    with tempfile.TemporaryDirectory() as tmp:
        full, gen, model = load_model(args, Path(tmp), device)
    pin = device.type == "cuda"
    slow = DataLoader(data, batch_size=args.original_batch, num_workers=args.workers)
    fast = DataLoader(data, batch_size=args.batch_size, num_workers=args.workers, pin_memory=pin)
    invariant = device.type == "cpu" and not args.no_invariant
    with batch_invariant(full, device) if invariant else contextlib.nullcontext():
        encode_all(DataLoader(Subset(data, range(2))), args.seed, original_encoder(full, gen, prompts))  # warm-up
        (reference, _), t_original = timed(lambda: encode_all(slow, args.seed, original_encoder(full, gen, prompts)),
                                           device)
        (latents, labels), t_project = timed(lambda: encode_all(fast, args.seed, project_encoder(gen)), device)
    n = len(data)
    rows = [
        ("machine", f"{machine(device)}, torch {torch.__version__}"),
        ("model / data", f"{model}, dtype {full.vae.dtype}; {source} ({n} images) at {args.size} px"),
        ("encoding, original", f"{n / t_original:.1f} images/s (batch {args.original_batch}, prompt + guidance + "
                               f"noising per batch, {args.workers} workers)"),
        ("encoding, VAE only", f"{n / t_project:.1f} images/s (batch {args.batch_size}, {args.workers} workers"
                               f"{', pinned' if pin else ''})"),
        ("encoding ratio", f"{t_original / t_project:.2f}x (batch-invariant CPU kernels: "
                           f"{'yes' if invariant else 'no'})"),
        ("max abs diff of latents", f"{float((latents - reference).abs().max()):.3g}"),
        ("k-means settings", f"ipc {args.ipc}, km_expand {args.km_expand}, on {device}"),
        *kmeans_rows(args, latents, labels, device),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
