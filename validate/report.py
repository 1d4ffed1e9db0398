"""Results of a whole D4M chain: a table (Markdown + JSON) and a picture of the distilled set.

The table holds, on the real test set: the D4M student, the same training on random real images
(the baseline), and the teacher trained on all the data (evaluated here). The picture has one row per
class: decoded prototypes | synthetic images | real images.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from d4m.data import DATASETS, ImageFolderDataset, load_rgb, val_dataset
from d4m.models import load_teacher_file
from d4m.prototypes import PrototypeFile
from d4m.runtime import UsageError, atomic_path, cli

CELL = 64  # pixels per image in the picture
GAP = 12


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", default="fashion_mnist", choices=DATASETS)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--teacher-path", required=True)
    p.add_argument("--d4m-dir", required=True, help="train_FKD output folder of the D4M student")
    p.add_argument("--real-dir", required=True, help="train_FKD output folder of the random-real student")
    p.add_argument("--syn-images", required=True, help="the synthetic ImageFolder")
    p.add_argument("--real-images", required=True, help="the random real ImageFolder")
    p.add_argument("--prototypes", required=True, help="prototype file of gen_prototype.py")
    p.add_argument("--diffusion_checkpoints_path", required=True, help="model whose VAE decodes the prototypes")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--output-json", required=True)
    p.add_argument("--figure", required=True)
    p.add_argument("--seconds", type=float, default=None, help="wall time of the chain, recorded in the JSON")
    return p.parse_args(argv)


def student_result(folder: str) -> dict:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise UsageError(f"{path} does not exist; run validate/train_FKD.py first")
    return json.loads(path.read_text())


@torch.no_grad()
def teacher_top1(args: argparse.Namespace) -> tuple[float, dict]:
    model, record = load_teacher_file(args.teacher_path)
    size = record["input_size"]
    transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(record["mean"], record["std"])])
    loader = DataLoader(val_dataset(args.dataset, args.data_dir, transform), batch_size=500)
    correct = seen = 0
    for images, labels in loader:
        correct += int((model(images).argmax(1) == labels).sum())
        seen += len(labels)
    return 100.0 * correct / seen, record


@torch.no_grad()
def decoded_prototypes(args: argparse.Namespace) -> tuple[list[str], torch.Tensor]:
    """Prompts and prototypes decoded by the model's VAE: [classes, per_class, 3, H, W] in [0, 1]."""
    from diffusers import AutoencoderKL

    protos = PrototypeFile(args.prototypes)
    vae = AutoencoderKL.from_pretrained(args.diffusion_checkpoints_path, subfolder="vae").eval()
    classes, per_class = protos.shape[:2]
    latents = protos.all().flatten(0, 1) / vae.config.scaling_factor
    images = (vae.decode(latents).sample.clamp(-1, 1) + 1) / 2
    return protos.prompts, images.view(classes, per_class, *images.shape[1:])


def tile(img: Image.Image) -> Image.Image:
    return img.convert("RGB").resize((CELL, CELL), Image.NEAREST)


def folder_images(root: str, ipc: int) -> list[list[Image.Image]]:
    data = ImageFolderDataset(root)
    rows: list[list[Image.Image]] = [[] for _ in data.classes]
    for path, label in data.samples:
        if len(rows[label]) < ipc:
            rows[label].append(tile(load_rgb(path)))
    return rows


def picture(prompts: list[str], protos: torch.Tensor, syn: list, real: list, ipc: int) -> Image.Image:
    label_w, header_h = 110, 22
    groups = [("decoded prototypes", protos.shape[1]), ("D4M synthetic images", ipc), ("random real images", ipc)]
    width = label_w + sum(n * CELL for _, n in groups) + GAP * (len(groups) - 1)
    canvas = Image.new("RGB", (width, header_h + CELL * len(prompts)), "white")
    draw = ImageDraw.Draw(canvas)
    x = label_w
    for title, n in groups:
        draw.text((x + 2, 5), title, fill="black")
        x += n * CELL + GAP
    for c, prompt in enumerate(prompts):
        y = header_h + c * CELL
        draw.text((4, y + CELL // 2 - 6), prompt[:18], fill="black")
        arrays = (protos[c].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        rows = [[tile(Image.fromarray(a)) for a in arrays], syn[c], real[c]]
        x = label_w
        for (_, n), row in zip(groups, rows):
            for j, img in enumerate(row[:n]):
                canvas.paste(img, (x + j * CELL, y))
            x += n * CELL + GAP
    return canvas


@cli
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    d4m, real = student_result(args.d4m_dir), student_result(args.real_dir)
    top1, record = teacher_top1(args)
    prompts, protos = decoded_prototypes(args)
    rows = [
        {"method": f"D4M student (IPC {args.ipc}, synthetic images)", "top1": d4m["top1"]},
        {"method": f"Same training on {args.ipc} random real images per class", "top1": real["top1"]},
        {"method": f"Teacher ({record['arch']}) trained on all {args.dataset} training images", "top1": top1},
    ]
    result = {"dataset": args.dataset, "ipc": args.ipc, "rows": rows, "student_model": d4m.get("model"),
              "epochs": d4m.get("epochs"), "seconds": args.seconds}
    with atomic_path(args.output_json) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    image = picture(prompts, protos, folder_images(args.syn_images, args.ipc), folder_images(args.real_images, args.ipc), args.ipc)
    with atomic_path(args.figure) as tmp:
        image.save(tmp, format="PNG")
    print(f"\n| {args.dataset}, real test set | top-1 % |\n|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['top1']:.2f} |")
    print(f"\ntable: {args.output_json}   picture: {args.figure}")


if __name__ == "__main__":
    main()
