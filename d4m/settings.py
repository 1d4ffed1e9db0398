"""What each stage records of the settings that made its output, each a whitelist: a flag that is not named here is
how a run is carried out (device, workers, precision, batch split, where it writes), never a setting that a resumed
run must repeat.

  stage 1  the prototype file's metadata                      prototype_settings
  stage 2  the image folder's manifest.json (and successors)  synthesis_settings, mgd3_settings, d3hr_settings,
                                                              cao2_settings
  stage 3  the soft-label store's meta.json                   store_meta
  stage 4  each student checkpoint's settings                 student_settings
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from d4m import store
from d4m.outputs import file_digest, text_digest

def model_setting(path: str) -> str:
    """How a setting names a diffusion model: the resolved folder, or the hub id."""
    return str(Path(path).resolve()) if os.path.isdir(path) else path


# ----------------------------------------------------------------------------- stage 1


def prototype_settings(args: argparse.Namespace, name: str, class_names: list[str]) -> dict[str, str]:
    """The prototype file's metadata (safetensors metadata holds strings): what the prototypes were made from and
    with (the images' size, the seed of shuffles and posterior samples, the k-means), and the name and class names
    the later stages take from it."""
    return dict(dataset=args.dataset, name=name, ipc=str(args.ipc), km_expand=str(args.km_expand),
                size=str(args.size), seed=str(args.seed), class_names=json.dumps(class_names), kmeans=args.kmeans)


# ----------------------------------------------------------------------------- stage 2 and its successors


def synthesis_settings(args: argparse.Namespace, prompts: list[str], dtype: str) -> dict:
    """Stage 2's manifest: what decides the images, so a resume must use the same (batch size, device and worker
    count do not change the images; --compile changes their last bits only)."""
    return {"method": "d4m", "prototype_file": file_digest(args.prototype_path), "prompts": text_digest("\n".join(prompts)),
            "model": model_setting(args.diffusion_checkpoints_path), "dtype": dtype, "seed": args.seed, "ipc": args.ipc,
            "strength": args.strength, "guidance_scale": args.guidance_scale,
            "num_inference_steps": args.num_inference_steps, "negative_prompt": args.negative_prompt,
            "image_size": args.image_size, "resize_filter": args.resize_filter, "safety_checker": args.safety_checker}


def mgd3_settings(args: argparse.Namespace, prompts: list[str], dtype: str) -> dict:
    """What decides the images (the set's manifest; a resume must match)."""
    return {"method": "mgd3", "model": model_setting(args.diffusion_checkpoints_path), "dtype": dtype,
            "prototype_file": file_digest(args.prototype_path), "prompts": text_digest("\n".join(prompts)),
            "seed": args.seed, "ipc": args.ipc, "scheduler": args.scheduler, "num_inference_steps": args.num_inference_steps,
            "guidance_scale": args.guidance_scale, "mode_guidance_scale": args.mode_guidance_scale,
            "mode_guidance_stop": args.mode_guidance_stop, "size": args.size, "image_size": args.image_size,
            "resize_filter": args.resize_filter}


def d3hr_settings(args: argparse.Namespace, prompts: list[str], dtype: str) -> dict:
    """What decides the images (the set's manifest; a resume must match)."""
    return {"method": "d3hr", "model": model_setting(args.diffusion_checkpoints_path), "dtype": dtype,
            "data": str(Path(args.data_dir).resolve()), "prompts": text_digest("\n".join(prompts)), "seed": args.seed,
            "ipc": args.ipc, "num_inference_steps": args.num_inference_steps, "inversion_steps": args.inversion_steps,
            "inversion_images": args.inversion_images, "guidance_scale": args.guidance_scale, "groups": args.groups,
            "size": args.size, "image_size": args.image_size, "resize_filter": args.resize_filter}


def cao2_settings(args: argparse.Namespace, prompts: list[str], dtype: str) -> dict:
    """What decides the images (the set's manifest; a resume must match)."""
    return {"method": "cao2", "model": model_setting(args.diffusion_checkpoints_path), "dtype": dtype,
            "prompts": text_digest("\n".join(prompts)), "seed": args.seed, "ipc": args.ipc,
            "teacher": file_digest(args.teacher_path) if args.teacher_path else args.teacher_arch,
            "candidates": args.candidates, "num_inference_steps": args.num_inference_steps,
            "guidance_scale": args.guidance_scale, "optimization_steps": args.optimization_steps,
            "optimization_lr": args.optimization_lr, "linf_weight": args.linf_weight,
            "optimization_levels": args.optimization_levels, "size": args.size, "image_size": args.image_size,
            "resize_filter": args.resize_filter}


# ----------------------------------------------------------------------------- stage 3


def store_meta(args: argparse.Namespace, num_images: int, data_classes: int, images: str, record: dict,
               precision: str) -> dict:
    """The store's meta.json: every setting of the matching run, the images' count, classes and fingerprint, the
    teacher (its record of matching/train_teacher.py or torchvision's)."""
    topk = args.soft_label_topk if args.soft_label_topk and args.soft_label_topk < record["num_classes"] else None
    return {
        "format": store.FORMAT, "batch_size": args.batch_size, "epochs": args.epochs, "num_images": num_images,
        "data_classes": data_classes, "images": images,
        "fkd_seed": args.fkd_seed, "mix_type": args.mix_type, "mixup": args.mixup, "cutmix": args.cutmix,
        "input_size": args.input_size, "num_classes": record["num_classes"],
        "teacher": {"arch": record["arch"], "source": record["source"]},
        "mean": list(record["mean"]), "std": list(record["std"]),
        "min_scale": args.min_scale_crops, "max_scale": args.max_scale_crops, "flip": not args.no_flip,
        "dtype": "float16" if args.use_fp16 else "float32", "topk": topk, "int8": args.soft_label_int8,
        "teacher_precision": precision,
    }


# ----------------------------------------------------------------------------- stage 4


STUDENT = ("batch_size", "epochs", "train_dir", "val_dir", "dataset", "data_dir", "lr_schedule", "sgd",
           "learning_rate", "momentum", "weight_decay", "adamw_lr", "adamw_weight_decay", "model", "keep_topk",
           "temperature", "protocol", "fkd_path", "teacher_path", "teacher_arch", "mixup", "cutmix",
           "min_scale_crops", "no_flip", "max_scale_crops", "mix_type", "fkd_seed", "input_size", "seed")
PATHS = ("train_dir", "val_dir", "data_dir", "fkd_path", "teacher_path")


def student_settings(args: argparse.Namespace, seed: int, plan_seed: int, mix_type: str, num_classes: int) -> dict:
    """What a student is trained with: recorded in its checkpoints, and what a resumed run must repeat. Paths are
    recorded resolved; the seed, plan seed and mix are the student's own."""
    settings = {key: getattr(args, key) for key in STUDENT}
    settings.update({key: str(Path(settings[key]).resolve()) for key in PATHS if settings[key]})
    settings.update(seed=seed, fkd_seed=plan_seed, mix_type=mix_type, num_classes=num_classes)
    return settings
