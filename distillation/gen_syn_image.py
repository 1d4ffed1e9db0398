"""Stage 2 of D4M: turn each class's prototypes into synthetic images with SD img2img from the latent."""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from d4m.cli import (ArgumentParser, DATASETS, DIFFUSION_DTYPES, RESIZE_FILTERS, UsageError, add_device_args, cli,
                     finite_float, image_side, non_negative_float, plain_name, positive_int, seed_int)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--batch_size", type=positive_int, default=10, help="images per pipeline call (across classes)")
    parser.add_argument("--diffusion_checkpoints_path", type=str, default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="local diffusers folder or hub id")
    parser.add_argument("--dataset", type=str, default="imagenet", choices=DATASETS)
    parser.add_argument("--guidance_scale", "-g", type=non_negative_float, default=8.0,
                        help="classifier-free guidance; at most 1 turns it off")
    parser.add_argument("--ipc", type=positive_int, default=1, help="images per class; a multiple of the prototypes per class")
    parser.add_argument("--km_expand", type=positive_int, default=10, help="only names the output folder")
    parser.add_argument("--label_file_path", "--label-file-path", type=str, default=None, help="one prompt per class, in class order")
    parser.add_argument("--prototype_path", type=str, required=True, help="a .safetensors or .json prototype file")
    parser.add_argument("--save_init_image_path", type=str, default="outputs/syn")
    parser.add_argument("--strength", "-s", type=finite_float, default=0.75,
                        help="the share of the 50 steps that denoise: int(steps * strength) run, the rest are skipped")
    parser.add_argument("--seed", type=seed_int, default=0, help="image j of class c uses noise seeded by (seed, c, j)")
    parser.add_argument("--num_inference_steps", type=positive_int, default=50)
    parser.add_argument("--image_size", type=image_side, default=224, help="saved images are image_size x image_size")
    parser.add_argument("--name", type=plain_name, default=None,
                        help="names the output folder; default: the name stage 1 recorded (the dataset, or the image "
                             "folder's name)")
    parser.add_argument("--resize_filter", default="bicubic", choices=RESIZE_FILTERS,
                        help="PIL filter of the resize to --image_size (bicubic: PIL's default, as the original saved)")
    parser.add_argument("--negative_prompt", type=str, default="cartoon, anime, painting")
    parser.add_argument("--safety_checker", action="store_true", help="load and apply the checkpoint's safety checker")
    parser.add_argument("--dtype", type=str, default="auto", choices=("auto", *DIFFUSION_DTYPES),
                        help="weights and activations; auto: float16 on CUDA, float32 elsewhere")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet (faster after a warm-up; images then differ from uncompiled "
                             "ones in the last bits)")
    add_device_args(parser)
    args = parser.parse_args(argv)
    if not 0 < args.strength <= 1:
        raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    first = args.num_inference_steps - int(args.num_inference_steps * args.strength)  # the first step that runs
    if first == args.num_inference_steps:
        raise UsageError(f"--strength {args.strength} with --num_inference_steps {args.num_inference_steps} "
                         "leaves no denoising step; raise either")
    return args


if __name__ == "__main__":  # the flags are checked before torch loads (seconds): --help answers at once
    ARGS = cli(parse_args)()

import functools

import torch

from d4m.data import NUM_CLASSES, check_same_classes, default_prompt_file, describe_prompts, load_prompts, write_class_list
from d4m.device import announce, memory_format, pick_device, set_deterministic
from d4m.diffusion import EmbeddingCache, batch_invariant, compile_unet, load_pipeline, pipeline_dtype
from d4m.imageset import batches, my_share, save_image, set_paths, writing_set
from d4m.prototypes import PrototypeFile
from d4m.runtime import Progress, barrier, init_distributed, seeded_generator
from d4m.settings import synthesis_settings


def label_prompts(args: argparse.Namespace, protos: PrototypeFile) -> list[str]:
    """The label file's prompts (given, else shipped for the dataset), which the prototype file must match."""
    path = args.label_file_path or default_prompt_file(args.dataset)
    if path is None:
        return protos.prompts
    prompts = load_prompts(path, NUM_CLASSES.get(args.dataset))
    if len(prompts) != len(protos.prompts):
        raise UsageError(f"prototype file {args.prototype_path} has {len(protos.prompts)} classes but label file "
                         f"{path} has {len(prompts)}; use the label file the prototypes were made with")
    check_same_classes(protos.prompts, prompts, f"prototype file {args.prototype_path} and label file {path} have "
                       "other prompts", "use the label file the prototypes were made with")
    return prompts


def output_dir(args: argparse.Namespace, protos: PrototypeFile) -> Path:
    """save_init_image_path/{name}_ipc{prototypes}_{ipc}_s{strength}_g{guidance}_kmexpand{km_expand}, the name that
    of stage 1 (the dataset, or an image folder's own name) unless --name is given."""
    name = args.name or protos.name or args.dataset
    # floats printed as Python does (s0.7, g8.0), the names the original's runs and the later stages use
    folder = (f"{name}_ipc{protos.per_class}_{args.ipc}_s{float(args.strength)}_g{float(args.guidance_scale)}"
              f"_kmexpand{args.km_expand}")
    return Path(args.save_init_image_path) / folder


def synthesize(args: argparse.Namespace, pipe, protos: PrototypeFile, prompts: list[str],
               jobs: list[tuple[int, int, Path]], device: torch.device, rank: int) -> None:
    """Make the images `jobs` (class, image, file) name, --batch_size per pipeline call: image j of class c is img2img
    from prototype j // (ipc / prototypes per class) with noise seeded by (seed, c, j). PNGs are encoded and written
    by threads while the device makes the next batch."""
    embeds = EmbeddingCache(pipe, args.negative_prompt, args.guidance_scale > 1)
    repeats = args.ipc // protos.per_class
    class_prototypes = functools.lru_cache(maxsize=1)(protos.of_class)  # the jobs come class after class
    bar = Progress(total=len(jobs), desc="synthesis", rank=rank, unit="images")
    with batch_invariant(pipe, device), bar, ThreadPoolExecutor(max_workers=2) as writers:
        pending = []
        for batch in batches(jobs, args.batch_size):
            latents = torch.stack([class_prototypes(c)[j // repeats] for c, j, _ in batch])
            positive, negative = embeds.batch([prompts[c] for c, _, _ in batch])
            images = pipe(
                latents=latents, prompt_embeds=positive, negative_prompt_embeds=negative, strength=args.strength,
                guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps,
                generator=[seeded_generator(args.seed, c, j) for c, j, _ in batch],
            ).images
            done = [f for f in pending if f.done()]
            for future in done:
                future.result()  # a failed write stops the run here
            pending = [f for f in pending if f not in done]
            pending += [writers.submit(save_image, image, path, args.image_size, args.resize_filter)
                        for image, (_, _, path) in zip(images, batch)]
            bar.update(len(batch))
        for future in pending:
            future.result()


def load_synthesis_pipeline(args: argparse.Namespace, device: torch.device, rank: int):
    # diffusers loads here, once the inputs are checked
    from scripts.pipeline_stable_diffusion_latents2img import StableDiffusionLatents2ImgPipeline

    pipe = load_pipeline(StableDiffusionLatents2ImgPipeline, args.diffusion_checkpoints_path, device,
                         safety_checker=args.safety_checker, dtype=args.dtype)
    pipe.unet.to(memory_format=memory_format(device))
    pipe.vae.to(memory_format=memory_format(device))
    if args.compile:
        reason = compile_unet(pipe, device)
        if reason and rank == 0:
            print(f"--compile skipped: {reason}; the UNet runs uncompiled", file=sys.stderr)
    return pipe


@cli
def main(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    set_deterministic(args.deterministic)
    rank, world = init_distributed(device, args.dist_timeout)
    protos = PrototypeFile(args.prototype_path)
    prompts = label_prompts(args, protos)
    if args.ipc % protos.per_class:
        raise UsageError(f"--ipc {args.ipc} is not a multiple of the {protos.per_class} prototypes per class in "
                         f"{args.prototype_path}; use a multiple of {protos.per_class}")
    names = protos.class_names or [str(c) for c in range(len(prompts))]
    root = output_dir(args, protos)
    dtype = str(pipeline_dtype(device, args.dtype)).removeprefix("torch.")
    settings = synthesis_settings(args, prompts, dtype) if rank == 0 else None
    with writing_set(root, settings, "--save_init_image_path", rank, world):
        # written atomically: an existing file is complete
        remaining = [(c, j, path) for (c, j), path in set_paths(root, len(prompts), args.ipc).items() if not path.exists()]
        announce("synthesis", device, dtype, world, rank, f"batch {args.batch_size}" + (", compile" if args.compile else ""),
                 f"{len(remaining)} of {len(prompts) * args.ipc} images to make")
        if rank == 0:
            print(describe_prompts(names, prompts), flush=True)
        todo = my_share(remaining, rank, world)
        if todo:
            pipe = load_synthesis_pipeline(args, device, rank)
            synthesize(args, pipe, protos, prompts, todo, device, rank)
        barrier()
        if rank == 0:
            write_class_list(root, names, prompts)
            print(f"{len(prompts)} classes x {args.ipc} images in {root}")


if __name__ == "__main__":
    main(ARGS)
