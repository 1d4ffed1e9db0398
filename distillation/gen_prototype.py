"""Stage 1 of D4M: encode every training image with the SD VAE and cluster each class into `ipc` prototypes."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from d4m.cli import (ArgumentParser, DATASETS, KMEANS_METHODS, PROTOTYPE_FORMATS, UsageError, add_device_args, cli, image_side,
                     non_negative_int, plain_name, positive_int, seed_int)


VAE_BATCH = {"cuda": 32, "cpu": 10}  # images per VAE call by device, for throughput (bench/bench_prototypes.py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--batch_size", type=positive_int, default=None,
                        help=f"images per VAE call (batches never cross classes); default {VAE_BATCH['cuda']} on a GPU "
                             f"(512 px fits a 24 GB card), {VAE_BATCH['cpu']} on a CPU. The latents do not depend on "
                             "it (the original used 10)")
    parser.add_argument("--data_dir", "--data-dir", type=str, default=None,
                        help="dataset root (train/ inside for ImageFolder sets)")
    parser.add_argument("--dataset", type=str, default="imagenet", choices=DATASETS)
    parser.add_argument("--diffusion_checkpoints_path", type=str, default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="local diffusers folder or hub id")
    parser.add_argument("--ipc", type=positive_int, default=1, help="prototypes (k-means centres) per class")
    parser.add_argument("--km_expand", type=positive_int, default=10, help="k-means mini-batch = km_expand * ipc latents")
    parser.add_argument("--kmeans", type=str, default="faithful", choices=KMEANS_METHODS,
                        help="faithful: the original's per-class MiniBatchKMeans fed km_expand*ipc latents at a time; "
                             "full: full-batch k-means (k-means++, Lloyd) on all of a class's latents, on --device")
    parser.add_argument("--label_file_path", "--label-file-path", type=str, default=None, help="one prompt per class, in class order")
    parser.add_argument("--num_workers", type=non_negative_int, default=8,
                        help="processes that decode and resize the images (at most the machine's cores)")
    parser.add_argument("--save_prototype_path", type=str, default="outputs/prototypes")
    parser.add_argument("--size", type=image_side, default=512, help="images are resized to size x size before encoding")
    parser.add_argument("--seed", type=seed_int, default=0, help="seeds the class shuffles and the posterior samples")
    parser.add_argument("--prototype_format", type=str, default="safetensors", choices=PROTOTYPE_FORMATS)
    parser.add_argument("--name", type=plain_name, default=None,
                        help="names the outputs (NAME-ipc..., and stage 2's folder); default: the dataset, or for "
                             "imagefolder the data folder's name")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the VAE encoder (batches are then padded to --batch_size)")
    add_device_args(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":  # the flags are checked before torch loads (seconds): --help answers at once
    ARGS = cli(parse_args)()

import torch
from torch.utils.data import DataLoader

from d4m.data import class_count, describe_prompts, resolve_prompts, train_dataset
from d4m.device import announce, compile_unavailable, memory_format, pick_device, set_deterministic
from d4m.diffusion import batch_invariant, load_pipeline
from d4m.kmeans import class_centres, nearest_members
from d4m.latents import (ResizedImages, class_batches, class_indices, encoded_classes, latent_encoder, latent_shape,
                         shuffled)
from d4m.outputs import check_writable_file, exclusive_run, remove_stale_temporaries
from d4m.prototypes import PrototypeFile, PrototypeWriter, check_json_prompts, prototype_filename
from d4m.runtime import Progress, barrier, from_rank0, init_distributed, together
from d4m.settings import prototype_settings


def load_encoder(args: argparse.Namespace, device: torch.device) -> tuple[object, bool]:
    """The SD pipeline whose VAE encodes the images (diffusers loads here, once the inputs are checked), and
    whether its encoder is compiled."""
    from scripts.pipeline_stable_diffusion_gen_latents import StableDiffusionGenLatentsPipeline

    pipe = load_pipeline(StableDiffusionGenLatentsPipeline, args.diffusion_checkpoints_path, device)
    pipe.vae.to(memory_format=memory_format(device))
    compiled = args.compile and not compile_unavailable(device)
    if compiled:
        pipe.vae.encoder.compile()
    return pipe, compiled


@cli
def main(args: argparse.Namespace) -> None:
    # set-up: device, processes, the real training set and its classes' prompts
    device = pick_device(args.device)
    set_deterministic(args.deterministic)
    rank, world = init_distributed(device, args.dist_timeout)
    args.batch_size = args.batch_size or VAE_BATCH.get(device.type, VAE_BATCH["cpu"])
    data = train_dataset(args.dataset, args.data_dir)
    num_classes = class_count(args.dataset, data)
    class_names = [str(name) for name in getattr(data, "classes", range(num_classes))]
    prompts = resolve_prompts(args.dataset, args.label_file_path, class_names)
    if args.prototype_format == "json":
        check_json_prompts(prompts)
    members = class_indices(data.targets, num_classes)
    small = [c for c, m in enumerate(members) if len(m) < args.ipc]
    if small:
        raise UsageError(f"class {class_names[small[0]]} has {len(members[small[0]])} images, fewer than --ipc "
                         f"{args.ipc}; lower --ipc or add images")
    name = args.name or (Path(args.data_dir).resolve().name if args.dataset == "imagefolder" else args.dataset)
    out = Path(args.save_prototype_path) / prototype_filename(name, args.ipc, args.km_expand, args.prototype_format)
    check_writable_file(out, "--save_prototype_path")

    with exclusive_run(out.with_name(f".{out.name}.lock"), f"prototype file {out}", rank, world):  # before the model
        if rank == 0:
            remove_stale_temporaries(out.parent)  # a killed run's .NAME.build<pid>
        pipe, compiled = load_encoder(args, device)
        announce("prototypes", device, str(pipe.vae.dtype).removeprefix("torch."), world, rank,
                 f"VAE batch {args.batch_size}" + (", compiled encoder" if compiled else ""))
        if rank == 0:
            print(describe_prompts(class_names, prompts), flush=True)
        # every process writes its classes into one temporary file, which rank 0 names `out` once all are in
        tmp = from_rank0(out.with_name(f".{out.name}.build{os.getpid()}"), world)
        writer = PrototypeWriter(out, tmp, prompts, (args.ipc, *latent_shape(pipe, args.size)),
                                 prototype_settings(args, name, class_names), args.prototype_format)
        if rank == 0:
            writer.create()
        barrier()

        # this process's classes (every world-th), loaded by workers in batches that never cross a class
        classes = list(range(rank, num_classes, world))
        batches = class_batches(members, classes, args.seed, args.batch_size)
        workers = min(args.num_workers, os.cpu_count() or 1)  # more than the machine's cores only slows it down
        loader = DataLoader(ResizedImages(data, args.size), batch_sampler=batches, num_workers=workers,
                            pin_memory=device.type == "cuda")
        labels = {index: label for label in classes for index in members[label]}
        # a closed bar (leave=False) erases itself, so an error that stops the loop stays the only line shown
        bar = Progress(total=len(batches), desc="encoding", rank=rank, unit="batches")
        try:
            # encode each class with the VAE, cluster its latents into `ipc` prototypes, write them
            with together(world), batch_invariant(pipe, device), bar:
                encode = latent_encoder(pipe, args.batch_size, compiled)
                for label, latents in encoded_classes(encode, loader, labels, args.seed, device, bar):
                    centres, score = class_centres(args.kmeans, latents.flatten(1), args.ipc, args.km_expand,
                                                   args.seed, label, device)
                    order = shuffled(members[label], args.seed, label)  # the order the latents were encoded in
                    nearest = [order[i] for i in nearest_members(latents.flatten(1), centres, device)]
                    writer.write(label, centres.reshape(args.ipc, *latents.shape[1:]), float(f"{score:.8g}"), nearest)
            if rank == 0:
                mean = float(f"{float(PrototypeFile(tmp).inertia().mean()):.8g}")
                writer.commit()
        except BaseException:  # a refusal, a crash or an interrupt leaves no full-size temporary file behind
            if rank == 0:
                writer.discard()
            raise
    if rank == 0:
        print(f"wrote {num_classes} x {args.ipc} prototypes to {out}")
        print(f"k-means {args.kmeans}: mean per-class inertia {mean:.6g}")


if __name__ == "__main__":
    main(ARGS)
