"""Stage 2 of D4M: turn each class's prototypes into synthetic images with SD img2img from the latent."""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from d4m.cli import (ArgumentParser, DATASETS, DIFFUSION_DTYPES, SELECTIONS, UsageError, add_device_args, cli, finite_float,
                     non_negative_float, plain_name, positive_int, seed_int)

RESIZE_FILTERS = ("bicubic", "bilinear", "lanczos", "nearest")  # PIL resampling filters


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    parser.add_argument("--image_size", type=positive_int, default=224, help="saved images are image_size x image_size")
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
    beyond = parser.add_argument_group("beyond D4M (off by default: the faithful images stay bit-identical)")
    beyond.add_argument("--mode_guidance", type=non_negative_float, default=0.0, metavar="LAMBDA",
                        help="mode guidance (MGD3, Chan-Santiago et al., ICML 2025, arXiv 2505.18963): steer each "
                             "step's predicted clean latent towards its prototype by LAMBDA (0: off)")
    beyond.add_argument("--mode_guidance_stop", type=positive_int, default=25, metavar="STEP",
                        help="guide during the first STEP of the --num_inference_steps steps (MGD3: 25 of 50)")
    beyond.add_argument("--candidates", type=positive_int, default=1, metavar="N",
                        help="candidate selection (CaO2, Wang et al., arXiv 2506.22637): make N images per slot and "
                             "keep those the teacher classifies right (1: off)")
    beyond.add_argument("--select", default="diverse", choices=SELECTIONS,
                        help="confidence: per slot, the right candidate the teacher is surest of (CaO2); diverse: per "
                             "class, a greedy k-center over the teacher's features among the right ones")
    beyond.add_argument("--teacher_path", "--teacher-path", default=None,
                        help="the selection's teacher: a file of matching/train_teacher.py")
    beyond.add_argument("--teacher_arch", "--teacher-arch", default=None,
                        help="or a torchvision model with its ImageNet weights (e.g. resnet18)")
    add_device_args(parser)
    args = parser.parse_args(argv)
    if not 0 < args.strength <= 1:
        raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    first = args.num_inference_steps - int(args.num_inference_steps * args.strength)  # the first step that runs
    if first == args.num_inference_steps:
        raise UsageError(f"--strength {args.strength} with --num_inference_steps {args.num_inference_steps} "
                         "leaves no denoising step; raise either")
    if args.mode_guidance > 0 and not first < args.mode_guidance_stop <= args.num_inference_steps:
        raise UsageError(f"--mode_guidance_stop {args.mode_guidance_stop} is outside the steps that run ({first + 1} "
                         f"to {args.num_inference_steps} at --strength {args.strength}); choose one of them")
    if args.candidates > 1 and not (args.teacher_path or args.teacher_arch):
        raise UsageError("--candidates needs a teacher to select with: --teacher_path or --teacher_arch")
    return args


if __name__ == "__main__":  # --help, and a bad flag, answered before torch loads (which takes seconds)
    cli(parse_args)(None)

import json
import shutil
from dataclasses import dataclass

import torch
from PIL import Image

from d4m.data import NUM_CLASSES, check_same_classes, default_prompt_file, describe_prompts, load_prompts, write_class_list
from d4m.device import announce, memory_format, pick_device, set_deterministic
from d4m.diffusion import EmbeddingCache, batch_invariant, compile_unet, load_pipeline, pipeline_dtype
from d4m.models import load_teacher
from d4m.prototypes import PrototypeFile
from d4m.selection import describe, keep_confident, keep_diverse, score_candidates
from d4m.outputs import atomic_path, check_writable, claim_folder_run, exclusive_run, file_digest, text_digest
from d4m.runtime import Progress, barrier, init_distributed, seeded_generator


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
    if args.mode_guidance > 0:
        folder += f"_mg{float(args.mode_guidance)}-{args.mode_guidance_stop}"
    if args.candidates > 1:
        folder += f"_c{args.candidates}-{args.select}"
    return Path(args.save_init_image_path) / folder


def synthesis_settings(args: argparse.Namespace, prompts: list[str], dtype: str) -> dict:
    """What decides the images, recorded in the output folder's manifest: a resume must use the same (batch size,
    device and worker count do not change the images; --compile changes their last bits only)."""
    model = args.diffusion_checkpoints_path
    return {"prototype_file": file_digest(args.prototype_path), "prompts": text_digest("\n".join(prompts)),
            "model": str(Path(model).resolve()) if Path(model).is_dir() else model, "dtype": dtype,
            "seed": args.seed, "ipc": args.ipc, "strength": args.strength, "guidance_scale": args.guidance_scale,
            "num_inference_steps": args.num_inference_steps, "negative_prompt": args.negative_prompt,
            "image_size": args.image_size, "resize_filter": args.resize_filter, "safety_checker": args.safety_checker,
            **({"mode_guidance": args.mode_guidance, "mode_guidance_stop": args.mode_guidance_stop}
               if args.mode_guidance > 0 else {}),
            **({"candidates": args.candidates, "select": args.select,
                "teacher": file_digest(args.teacher_path) if args.teacher_path else args.teacher_arch}
               if args.candidates > 1 else {})}


def image_path(root: Path, label: int, index: int, num_classes: int, ipc: int) -> Path:
    """Zero-padded names of equal width, so that sorted folder order is class order."""
    return root / f"{label:0{len(str(num_classes - 1))}d}" / f"{index:0{len(str(ipc - 1))}d}.png"


@dataclass(frozen=True)
class Job:
    """One image to make: class, slot (image index; its prototype is slot // repeats), candidate, file. Its noise
    is seeded by (seed, class, slot), and by (seed, class, slot, candidate) for the extra candidates, so that
    candidate 0 is the faithful image and no image depends on the batch or the process that made it."""
    label: int
    slot: int
    candidate: int
    path: Path

    def seed_keys(self, seed: int) -> tuple[int, ...]:
        return (seed, self.label, self.slot) + ((self.candidate,) if self.candidate else ())


class ClassPrototypes:
    """Prototype j // repeats of class c, reading one class at a time from the file (jobs come in class order)."""

    def __init__(self, protos: PrototypeFile, repeats: int):
        self.protos, self.repeats, self.label, self.tensor = protos, repeats, -1, None

    def __call__(self, label: int, index: int) -> torch.Tensor:
        if label != self.label:
            self.label, self.tensor = label, self.protos.of_class(label)
        return self.tensor[index // self.repeats]


def save_image(image: Image.Image, path: Path, size: int, resize_filter: str) -> None:
    with atomic_path(path) as tmp:
        image.resize((size, size), Image.Resampling[resize_filter.upper()]).save(tmp, format="PNG")


def synthesize(args: argparse.Namespace, pipe, protos: PrototypeFile, prompts: list[str], jobs: list[Job],
               device: torch.device, rank: int) -> None:
    """Make the images of `jobs`, --batch_size per pipeline call; PNGs are encoded and written by threads while
    the device makes the next batch."""
    embeds = EmbeddingCache(pipe, args.negative_prompt, args.guidance_scale > 1)
    prototype = ClassPrototypes(protos, args.ipc // protos.per_class)
    bar = Progress(total=len(jobs), desc="synthesis", rank=rank, unit="images")
    with batch_invariant(pipe, device), bar, ThreadPoolExecutor(max_workers=2) as writers:
        pending = []
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start : start + args.batch_size]
            latents = torch.stack([prototype(job.label, job.slot) for job in batch])
            positive, negative = embeds.batch([prompts[job.label] for job in batch])
            images = pipe(
                latents=latents, prompt_embeds=positive, negative_prompt_embeds=negative, strength=args.strength,
                guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps,
                generator=[seeded_generator(*job.seed_keys(args.seed)) for job in batch],
                mode_latents=latents, mode_scale=args.mode_guidance, mode_stop=args.mode_guidance_stop,
            ).images
            done = [f for f in pending if f.done()]
            for future in done:
                future.result()  # a failed write stops the run here
            pending = [f for f in pending if f not in done]
            pending += [writers.submit(save_image, image, job.path, args.image_size, args.resize_filter)
                        for image, job in zip(images, batch)]
            bar.update(len(batch))
        for future in pending:
            future.result()


def candidate_folder(root: Path) -> Path:
    """Where the candidates wait for the selection: a hidden folder beside the set."""
    return root.with_name(f".{root.name}.candidates")


def candidate_path(root: Path, image: Path, slot: int, candidate: int) -> Path:
    return candidate_folder(root) / image.parent.name / f"{slot}_{candidate}.png"


def keep_candidates(args: argparse.Namespace, names: list[str], root: Path, final: dict[tuple[int, int], Path],
                    classes: list[int], device: torch.device) -> None:
    """For each of `classes`: score its candidates with the teacher, copy the --ipc kept ones into place as the
    class's images, and say what was kept and why (also in selection.json)."""
    teacher, record = load_teacher(args.teacher_path, args.teacher_arch, len(names), None, device,
                                   f"the set has {len(names)}")
    log = root / "selection.json"
    rows = json.loads(log.read_text()) if log.is_file() else {}
    for c in classes:
        name = names[c]
        paths = [candidate_path(root, final[c, j], j, k) for j in range(args.ipc) for k in range(args.candidates)]
        scored = score_candidates(teacher, record, paths, c, device)
        kept = keep_confident(scored, args.candidates) if args.select == "confidence" else keep_diverse(scored, args.ipc)
        for j, i in enumerate(kept):
            with atomic_path(final[c, j]) as tmp:
                shutil.copyfile(paths[i], tmp)
        rows[str(c)] = row = {"class": name, **describe(scored, kept),
                              "kept_candidates": [[i // args.candidates, i % args.candidates] for i in kept]}
        print(f"class {c} ({name}): {row['made']} made, {row['right']} right, kept {row['kept']} ({row['kept_right']} "
              f"right), confidence {row['confidence']:.3f}, diversity {row['diversity']:.3f}", flush=True)
        with atomic_path(log) as tmp:
            tmp.write_text(json.dumps(rows, indent=1))
    shutil.rmtree(candidate_folder(root), ignore_errors=True)


def my_share(todo: list[Job], rank: int, world: int) -> list[Job]:
    """A contiguous, equal share of the images still to make: a resumed run keeps every process busy."""
    per, extra = divmod(len(todo), world)
    start = rank * per + min(rank, extra)
    return todo[start : start + per + (rank < extra)]


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
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    set_deterministic(args.deterministic)
    rank, world = init_distributed(device, args.dist_timeout)
    protos = PrototypeFile(args.prototype_path)
    prompts = label_prompts(args, protos)
    if args.ipc % protos.per_class:
        raise UsageError(f"--ipc {args.ipc} is not a multiple of the {protos.per_class} prototypes per class in "
                         f"{args.prototype_path}; use a multiple of {protos.per_class}")
    root = output_dir(args, protos)
    final = {(c, j): image_path(root, c, j, len(prompts), args.ipc) for c in range(len(prompts)) for j in range(args.ipc)}
    unfinished = [c for c in range(len(prompts)) if not all(final[c, j].exists() for j in range(args.ipc))]
    if args.candidates == 1:
        jobs = [Job(c, j, 0, path) for (c, j), path in final.items()]
    else:
        jobs = [Job(c, j, k, candidate_path(root, final[c, j], j, k)) for c in unfinished for j in range(args.ipc)
                for k in range(args.candidates)]
    dtype = str(pipeline_dtype(device, args.dtype)).removeprefix("torch.")
    names = protos.class_names or [str(c) for c in range(len(prompts))]
    check_writable(root, "--save_init_image_path")
    settings = synthesis_settings(args, prompts, dtype) if rank == 0 else None
    claim_folder_run(root, settings, "--save_init_image_path", False, rank, world)
    remaining = [job for job in jobs if not job.path.exists()]  # written atomically: an existing file is complete
    announce("synthesis", device, dtype, world, rank, f"batch {args.batch_size}" + (", compile" if args.compile else ""),
             f"{len(remaining)} of {len(jobs)} images to make")
    if rank == 0:
        print(describe_prompts(names, prompts), flush=True)
    todo = my_share(remaining, rank, world)
    pipe = load_synthesis_pipeline(args, device, rank) if todo else None
    with exclusive_run(root / ".lock", f"image folder {root}", rank, world):
        claim_folder_run(root, settings, "--save_init_image_path", True, rank, world)
        if todo:
            synthesize(args, pipe, protos, prompts, todo, device, rank)
        barrier()
        if rank == 0:
            if args.candidates > 1 and unfinished:
                keep_candidates(args, names, root, final, unfinished, device)
            write_class_list(root, names, prompts)
            print(f"{len(prompts)} classes x {args.ipc} images in {root}")


if __name__ == "__main__":
    main()
