"""D3HR (Zhao et al., Taming Diffusion for Dataset Distillation with High Representativeness, ICML 2025) with a
Stable Diffusion-shaped generator: each class's real latents are inverted by DDIM under the class's prompt to a
middle noise level, a Gaussian (a mean and a variance per dimension) is fitted there, many groups of IPC samples
are drawn from it, the group whose mean, standard deviation and skewness best match it is kept, and its members are
decoded by deterministic DDIM. Differences from the authors' code: docs/successors.md."""
from __future__ import annotations

import argparse

from d4m.cli import ArgumentParser, UsageError, add_generator_args, cli, non_negative_int, positive_int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    add_generator_args(parser, guidance_scale=4.0)
    parser.add_argument("--data_dir", "--data-dir", required=True, help="the dataset's folder: its training images are inverted")
    parser.add_argument("--inversion_images", type=positive_int, default=500,
                        help="real images inverted per class (a seeded choice; D3HR inverts all, ~1,300 on ImageNet)")
    parser.add_argument("--inversion_steps", type=positive_int, default=30,
                        help="DDIM steps of the --num_inference_steps schedule the latents are inverted up, and decoded "
                             "down (D3HR: 30 of 50, timestep 600)")
    parser.add_argument("--groups", type=positive_int, default=100_000, help="groups of --ipc samples drawn per class")
    parser.add_argument("--statistics_dir", default="outputs/d3hr",
                        help="the classes' inverted-latent statistics, made once and reused by every seed and IPC")
    parser.add_argument("--num_workers", type=non_negative_int, default=4, help="image-loading workers")
    args = parser.parse_args(argv)
    if args.inversion_steps > args.num_inference_steps:
        raise UsageError(f"--inversion_steps {args.inversion_steps} is more than the {args.num_inference_steps} steps "
                         "of --num_inference_steps; choose at most that")
    return args


if __name__ == "__main__":  # the flags are checked before torch loads (seconds): --help answers at once
    ARGS = cli(parse_args)()

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from d4m.data import class_count, describe_prompts, resolve_prompts, train_dataset, write_class_list
from d4m.device import announce, pick_device, set_deterministic
from d4m.diffusion import EmbeddingCache, batch_invariant, load_sampler, pipeline_dtype
from d4m.imageset import batches, my_share, save_image, set_paths, writing_set
from d4m.latents import ResizedImages, class_batches, class_indices, encoded_classes, latent_encoder, shuffled
from d4m.outputs import atomic_path, claim_folder_run, exclusive_run
from d4m.runtime import Progress, barrier, init_distributed, seeded_generator
from d4m.settings import d3hr_settings

GROUP_CHUNK = 1000  # groups drawn and scored at once; chunk k of class c draws from a generator seeded (seed, c, k)
MEAN_WEIGHT, STD_WEIGHT, SKEW_WEIGHT = 1.0, 1.0, 0.1  # D3HR's weights of the three gaps
STATISTICS_SEED = 0  # which images are inverted and their VAE posterior samples: the same for every set


def group_scores(samples: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[G] D3HR's score of G groups [G, ipc, D] against the class Gaussian N(mean, std²) (lower is better): the L2
    gap of the group's per-dimension mean to `mean`, of its per-dimension standard deviation to `std`, and the L2
    norm over the members of each member's skewness across the D dimensions after standardising every dimension by
    the group's own mean and standard deviation (as D3HR computes it). One member has no spread: the mean alone."""
    score = MEAN_WEIGHT * (samples.mean(1) - mean).norm(dim=1)
    if samples.shape[1] == 1:
        return score
    spread = samples.std(1, keepdim=True)
    score += STD_WEIGHT * (spread.squeeze(1) - std).norm(dim=1)
    d = samples.shape[2]
    standard = (samples - samples.mean(1, keepdim=True)) / spread
    skewness = standard.pow(3).sum(2) * (d / ((d - 1) * (d - 2)))
    return score + SKEW_WEIGHT * skewness.norm(dim=1)


def best_group(mean: torch.Tensor, std: torch.Tensor, ipc: int, groups: int, seed: int, label: int) -> torch.Tensor:
    """The best-scoring of `groups` groups of `ipc` draws from N(mean, std²) [ipc, D], drawn GROUP_CHUNK at a time."""
    best, best_score = None, float("inf")
    for k, start in enumerate(range(0, groups, GROUP_CHUNK)):
        size = min(GROUP_CHUNK, groups - start)
        noise = torch.randn(size, ipc, mean.numel(), generator=seeded_generator(seed, label, k, device=mean.device),
                            device=mean.device)
        samples = mean + std * noise
        scores = group_scores(samples, mean, std)
        i = int(scores.argmin())
        if float(scores[i]) < best_score:
            best, best_score = samples[i].clone(), float(scores[i])
    return best


def statistics_folder(args: argparse.Namespace, name: str) -> Path:
    return Path(args.statistics_dir) / (f"{name}_n{args.inversion_images}_inv{args.inversion_steps}of"
                                        f"{args.num_inference_steps}_g{float(args.guidance_scale)}_size{args.size}")


def invert_classes(args: argparse.Namespace, pipe, data, members: list[list[int]], classes: list[int],
                   prompts: list[str], folder: Path, device: torch.device, rank: int) -> None:
    """For each of `classes`: encode --inversion_images of its training images (a choice seeded per class), invert
    them by DDIM under the class's prompt, and store the mean and unbiased variance of the inverted latents per
    dimension in folder/<class>.safetensors."""
    from scripts.pipeline_stable_diffusion_gen_latents import StableDiffusionGenLatentsPipeline

    chosen = [shuffled(m, STATISTICS_SEED, c)[:args.inversion_images] if c in classes else [] for c, m in enumerate(members)]
    plan = class_batches(chosen, classes, STATISTICS_SEED, args.batch_size)
    loader = DataLoader(ResizedImages(data, args.size), batch_sampler=plan, num_workers=min(args.num_workers, os.cpu_count() or 1))
    encode = latent_encoder(StableDiffusionGenLatentsPipeline(vae=pipe.vae, scheduler=pipe.scheduler), args.batch_size, False)
    labels = {index: c for c in classes for index in chosen[c]}
    embeds = EmbeddingCache(pipe, "", args.guidance_scale > 1)
    bar = Progress(total=len(plan), desc="D3HR inversion", rank=rank, unit="batches")
    with batch_invariant(pipe, device), bar:
        for c, latents in encoded_classes(encode, loader, labels, STATISTICS_SEED, device, bar):
            inverted = []
            for part in latents.split(args.batch_size):
                positive, negative = embeds.batch([prompts[c]] * len(part))
                inverted.append(pipe.invert(part, positive, negative, args.guidance_scale, args.num_inference_steps,
                                            args.inversion_steps).double().cpu())
            flat = torch.cat(inverted).flatten(1)
            variance = flat.var(0) if len(flat) > 1 else torch.zeros_like(flat[0])
            with atomic_path(folder / f"{c}.safetensors") as tmp:
                save_file({"mean": flat.mean(0).float(), "variance": variance.float(),
                           "shape": torch.tensor(latents.shape[1:])}, str(tmp))


def sample_groups(args: argparse.Namespace, pipe, stats: Path, classes: list[int], paths: dict, prompts: list[str],
                  device: torch.device, rank: int) -> None:
    """For each of `classes`: the best group of IPC draws from its Gaussian, decoded by DDIM from the inversion's
    noise level under its prompt; the images not yet on disk are written."""
    embeds = EmbeddingCache(pipe, "", args.guidance_scale > 1)
    bar = Progress(total=len(classes) * args.ipc, desc="D3HR", rank=rank, unit="images")
    with batch_invariant(pipe, device), bar:
        for c in classes:
            gaussian = load_file(str(stats / f"{c}.safetensors"))
            mean, std = gaussian["mean"].to(device), gaussian["variance"].to(device).sqrt()
            group = best_group(mean, std, args.ipc, args.groups, args.seed, c).view(args.ipc, *gaussian["shape"].tolist())
            for part in batches([j for j in range(args.ipc) if not paths[c, j].exists()], args.batch_size):
                positive, negative = embeds.batch([prompts[c]] * len(part))
                images = pipe(positive, group[part], negative, guidance_scale=args.guidance_scale,
                              num_inference_steps=args.num_inference_steps,
                              start_step=args.num_inference_steps - args.inversion_steps)
                for image, j in zip(images, part):
                    save_image(image, paths[c, j], args.image_size, args.resize_filter)
                bar.update(len(part))


@cli
def main(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    set_deterministic(args.deterministic)
    rank, world = init_distributed(device, args.dist_timeout)
    data = train_dataset(args.dataset, args.data_dir)
    num_classes = class_count(args.dataset, data)
    names = [str(name) for name in getattr(data, "classes", range(num_classes))]
    prompts = resolve_prompts(args.dataset, args.label_file_path, names)
    members = class_indices(data.targets, num_classes)
    name = args.name or (Path(args.data_dir).resolve().name if args.dataset == "imagefolder" else args.dataset)
    root = Path(args.save_init_image_path) / f"{name}_d3hr_ipc{args.ipc}_seed{args.seed}"
    stats = statistics_folder(args, name)
    dtype = str(pipeline_dtype(device, args.dtype)).removeprefix("torch.")
    settings = d3hr_settings(args, prompts, dtype) if rank == 0 else None
    with writing_set(root, settings, "--save_init_image_path", rank, world):
        paths = set_paths(root, num_classes, args.ipc)
        unfinished = [c for c in range(num_classes) if not all(paths[c, j].exists() for j in range(args.ipc))]
        announce("D3HR", device, dtype, world, rank, f"batch {args.batch_size}, {args.groups} groups per class",
                 f"{len(unfinished)} of {num_classes} classes to make")
        if rank == 0:
            print(describe_prompts(names, prompts), flush=True)
        mine = my_share(unfinished, rank, world)
        pipe = load_sampler(args.diffusion_checkpoints_path, device, args.dtype, "DDIMScheduler") if mine else None
        # 1. the class Gaussians in the inverted-latent space (made once per model, data and inversion settings)
        stats_settings = {key: value for key, value in (settings or {}).items()
                          if key in ("model", "dtype", "data", "prompts", "num_inference_steps", "inversion_steps",
                                     "inversion_images", "guidance_scale", "size")}
        with exclusive_run(stats / ".lock", f"D3HR statistics {stats}", rank, world):
            claim_folder_run(stats, stats_settings or None, "--statistics_dir", True, rank, world)
            missing = [c for c in mine if not (stats / f"{c}.safetensors").exists()]
            if missing:
                invert_classes(args, pipe, data, members, missing, prompts, stats, device, rank)
            barrier()
        # 2. per class, the best of --groups groups of IPC draws, 3. decoded by deterministic DDIM
        if mine:
            sample_groups(args, pipe, stats, mine, paths, prompts, device, rank)
        barrier()
        if rank == 0:
            write_class_list(root, names, prompts)
            print(f"{num_classes} classes x {args.ipc} images in {root}")


if __name__ == "__main__":
    main(ARGS)
