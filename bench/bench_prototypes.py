"""Benchmark: stage-1 prototypes, the original's encoding and k-means vs this project's, and the VAE alone.

Encoding, on the same images with the same per-image generators (the latents are compared):
  original: the shuffled dataset in batches of 10, float pixels made on the CPU; per batch the text encoder runs on
            the class prompt with classifier-free guidance, the VAE encodes, the latents are noised to img2img's
            start (strength 0.7 of 50 steps) and all but the clean latents is discarded.
  ours:     gen_prototype.py's loading and encoding (d4m.latents): class batches decoded and resized by workers,
            sent to the device as uint8 through pinned memory, the VAE alone (channels_last on CUDA, compiled with
            --compile).
  VAE alone: the same VAE encoding random pixels already on the device (the ceiling for the two above).
K-means, on our latents at --ipc: the faithful per-class MiniBatchKMeans fed km_expand*ipc latents at a time vs
full-batch k-means (k-means++, Lloyd) on the device; time and mean per-class inertia.

    python bench/bench_prototypes.py                       # CPU: Fashion-MNIST model (else tiny random), 32 px
    python bench/bench_prototypes.py --sd15 --jpeg 1024 --size 512 --batch-size 32 -j 12 --compile --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from multiprocessing import Pool
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from d4m.cli import UsageError
from d4m.data import FashionMNIST, ImageFolderDataset, default_prompt_file, load_prompts
from d4m.device import compile_unavailable, memory_format, pick_device
from d4m.diffusion import batch_invariant, load_pipeline, pipeline_dtype, use_sdpa
from d4m.kmeans import class_centres
from d4m.latents import ResizedImages, class_batches, class_indices, encoded_classes, latent_encoder, shuffled
from d4m.runtime import seeded_generator
from d4m.tiny_sd import build_sd15, build_tiny_sd
from measure import machine, peak_device_gb, print_rows, reset_peaks, timed, write_json
from scripts.pipeline_stable_diffusion_gen_latents import StableDiffusionGenLatentsPipeline
from scripts.pipeline_stable_diffusion_latents2img import StableDiffusionLatents2ImgPipeline

FASHION_MODEL = Path(__file__).resolve().parent.parent / "models" / "fashion_mnist" / "ldm"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a diffusers SD folder (default: the Fashion-MNIST model when "
                                                 "present, else a tiny random one)")
    p.add_argument("--sd15", action="store_true", help="an SD-1.5-sized model with random weights")
    p.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist",
                   help="Fashion-MNIST IDX files; random images when absent")
    p.add_argument("--jpeg", type=int, default=0, metavar="N",
                   help="instead, N ImageNet-shaped JPEGs (random smooth images of 300-500 px sides, 10 classes)")
    p.add_argument("--images", type=int, default=1000, help="the first N training images")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--original-batch", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--km-expand", type=int, default=1, help="as the launchers (the original's default is 10)")
    p.add_argument("--device", default=None, help="cuda when present, else cpu")
    p.add_argument("--compile", action="store_true", help="compile the VAE encoder (ours and the VAE alone)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); on a busy machine 1 thread is much faster than 2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-invariant", action="store_true",
                   help="on CPU, let kernels vary with the batch (faster; latents then differ in the last bits)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p.parse_args()


def _jpeg(job: tuple[Path, int, int]) -> None:
    path, index, classes = job
    rng = np.random.default_rng(index)
    height, width = (int(v) for v in rng.integers(300, 501, 2))
    low = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    folder = path / f"n{index % classes:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(low).resize((width, height), Image.BICUBIC).save(folder / f"{index:06d}.JPEG", quality=90)


def make_jpegs(root: Path, count: int, classes: int = 10) -> None:
    with Pool() as pool:
        pool.map(_jpeg, [(root, i, classes) for i in range(count)])


def images(args: argparse.Namespace, folder: Path) -> tuple[Dataset, str]:
    """(dataset of (PIL image, label), its description)."""
    if args.jpeg:
        make_jpegs(folder / "jpeg", args.jpeg)
        return ImageFolderDataset(folder / "jpeg"), f"{args.jpeg} JPEGs of 300-500 px, 10 classes"
    try:
        real = FashionMNIST(args.data_dir, train=True)
        return Subset(real, range(min(args.images, len(real)))), f"Fashion-MNIST train[:{args.images}]"
    except UsageError:
        gen = np.random.default_rng(args.seed)
        pictures = [Image.fromarray(gen.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((args.size,) * 2)
                    for _ in range(args.images)]
        return [(p, i % 10) for i, p in enumerate(pictures)], "random smooth images"


class FloatPixels(Dataset):
    """The original's items: resized and converted to float [0,1] on the CPU."""

    def __init__(self, base, size: int):
        self.base = base
        self.transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image), label, i


def load_model(args: argparse.Namespace, folder: Path, device: torch.device):
    """(the img2img pipeline, its VAE-only latents pipeline, description)."""
    if args.sd15:
        full = StableDiffusionLatents2ImgPipeline(**build_sd15(folder, pipeline_dtype(device)))
        full.set_progress_bar_config(disable=True)
        use_sdpa(full)
        full.to(device)
        name = "SD-1.5-sized, random weights"
    else:
        path = Path(args.model) if args.model else FASHION_MODEL
        name = str(path)
        if not (path / "model_index.json").is_file():
            build_tiny_sd(folder / "tiny", image_size=args.size)
            path, name = folder / "tiny", "tiny SD, random weights"
        full = load_pipeline(StableDiffusionLatents2ImgPipeline, str(path), device)
    return full, StableDiffusionGenLatentsPipeline(vae=full.vae, scheduler=full.scheduler), name


def original(full, gen, loader: DataLoader, prompts: list[str], seed: int, device: torch.device) -> dict:
    """index -> latent, the original's way."""
    out = {}
    for pixels, labels, indices in loader:
        full.encode_prompt([prompts[int(labels[0]) % len(prompts)]], device, 1, True, [""])  # discarded, as there
        gens = [seeded_generator(seed, int(c), int(i)) for c, i in zip(labels, indices)]
        latents = gen(pixels, generator=gens, strength=0.7, num_inference_steps=50).latents  # noisy ones dropped
        out.update(zip(indices.tolist(), latents.float().cpu()))
    return out


def ours(encode: Callable, loader: DataLoader, labels: dict, order: dict, seed: int, device: torch.device) -> dict:
    """index -> latent, gen_prototype.py's way."""
    out = {}
    for label, latents in encoded_classes(encode, loader, labels, seed, device, _NoBar()):
        out.update(zip(order[label], latents))
    return out


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def vae_alone(gen, batch: int, size: int, device: torch.device, repeats: int) -> float:
    """Images per second of the VAE encoding random pixels already on the device."""
    pixels = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=memory_format(device))
    gen(pixels)
    _, seconds = timed(lambda: [gen(pixels) for _ in range(repeats)], device)
    return batch * repeats / seconds


def kmeans_rows(args: argparse.Namespace, latents: torch.Tensor, labels: torch.Tensor,
                device: torch.device) -> list[tuple[str, str]]:
    rows = []
    classes = [int(c) for c in labels.unique() if int((labels == c).sum()) >= args.ipc]
    if not classes:
        return [("k-means", f"skipped: no class has {args.ipc} images")]
    for method in ("faithful", "full"):
        fits, seconds = timed(lambda: [class_centres(method, latents[labels == c].flatten(1), args.ipc,
                                                     args.km_expand, args.seed, c, device) for c in classes], device)
        rows.append((f"k-means {method}", f"{seconds:.2f} s for {len(classes)} classes, mean per-class inertia "
                                          f"{np.mean([score for _, score in fits]):.6g}"))
    return rows


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data, source = images(args, Path(tmp))
        prompts = load_prompts(default_prompt_file("fashion_mnist"))
        full, gen, model = load_model(args, Path(tmp), device)
        run(args, device, data, source, prompts, full, gen, model)


def run(args, device, data, source, prompts, full, gen, model) -> None:
    pin = device.type == "cuda"
    targets = [label for _, label in data] if not hasattr(data, "targets") else data.targets
    members = class_indices(targets, max(targets) + 1)
    classes = [c for c, m in enumerate(members) if m]
    labels = {i: c for c in classes for i in members[c]}
    order = {c: shuffled(members[c], args.seed, c) for c in classes}
    slow = DataLoader(FloatPixels(data, args.size), batch_size=args.original_batch, shuffle=True,
                      generator=torch.Generator().manual_seed(0), num_workers=args.workers)
    fast = DataLoader(ResizedImages(data, args.size), batch_sampler=class_batches(members, classes, args.seed,
                                                                                   args.batch_size),
                      num_workers=args.workers, pin_memory=pin)
    compiled = args.compile and not compile_unavailable(device)
    invariant = device.type == "cpu" and not args.no_invariant
    with batch_invariant(full, device) if invariant else contextlib.nullcontext():
        original(full, gen, DataLoader(Subset(FloatPixels(data, args.size), range(2)), batch_size=2), prompts,
                 args.seed, device)  # warm-up
        reference, t_original = timed(lambda: original(full, gen, slow, prompts, args.seed, device), device)
        plain_alone = vae_alone(gen, args.batch_size, args.size, device, 5)
        gen.vae.to(memory_format=memory_format(device))
        if compiled:
            gen.vae.encoder.compile()
        encode = latent_encoder(gen, args.batch_size, compiled)
        encode(torch.rand(args.batch_size, 3, args.size, args.size, device=device),
               [seeded_generator(0, i) for i in range(args.batch_size)])  # warm-up (and compile)
        reset_peaks(device)
        latents, t_ours = timed(lambda: ours(encode, fast, labels, order, args.seed, device), device)
        device_gb = peak_device_gb(device)
        fast_alone = vae_alone(gen, args.batch_size, args.size, device, 5) if compiled else None
    n = len(data)
    diff = max(float((latents[i] - reference[i]).abs().max()) for i in reference)
    stacked = torch.stack([latents[i] for i in range(n)])
    label_of = torch.tensor([labels[i] for i in range(n)])
    figures = {"machine": machine(device), "model": model, "data": source, "size": args.size,
               "original_img_s": n / t_original, "ours_img_s": n / t_ours, "vae_alone_img_s": plain_alone,
               "vae_alone_compiled_img_s": fast_alone, "batch": args.batch_size, "workers": args.workers,
               "compiled": compiled, "peak_device_gb": device_gb, "max_abs_diff": diff}
    rows = [
        ("machine", figures["machine"]),
        ("model / data", f"{model}, dtype {gen.vae.dtype}; {source} ({n} images) at {args.size} px"),
        ("encoding, original", f"{n / t_original:.1f} images/s (batch {args.original_batch}, prompt + guidance + "
                               f"noising per batch, float pixels, {args.workers} workers)"),
        ("encoding, ours", f"{n / t_ours:.1f} images/s (batch {args.batch_size}, uint8 pixels, {args.workers} workers"
                           f"{', pinned' if pin else ''}{', compiled encoder' if compiled else ''})"),
        ("VAE alone", f"{plain_alone:.1f} images/s" + (f", {fast_alone:.1f} compiled" if fast_alone else "")),
        ("ratio ours/original", f"{t_original / t_ours:.2f}x (batch-invariant CPU kernels: "
                                f"{'yes' if invariant else 'no'})"),
        ("max abs diff of latents", f"{diff:.3g}"),
        ("peak device memory", f"{device_gb:.2f} GB" if device_gb is not None else "- (CPU)"),
        ("k-means settings", f"ipc {args.ipc}, km_expand {args.km_expand}, on {device}"),
        *kmeans_rows(args, stacked, label_of, device),
    ]
    print_rows(rows)
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
