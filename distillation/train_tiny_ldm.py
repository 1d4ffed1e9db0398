"""Train a tiny Stable-Diffusion-shaped latent diffusion model on a small labelled image set.

Phase 1 trains the VAE (reconstruction + a small KL term) and sets `vae.config.scaling_factor` from
the latents' standard deviation, as Stable Diffusion does. Phase 2 trains the UNet to predict the
noise under SD-1.5's 1000-step scaled-linear schedule, conditioned through cross-attention on the
frozen text encoder's hidden states of the class prompt; a `--cond_drop` share of the samples is
conditioned on an unconditional prompt instead, so that classifier-free guidance works. The text
encoder stays randomly initialised and frozen: its hidden states still differ per prompt, and the
UNet learns to read them. The result is saved in diffusers' Stable Diffusion folder layout and
loads through `StableDiffusionPipeline.from_pretrained` like SD-1.5.

Example (the Fashion-MNIST model the repository carries):
    python distillation/train_tiny_ldm.py --dataset fashion_mnist \
        --data_dir /usr/share/datasets/fashion-mnist --output models/fashion_mnist/ldm \
        --max_images 30000 --vae_steps 200 --unet_steps 1800 --fp16
"""
from __future__ import annotations

import argparse
import copy
import math
import shutil
import time
from pathlib import Path

from d4m.cli import (ArgumentParser, DATASETS, UsageError, cli, finite_float, non_negative_float, non_negative_int, positive_float,
                     positive_int, seed_int)

# D4M's default negative prompt; trained as an unconditional prompt too, so that it means "no class".
DEFAULT_NEGATIVE = "cartoon, anime, painting"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=[d for d in DATASETS if d != "imagenet"])
    p.add_argument("--data_dir", "--data-dir", required=True,
                   help="dataset folder (ImageFolder datasets: the folder holding train/)")
    p.add_argument("--label_file_path", "--label-file-path", default=None,
                   help="one prompt per class; default: the shipped file or folder names")
    p.add_argument("--output", required=True, help="folder the diffusers pipeline is saved to")
    p.add_argument("--overwrite", action="store_true", help="replace the model an existing --output folder holds")
    p.add_argument("--image_size", type=positive_int, default=32)
    p.add_argument("--max_images", type=non_negative_int, default=0, help="use at most this many training images, a seeded random subset (0: all)")
    p.add_argument("--vae_channels", type=positive_int, nargs="+", default=[32, 64, 64])
    p.add_argument("--unet_channels", type=positive_int, nargs="+", default=[32, 64, 128])
    p.add_argument("--text_dim", type=positive_int, default=64)
    p.add_argument("--text_layers", type=positive_int, default=2)
    p.add_argument("--vae_steps", type=positive_int, default=200)
    p.add_argument("--unet_steps", type=positive_int, default=1800)
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate of both phases (AdamW, cosine)")
    p.add_argument("--kl_weight", type=non_negative_float, default=1e-4)
    p.add_argument("--cond_drop", type=finite_float, default=0.1, help="share of samples trained with an unconditional prompt")
    p.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE,
                   help="also trained as unconditional (half of the dropped samples); '' to use only the empty prompt")
    p.add_argument("--ema", type=finite_float, default=0.999, help="EMA decay of the saved UNet weights (0: no EMA)")
    p.add_argument("--fp16", action="store_true", help="save the weights in float16 (half the size)")
    p.add_argument("--samples", default=None, help="also write a text-to-image grid (one row per class) to this PNG")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.image_size % 2 ** (len(args.vae_channels) - 1):
        raise UsageError(f"--image_size {args.image_size} is not divisible by the VAE's downsampling factor")
    if not 0.0 <= args.ema < 1.0:
        raise UsageError(f"--ema must be in [0, 1), got {args.ema}")
    if not 0.0 <= args.cond_drop < 1.0:
        raise UsageError("--cond_drop must be in [0, 1)")
    if args.text_dim % 4 or any(c % 8 for c in args.unet_channels):
        raise UsageError("--text_dim must be a multiple of 4 and --unet_channels multiples of 8")


if __name__ == "__main__":  # the flags are checked before torch loads (seconds): --help answers at once
    ARGS = cli(parse_args)()

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from torchvision.transforms import functional as TF
from torchvision.utils import save_image

from d4m.data import class_count, resolve_prompts, train_dataset
from d4m.device import announce, pick_device
from d4m.diffusion import no_library_bars
from d4m.outputs import atomic_path, check_writable, check_writable_file
from d4m.runtime import Progress
from d4m.tiny_sd import SD15_SCHEDULER, build_tiny_sd


def check_outputs(args: argparse.Namespace) -> None:
    """Before the work: the outputs can be written, and an existing model is replaced only with --overwrite (and
    only a model folder: the output folder is removed when the new model takes its place)."""
    output = Path(args.output)
    check_writable(output, "--output")
    if args.samples:
        check_writable_file(args.samples, "--samples")
    if output.is_dir() and any(output.iterdir()):
        if not (output / "model_index.json").is_file():
            raise UsageError(f"{output} holds files but no model (no model_index.json); choose another --output")
        if not args.overwrite:
            raise UsageError(f"{output} holds a model already; pass --overwrite to replace it, or choose another "
                             "--output")


def load_images(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The training images as a uint8 tensor [N, 3, S, S] in memory, their labels, the class prompts."""
    data = train_dataset(args.dataset, args.data_dir)
    num_classes = class_count(args.dataset, data)
    prompts = resolve_prompts(args.dataset, args.label_file_path, getattr(data, "classes", [str(i) for i in range(num_classes)]))
    order = np.random.default_rng(args.seed).permutation(len(data))
    if args.max_images:
        order = order[: args.max_images]
    size = [args.image_size, args.image_size]
    images = torch.empty(len(order), 3, args.image_size, args.image_size, dtype=torch.uint8)
    labels = torch.empty(len(order), dtype=torch.long)
    for i, idx in enumerate(Progress(order, "loading images", unit="images")):
        img, labels[i] = data[int(idx)]
        images[i] = TF.pil_to_tensor(TF.resize(img.convert("RGB"), size, antialias=True))
    return images, labels, prompts


def to_unit(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images -> floats in [-1, 1], as the SD VAE expects."""
    return batch.to(device).float().div(127.5).sub(1.0)


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def check_loss(loss: torch.Tensor, phase: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise UsageError(f"{phase} loss became {loss.item()} at step {step}; lower --lr")


def train_vae(vae, images: torch.Tensor, args, device: torch.device, gen: torch.Generator) -> None:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    bar = Progress(range(args.vae_steps), "VAE", unit="steps")
    for step in bar:
        idx = torch.randint(len(images), (args.batch_size,), generator=gen)
        x = to_unit(images[idx], device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen if device.type == "cpu" else None)).sample
        rec_loss = F.mse_loss(recon, x)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = rec_loss + args.kl_weight * kl
        check_loss(loss, "VAE", step)
        set_lr(opt, cosine_lr(step, args.vae_steps, args.lr))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(rec=f"{rec_loss.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval()


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, device: torch.device, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image (the UNet phase samples from them)."""
    means, stds = [], []
    for start in Progress(range(0, len(images), batch), "encoding", unit="batches"):
        dist = vae.encode(to_unit(images[start : start + batch], device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def prompt_states(pipe: StableDiffusionPipeline, prompts: list[str], device: torch.device) -> torch.Tensor:
    """The frozen text encoder's last hidden states for each prompt, padded to the tokenizer's length."""
    tokens = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(tokens.to(device))[0]


def condition_index(labels: torch.Tensor, num_classes: int, n_uncond: int, cond_drop: float,
                    gen: torch.Generator) -> torch.Tensor:
    """Row of the prompt-state table per sample: its class, or (with prob. cond_drop) an unconditional prompt."""
    drop = torch.rand(len(labels), generator=gen) < cond_drop
    uncond = num_classes + torch.randint(n_uncond, (len(labels),), generator=gen)
    return torch.where(drop, uncond, labels)


def ema_update(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema_model.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def train_unet(pipe, latents: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor, states: torch.Tensor,
               num_classes: int, args, device: torch.device, gen: torch.Generator) -> torch.nn.Module:
    """Epsilon-prediction training; returns the UNet to save (the EMA copy when --ema > 0)."""
    unet, means, stds = pipe.unet, *latents
    scale = pipe.vae.config.scaling_factor
    noise_sched = DDPMScheduler(**{k: SD15_SCHEDULER[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
    ema = copy.deepcopy(unet).requires_grad_(False) if args.ema > 0 else unet
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    unet.train()
    bar = Progress(range(args.unet_steps), "UNet", unit="steps")
    for step in bar:
        idx = torch.randint(len(means), (args.batch_size,), generator=gen)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        cond = states[condition_index(labels[idx], num_classes, len(states) - num_classes, args.cond_drop, gen)]
        pred = unet(zt.to(device), t.to(device), encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise.to(device))
        check_loss(loss, "UNet", step)
        set_lr(opt, cosine_lr(step, args.unet_steps, args.lr))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not unet:
            ema_update(ema, unet, min(args.ema, (1 + step) / (10 + step)))
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema.eval()


def save_pipeline(pipe: StableDiffusionPipeline, output: Path, fp16: bool) -> None:
    """save_pretrained into a temporary sibling folder, then move it onto `output`."""
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for model in (pipe.vae, pipe.unet, pipe.text_encoder):
        model.to("cpu")
        if fp16:
            model.to(torch.float16)
    no_library_bars()
    pipe.save_pretrained(tmp)
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)


@torch.no_grad()
def write_samples(folder: Path, prompts: list[str], path: str, seed: int, per_class: int = 8) -> None:
    """Text-to-image samples of the saved model (guidance 4, 50 steps), one row per class."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for c, prompt in enumerate(Progress(prompts, "samples", unit="classes")):
        gen = torch.Generator().manual_seed(seed * 1000 + c)
        out = pipe([prompt] * per_class, num_inference_steps=50, guidance_scale=4.0, generator=gen,
                   height=pipe.unet.config.sample_size * pipe.vae_scale_factor,
                   width=pipe.unet.config.sample_size * pipe.vae_scale_factor, output_type="pt")
        rows.append(out.images)
    with atomic_path(path) as tmp:
        save_image(torch.cat(rows), tmp, nrow=per_class, format="png")


@cli
def main(args: argparse.Namespace) -> None:
    check_outputs(args)
    device = pick_device(args.device)
    announce("tiny LDM training", device, "float32", 1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels, prompts = load_images(args)
    output = Path(args.output)
    start = time.time()
    pipe = build_tiny_sd(output.with_name(f".{output.name}.build"), image_size=args.image_size,
                         vae_channels=tuple(args.vae_channels), unet_channels=tuple(args.unet_channels),
                         text_dim=args.text_dim, text_layers=args.text_layers, seed=args.seed, save=False)
    pipe.to(device)
    pipe.text_encoder.requires_grad_(False).eval()
    train_vae(pipe.vae, images, args, device, gen)
    pipe.vae.requires_grad_(False)
    latents = encode_all(pipe.vae, images, device)
    means, stds = latents  # the std of posterior samples, over all images and latent elements
    pipe.vae.register_to_config(scaling_factor=float(1.0 / torch.sqrt(means.var() + stds.pow(2).mean())))
    uncond = [""] + ([args.negative_prompt] if args.negative_prompt else [])
    states = prompt_states(pipe, prompts + uncond, device)
    pipe.unet = train_unet(pipe, latents, labels, states, len(prompts), args, device, gen)
    save_pipeline(pipe, output, args.fp16)
    shutil.rmtree(output.with_name(f".{output.name}.build"), ignore_errors=True)
    print(f"saved {output} (scaling_factor {pipe.vae.config.scaling_factor:.4f}) after {time.time() - start:.0f} s")
    if args.samples:
        write_samples(output, prompts, args.samples, args.seed)
        print(f"wrote {args.samples}")


if __name__ == "__main__":
    main(ARGS)
