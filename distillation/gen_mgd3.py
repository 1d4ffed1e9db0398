"""MGD3 (Chan-Santiago et al., Mode-Guided Dataset Distillation using Diffusion Models, ICML 2025) with a Stable
Diffusion-shaped generator: image j of class c is sampled from pure noise under the class's prompt by a stochastic
(DDPM) sampler, and during the first steps every step's predicted clean latent is pulled towards its mode, the
class's j-th k-means prototype of D4M's stage 1. Differences from the authors' code: docs/successors.md."""
from __future__ import annotations

import argparse

from d4m.cli import (ArgumentParser, UsageError, add_generator_args, cli, non_negative_float, non_negative_int)

GUIDED_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")  # the pipeline's GUIDABLE_SCHEDULERS, without importing it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    add_generator_args(parser, guidance_scale=4.0)
    parser.add_argument("--prototype_path", required=True,
                        help="the modes: a prototype file of distillation/gen_prototype.py (--ipc a multiple of its "
                             "prototypes per class)")
    parser.add_argument("--mode_guidance_scale", type=non_negative_float, default=0.1, metavar="LAMBDA",
                        help="λ: each guided step moves the latent by λ σ_t (mode - x̂0) (MGD3: 0.1; 0: unguided)")
    parser.add_argument("--mode_guidance_stop", type=non_negative_int, default=24, metavar="STOP",
                        help="guide the steps of index 0 .. STOP-1 of --num_inference_steps (MGD3's --stop_t 25 of "
                             "50 guides 24 steps)")
    parser.add_argument("--scheduler", default="DDPMScheduler",
                        help="the sampler, a diffusers scheduler class built from the checkpoint's scheduler "
                             f"configuration; mode guidance takes {' or '.join(GUIDED_SCHEDULERS)} (MGD3: DDPM)")
    args = parser.parse_args(argv)
    if args.mode_guidance_stop > args.num_inference_steps:
        raise UsageError(f"--mode_guidance_stop {args.mode_guidance_stop} is past the {args.num_inference_steps} steps "
                         "of --num_inference_steps; choose 0 .. that")
    if args.mode_guidance_scale > 0 and args.scheduler not in GUIDED_SCHEDULERS:
        raise UsageError(f"--scheduler {args.scheduler} cannot be mode-guided (a multistep or sigma-scaled sampler "
                         f"would lose or misplace the guidance); choose {' or '.join(GUIDED_SCHEDULERS)}")
    return args


if __name__ == "__main__":  # the flags are checked before torch loads (seconds): --help answers at once
    ARGS = cli(parse_args)()

import functools
from pathlib import Path

import torch

from d4m.data import describe_prompts, write_class_list
from d4m.device import announce, pick_device, set_deterministic
from d4m.diffusion import EmbeddingCache, batch_invariant, load_sampler, pipeline_dtype
from d4m.imageset import batches, my_share, save_image, set_paths, writing_set
from d4m.latents import latent_shape
from d4m.prototypes import PrototypeFile
from d4m.runtime import Progress, barrier, init_distributed, seeded_generator
from d4m.settings import mgd3_settings


@cli
def main(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    set_deterministic(args.deterministic)
    rank, world = init_distributed(device, args.dist_timeout)
    modes = PrototypeFile(args.prototype_path)
    if args.ipc % modes.per_class:
        raise UsageError(f"--ipc {args.ipc} is not a multiple of the {modes.per_class} prototypes per class in "
                         f"{args.prototype_path}; use a multiple, or make prototypes with --ipc {args.ipc}")
    prompts, names = modes.prompts, modes.class_names or [str(c) for c in range(len(modes.prompts))]
    root = Path(args.save_init_image_path) / f"{args.name or modes.name or args.dataset}_mgd3_ipc{args.ipc}_seed{args.seed}"
    dtype = str(pipeline_dtype(device, args.dtype)).removeprefix("torch.")
    settings = mgd3_settings(args, prompts, dtype) if rank == 0 else None
    with writing_set(root, settings, "--save_init_image_path", rank, world):
        todo = [(c, j, path) for (c, j), path in set_paths(root, len(prompts), args.ipc).items() if not path.exists()]
        announce("MGD3", device, dtype, world, rank, f"batch {args.batch_size}, {args.scheduler}",
                 f"{len(todo)} of {len(prompts) * args.ipc} images to make")
        if rank == 0:
            print(describe_prompts(names, prompts), flush=True)
        todo = my_share(todo, rank, world)
        if todo:
            pipe = load_sampler(args.diffusion_checkpoints_path, device, args.dtype, args.scheduler)
            shape = latent_shape(pipe, args.size)
            if modes.shape[2:] != shape:
                raise UsageError(f"the prototypes in {args.prototype_path} are {modes.shape[2:]} latents, "
                                 f"but --size {args.size} makes {shape}; use the --size of stage 1")
            embeds = EmbeddingCache(pipe, "", args.guidance_scale > 1)  # the empty prompt: the unconditional model
            repeats = args.ipc // modes.per_class
            class_modes = functools.lru_cache(maxsize=1)(modes.of_class)  # the jobs come class after class
            bar = Progress(total=len(todo), desc="MGD3", rank=rank, unit="images")
            with batch_invariant(pipe, device), bar:
                for batch in batches(todo, args.batch_size):
                    # one generator per image draws its starting noise, then its sampler's noise
                    generators = [seeded_generator(args.seed, c, j) for c, j, _ in batch]
                    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
                    positive, negative = embeds.batch([prompts[c] for c, _, _ in batch])
                    images = pipe(positive, noise, negative, guidance_scale=args.guidance_scale,
                                  num_inference_steps=args.num_inference_steps, generator=generators,
                                  modes=torch.stack([class_modes(c)[j // repeats] for c, j, _ in batch]),
                                  mode_scale=args.mode_guidance_scale, mode_stop=args.mode_guidance_stop)
                    for image, (_, _, path) in zip(images, batch):
                        save_image(image, path, args.image_size, args.resize_filter)
                    bar.update(len(batch))
        barrier()
        if rank == 0:
            write_class_list(root, names, prompts)
            print(f"{len(prompts)} classes x {args.ipc} images in {root}")


if __name__ == "__main__":
    main(ARGS)
