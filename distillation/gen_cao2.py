"""CaO2 (Wang et al., Rectifying Inconsistencies in Diffusion-Based Dataset Distillation, ICCV 2025) with a Stable
Diffusion-shaped generator. Stage 1, selection: k x IPC candidates per class are sampled from independent noise
under the class's prompt; a teacher keeps the IPC it classifies right with the highest confidence (the most
confident wrong ones fill any shortfall). Stage 2, latent optimisation: each kept latent is refined so that the
unconditional model denoises it well (noise-prediction MSE + an L-infinity term at small timesteps), then decoded.
Differences from the authors' code: docs/successors.md."""
from __future__ import annotations

import argparse

from d4m.cli import (ArgumentParser, UsageError, add_generator_args, cli, non_negative_float, non_negative_int,
                     positive_float, positive_int)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    add_generator_args(parser, guidance_scale=2.7)
    parser.add_argument("--data_dir", "--data-dir", required=True, help="the dataset's folder (its class list; no image is read)")
    parser.add_argument("--teacher_path", "--teacher-path", default=None, help="the selecting teacher: a file of "
                                                                               "matching/train_teacher.py")
    parser.add_argument("--teacher_arch", "--teacher-arch", default=None,
                        help="or a torchvision model with its ImageNet weights (CaO2: resnet18)")
    parser.add_argument("--candidates", type=positive_int, default=4, metavar="K",
                        help="K x IPC candidates per class (CaO2: 4 on ImageNet-1K, 2 on its subsets)")
    parser.add_argument("--optimization_steps", type=non_negative_int, default=100,
                        help="Adam steps of stage 2 per latent (CaO2: 100; 0 skips stage 2)")
    parser.add_argument("--optimization_lr", type=positive_float, default=6e-4, help="Adam's learning rate (CaO2: 6e-4)")
    parser.add_argument("--linf_weight", type=non_negative_float, default=10.0,
                        help="weight of the L-infinity term of stage 2's loss (CaO2: 10)")
    parser.add_argument("--optimization_levels", type=positive_int, default=11,
                        help="stage 2 draws its timestep from levels 1 .. this of the --num_inference_steps "
                             "schedule, counted from the clean end (CaO2: 1 .. 11 of 50)")
    args = parser.parse_args(argv)
    if not (args.teacher_path or args.teacher_arch):
        raise UsageError("CaO2 selects with a teacher: give --teacher_path (or --teacher_arch)")
    if args.optimization_levels >= args.num_inference_steps:
        raise UsageError(f"--optimization_levels {args.optimization_levels} must be below --num_inference_steps "
                         f"{args.num_inference_steps}")
    return args


if __name__ == "__main__":  # the flags are checked before torch loads (seconds): --help answers at once
    ARGS = cli(parse_args)()

import json
from pathlib import Path

import torch
from PIL import Image

from d4m.data import class_count, describe_prompts, resolve_prompts, train_dataset, write_class_list
from d4m.device import announce, pick_device, set_deterministic
from d4m.diffusion import EmbeddingCache, batch_invariant, load_sampler, pipeline_dtype
from d4m.imageset import batches, my_share, save_image, set_paths, writing_set
from d4m.labelcheck import eval_transform
from d4m.latents import latent_shape
from d4m.models import load_teacher
from d4m.outputs import atomic_path
from d4m.runtime import Progress, barrier, init_distributed, seeded_generator
from d4m.settings import cao2_settings


def keep_rule(probabilities: torch.Tensor, label: int, keep: int) -> list[int]:
    """CaO2's selection of `keep` of the candidates whose teacher probabilities [n, classes] are given: those whose
    top-1 is `label`, by decreasing confidence (the top probability), then the wrong ones by the same order."""
    confidence, predicted = probabilities.max(1)
    order = torch.argsort(confidence, descending=True, stable=True).tolist()
    right = [i for i in order if predicted[i] == label]
    return (right + [i for i in order if predicted[i] != label])[:keep]


@torch.enable_grad()
def optimise_latents(pipe, latents: torch.Tensor, null_embeds: torch.Tensor, generators: list[torch.Generator],
                     args: argparse.Namespace) -> torch.Tensor:
    """CaO2's stage 2 on clean latents [n,4,h,w]: Adam on each latent for --optimization_steps steps; each latent
    keeps one noise ε and draws its timestep per step from the --optimization_levels lowest levels of the schedule;
    loss per latent: MSE(target, model(x_t, t, empty prompt)) + --linf_weight * max|target - prediction|, the target
    ε (or v for a v-predicting model). Summed over the latents, each latent's update is its own."""
    scheduler, unet = pipe.scheduler, pipe.unet
    scheduler.set_timesteps(args.num_inference_steps)
    levels = scheduler.timesteps.flip(0)[1:args.optimization_levels + 1].to(latents.device)
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(latents)
    latents = latents.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([latents], lr=args.optimization_lr)
    unet.requires_grad_(False)
    for _ in range(args.optimization_steps):
        picks = torch.stack([torch.randint(len(levels), (1,), generator=g) for g in generators]).flatten()
        t = levels[picks.to(levels.device)]
        noisy = scheduler.add_noise(latents, noise, t)  # float32 latents; the UNet runs in its own dtype
        predicted = unet(noisy.to(unet.dtype), t, encoder_hidden_states=null_embeds, return_dict=False)[0].float()
        target = scheduler.get_velocity(latents, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
        error = (predicted - target).flatten(1)
        loss = (error.pow(2).mean(1) + args.linf_weight * error.abs().amax(1)).sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return latents.detach()


@torch.no_grad()
def teacher_probabilities(teacher, record: dict, images: list[Image.Image], size: int, resize_filter: str,
                          device: torch.device) -> torch.Tensor:
    """[n, classes] softmax of the teacher on the images as they would be saved (resized to `size`), under the
    teacher's own validation transform."""
    transform = eval_transform(record["input_size"], record["mean"], record["std"])
    resample = Image.Resampling[resize_filter.upper()]
    batch = torch.stack([transform(image.resize((size, size), resample)) for image in images]).to(device)
    return teacher(batch).float().softmax(1).cpu()


@cli
def main(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    set_deterministic(args.deterministic)
    rank, world = init_distributed(device, args.dist_timeout)
    data = train_dataset(args.dataset, args.data_dir)
    names = [str(name) for name in getattr(data, "classes", range(class_count(args.dataset, data)))]
    prompts = resolve_prompts(args.dataset, args.label_file_path, names)
    name = args.name or (Path(args.data_dir).resolve().name if args.dataset == "imagefolder" else args.dataset)
    root = Path(args.save_init_image_path) / f"{name}_cao2_ipc{args.ipc}_seed{args.seed}"
    dtype = str(pipeline_dtype(device, args.dtype)).removeprefix("torch.")
    settings = cao2_settings(args, prompts, dtype) if rank == 0 else None
    with writing_set(root, settings, "--save_init_image_path", rank, world):
        paths = set_paths(root, len(prompts), args.ipc)
        unfinished = [c for c in range(len(prompts)) if not all(paths[c, j].exists() for j in range(args.ipc))]
        announce("CaO2", device, dtype, world, rank, f"batch {args.batch_size}, {args.candidates} x IPC candidates",
                 f"{len(unfinished)} of {len(prompts)} classes to make")
        if rank == 0:
            print(describe_prompts(names, prompts), flush=True)
        mine = my_share(unfinished, rank, world)
        if mine:
            teacher, record = load_teacher(args.teacher_path, args.teacher_arch, len(prompts), None, device,
                                           f"the set has {len(prompts)} classes")
            pipe = load_sampler(args.diffusion_checkpoints_path, device, args.dtype, "DDPMScheduler")
            shape = latent_shape(pipe, args.size)
            embeds = EmbeddingCache(pipe, "", args.guidance_scale > 1)  # the empty prompt: the unconditional model
            made = args.candidates * args.ipc
            bar = Progress(total=len(mine), desc="CaO2", rank=rank, unit="classes")
            with batch_invariant(pipe, device), bar:
                for c in mine:
                    # stage 1: K x IPC candidates from independent noise, the teacher keeps IPC
                    candidates = []
                    for part in batches(range(made), args.batch_size):
                        generators = [seeded_generator(args.seed, c, k) for k in part]
                        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
                        positive, negative = embeds.batch([prompts[c]] * len(part))
                        candidates.append(pipe(positive, noise, negative, guidance_scale=args.guidance_scale,
                                               num_inference_steps=args.num_inference_steps, generator=generators,
                                               output_type="latent").float())
                    candidates = torch.cat(candidates)
                    # the teacher sees all of a class's candidates in one batch, whatever --batch_size
                    decoded = [image for part in candidates.split(args.batch_size) for image in pipe.decode_latents_to(part)]
                    probabilities = teacher_probabilities(teacher, record, decoded, args.image_size, args.resize_filter,
                                                          device)
                    kept = keep_rule(probabilities, c, args.ipc)
                    # stage 2: each kept latent refined by the unconditional model, then decoded
                    null = embeds.batch([""])[0]
                    for part in batches(list(range(args.ipc)), args.batch_size):
                        generators = [seeded_generator(args.seed, c, made + j) for j in part]
                        latents = optimise_latents(pipe, candidates[[kept[j] for j in part]],
                                                   null.expand(len(part), -1, -1), generators, args)
                        for image, j in zip(pipe.decode_latents_to(latents), part):
                            save_image(image, paths[c, j], args.image_size, args.resize_filter)
                    confidence, predicted = probabilities.max(1)
                    record_selection(root, c, names[c], kept, predicted, confidence)
                    bar.update()
        barrier()
        if rank == 0:
            write_class_list(root, names, prompts)
            print(f"{len(prompts)} classes x {args.ipc} images in {root}")


def record_selection(root: Path, label: int, name: str, kept: list[int], predicted: torch.Tensor,
                     confidence: torch.Tensor) -> None:
    """What the teacher made of class `label`'s candidates, in root/.selection/<class>.json: how many it classified
    right, which were kept (candidate indices) and their confidence."""
    right = (predicted == label)
    row = {"class": name, "candidates": len(predicted), "right": int(right.sum()), "kept": kept,
           "kept_right": int(right[kept].sum()), "kept_confidence": [round(float(confidence[i]), 6) for i in kept]}
    with atomic_path(root / ".selection" / f"{label}.json") as tmp:
        tmp.write_text(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(ARGS)
