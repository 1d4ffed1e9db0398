"""The report of an evaluation: one table (Markdown + JSON), accuracy against IPC, the architectures, the set.

Reads the folders of validate/evaluate.py (one per IPC) and writes:
  --output-json  every row (method, model, protocol, ipc, runs, top1_mean, top1_std), the scores against random
                 real, and the teacher's own top-1 on the real test set (evaluated here);
  --curve        top-1 against IPC with one standard deviation as error bars, one line per method and protocol
                 (the first architecture), the teacher as a dashed line;
  --models-figure  the architectures as a table image (when the evaluation trained more than one);
  --figure       one row per class: decoded prototypes | synthetic images | real images (with --prototypes);
  --set-figures  a folder with one such picture per set of the largest IPC (validate/compare.sh): its images beside
                 the decoded prototypes (for the sets made from them) and random real images.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from d4m.cli import ArgumentParser, DATASETS, UsageError, cli, non_negative_float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--evals", nargs="+", required=True, help="output folders of validate/evaluate.py")
    p.add_argument("--dataset", default="fashion_mnist", choices=DATASETS)
    p.add_argument("--data-dir", "--data_dir", required=True)
    p.add_argument("--teacher-path", default=None, help="teacher file of matching/train_teacher.py")
    p.add_argument("-a", "--arch", default=None, help="else a torchvision teacher with its ImageNet weights")
    p.add_argument("--output-json", required=True)
    p.add_argument("--curve", default=None, help="PNG of top-1 against IPC")
    p.add_argument("--models-figure", default=None, help="PNG of the architecture table")
    p.add_argument("--figure", default=None, help="PNG of the distilled set (needs the four options below)")
    p.add_argument("--syn-images", default=None, help="the synthetic ImageFolder")
    p.add_argument("--real-images", default=None, help="the random real ImageFolder")
    p.add_argument("--set-figures", default=None, help="folder of one picture per set (largest IPC)")
    p.add_argument("--prototypes", default=None, help="prototype file of gen_prototype.py")
    p.add_argument("--diffusion_checkpoints_path", default=None, help="model whose VAE decodes the prototypes")
    p.add_argument("--seconds", type=non_negative_float, default=None, help="wall time of the chain, recorded in the JSON")
    p.add_argument("--costs", default=None, help="lines 'IPC<TAB>set<TAB>seconds' of validate/compare.sh: the time "
                                                  "each set took to make (all its seeds), recorded in the JSON")
    args = p.parse_args(argv)
    if not (args.teacher_path or args.arch):
        raise UsageError("give the teacher: --teacher-path or -a")
    return args


if __name__ == "__main__":  # the flags are checked before torch loads (seconds): --help answers at once
    ARGS = cli(parse_args)()

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from d4m import labelcheck
from d4m.data import ImageFolderDataset, load_rgb, val_dataset
from d4m.figures import as_text, gap_text
from d4m.device import eval_batch, pick_device
from d4m.models import load_teacher, recorded_top1
from d4m.prototypes import PrototypeFile
from d4m.outputs import atomic_path, check_writable_file

CELL = 64  # pixels per image in the picture of the set
GAP = 12
LABELS = {"d4m": "D4M images", "random": "random real", "nearest": "real nearest to the prototypes", "mgd3": "MGD3",
          "d3hr": "D3HR", "cao2": "CaO2"}
COLOURS = {"d4m": "tab:blue", "random": "tab:orange", "nearest": "tab:green", "mgd3": "tab:purple", "d3hr": "tab:brown",
           "cao2": "tab:red"}
FROM_PROTOTYPES = ("d4m", "mgd3", "nearest")  # the sets made from (or picked by) stage 1's prototypes
SET_SCORES = ("precision", "recall", "density", "coverage", "kid")
MARKERS = {"fkd": "o", "online": "s", "hard": "^"}
PROTOCOL_LABELS = {"fkd": "stored soft labels", "online": "online soft labels", "hard": "hard labels"}


def read_evals(folders: list[str]) -> tuple[list[dict], list[dict], list[dict], dict]:
    """The evaluations' rows (a student's figures), scores against random real, sets' feature scores, and the
    folders of the largest IPC's sets."""
    rows, scores, in_features, sets, largest = [], [], [], {}, 0
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise UsageError(f"{path} does not exist; run validate/evaluate.py first")
        result = json.loads(path.read_text())
        ipc = result["rows"][0]["ipc"] if result["rows"] else None
        rows += result["rows"]
        scores += [{**score, "ipc": ipc} for score in result["scores"]]
        in_features += [{"method": name, "ipc": ipc, **{k: s[k] for k in SET_SCORES}}
                        for name, s in result.get("set_scores", {}).items()]
        if ipc and ipc >= largest:
            sets, largest = result.get("sets", {}), ipc
    return rows, scores, in_features, sets


@torch.no_grad()
def teacher_top1(args: argparse.Namespace) -> tuple[float, dict]:
    """The teacher's top-1 on the real validation split: as recorded when it was trained on this dataset, else
    measured."""
    model, record = load_teacher(args.teacher_path, args.arch, 0, None, pick_device(None), "")
    recorded = recorded_top1(record, args.dataset)
    if recorded is not None:
        return recorded, record
    transform = labelcheck.eval_transform(record["input_size"], record["mean"], record["std"])
    device = next(model.parameters()).device
    loader = DataLoader(val_dataset(args.dataset, args.data_dir, transform), batch_size=eval_batch(device))
    correct = seen = 0
    for images, labels in loader:
        correct += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
        seen += len(labels)
    return 100.0 * correct / seen, record


def label(method: str, protocol: str) -> str:
    return f"{LABELS.get(method, method)}, {PROTOCOL_LABELS.get(protocol, protocol)}"


def curve(rows: list[dict], teacher: float, teacher_arch: str, path: str) -> None:
    """Top-1 against IPC (log axis) for the first architecture, one line per method and protocol; for a single IPC,
    one bar per method and protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = rows[0]["model"]
    ipcs = sorted({r["ipc"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if len(ipcs) == 1:
        chosen = [r for r in rows if r["model"] == model]
        ax.barh(range(len(chosen)), [r["top1_mean"] for r in chosen], xerr=[r["top1_std"] for r in chosen],
                color=[COLOURS.get(r["method"], "grey") for r in chosen], capsize=3, alpha=0.85)
        for i, r in enumerate(chosen):
            ax.text(r["top1_mean"] + 0.5, i, as_text(r["top1_mean"], r["top1_std"], len(r["runs"])), va="center",
                    fontsize=8)
        ax.set_yticks(range(len(chosen)), [label(r["method"], r["protocol"]) for r in chosen], fontsize=8)
        ax.axvline(teacher, color="grey", linestyle="--", label=f"teacher ({teacher_arch}), all training images")
        ax.set_xlabel("top-1 % on the real test set")
        ax.set_title(f"{model} students at IPC {ipcs[0]}")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return
    for method, protocol in dict.fromkeys((r["method"], r["protocol"]) for r in rows if r["model"] == model):
        points = sorted((r["ipc"], r["top1_mean"], r["top1_std"]) for r in rows
                        if (r["method"], r["protocol"], r["model"]) == (method, protocol, model))
        x, y, err = zip(*points)
        ax.errorbar(x, y, yerr=err, fmt=MARKERS.get(protocol, "o") + ("-" if protocol != "hard" else ":"),
                    color=COLOURS.get(method), capsize=3, label=label(method, protocol))
    ax.axhline(teacher, color="grey", linestyle="--", label=f"teacher ({teacher_arch}), all training images")
    ax.set_xscale("log")
    ax.set_xticks(ipcs, [str(i) for i in ipcs])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # the IPCs alone, no 3x10^0 between them
    ax.set_xlabel("images per class (IPC)")
    ax.set_ylabel("top-1 % on the real test set")
    ax.set_title(f"{model} students, mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def models_figure(rows: list[dict], path: str) -> None:
    """The architecture table (largest IPC, soft-label protocols first) as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ipc = max(r["ipc"] for r in rows)
    chosen = [r for r in rows if r["ipc"] == ipc]
    columns = list(dict.fromkeys((r["method"], r["protocol"]) for r in chosen))
    models = list(dict.fromkeys(r["model"] for r in chosen))
    cell = {(r["model"], r["method"], r["protocol"]): as_text(r["top1_mean"], r["top1_std"], len(r["runs"]))
            for r in chosen}
    text = [[cell.get((m, method, protocol), "") for method, protocol in columns] for m in models]
    fig, ax = plt.subplots(figsize=(2 + 2.2 * len(columns), 0.6 + 0.4 * len(models)), dpi=120)
    ax.axis("off")
    table = ax.table(cellText=text, rowLabels=models, colLabels=[label(*c).replace(", ", "\n") for c in columns],
                     loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.8)
    ax.set_title(f"top-1 % at IPC {ipc}, mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)


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
    for path, label_ in data.samples:
        if len(rows[label_]) < ipc:
            rows[label_].append(tile(load_rgb(path)))
    return rows


def prototype_tiles(protos: torch.Tensor) -> list[list[Image.Image]]:
    """Decoded prototypes [classes, per_class, 3, H, W] in [0, 1] as one row of tiles per class."""
    return [[tile(Image.fromarray(a)) for a in (row.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)]
            for row in protos]


def picture(prompts: list[str], panels: list[tuple[str, list[list[Image.Image]]]], ipc: int) -> Image.Image:
    """One row per class, one panel per (title, tiles per class), at most `ipc` tiles each."""
    label_w, header_h = 110, 22
    widths = [min(ipc, max(len(row) for row in rows)) for _, rows in panels]
    width = label_w + sum(n * CELL for n in widths) + GAP * (len(panels) - 1)
    canvas = Image.new("RGB", (width, header_h + CELL * len(prompts)), "white")
    draw = ImageDraw.Draw(canvas)
    x = label_w
    for (title, _), n in zip(panels, widths):
        draw.text((x + 2, 5), title, fill="black")
        x += n * CELL + GAP
    for c, prompt in enumerate(prompts):
        y = header_h + c * CELL
        draw.text((4, y + CELL // 2 - 6), prompt[:18], fill="black")
        x = label_w
        for (_, rows), n in zip(panels, widths):
            for j, img in enumerate(rows[c][:n]):
                canvas.paste(img, (x + j * CELL, y))
            x += n * CELL + GAP
    return canvas


def set_figures(args: argparse.Namespace, sets: dict[str, list[str]], ipc: int, folder: Path) -> list[Path]:
    """folder/<set>.png for every set but random real: the set's images (its first folder) beside the decoded
    prototypes, for the sets made from them, and random real images."""
    prompts, protos = decoded_prototypes(args) if args.prototypes else (None, None)
    real = folder_images(sets["random"][0], ipc) if "random" in sets else None
    written = []
    for name, folders in sets.items():
        if name == "random":
            continue
        panels = [(f"{LABELS.get(name, name)} images", folder_images(folders[0], ipc))]
        if protos is not None and name in FROM_PROTOTYPES:
            panels.insert(0, ("decoded prototypes", prototype_tiles(protos)))
        if real is not None:
            panels.append(("random real images", real))
        names = prompts or ImageFolderDataset(folders[0]).classes
        path = folder / f"{name}.png"
        with atomic_path(path) as tmp:
            picture(names, panels, ipc).save(tmp, format="PNG")
        written.append(path)
    return written


def markdown(rows: list[dict], teacher: float, teacher_arch: str) -> str:
    lines = ["| IPC | method | model | protocol | top-1 % (mean ± std) | runs |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["ipc"], r["model"], r["protocol"] == "hard", r["method"])):
        runs = " / ".join(f"{v:.2f}" for v in r["runs"])
        lines.append(f"| {r['ipc']} | {LABELS.get(r['method'], r['method'])} | {r['model']} | "
                     f"{PROTOCOL_LABELS.get(r['protocol'], r['protocol'])} | "
                     f"{as_text(r['top1_mean'], r['top1_std'], len(r['runs']))} | {runs} |")
    lines.append(f"| all | teacher, all training images | {teacher_arch} | hard labels | {teacher:.2f} | |")
    return "\n".join(lines)


@cli
def main(args: argparse.Namespace) -> None:
    for flag in ("output_json", "curve", "models_figure", "figure"):
        if getattr(args, flag):
            check_writable_file(getattr(args, flag), "--" + flag.replace("_", "-"))
    rows, scores, in_features, sets = read_evals(args.evals)
    if not rows:
        raise UsageError("the evaluation folders hold no results")
    top1, record = teacher_top1(args)
    result = {"dataset": args.dataset, "rows": rows, "scores": scores, "set_scores": in_features,
              "teacher": {"arch": record["arch"], "top1": top1}, "seconds": args.seconds,
              "make_seconds": read_costs(args.costs) if args.costs else None}
    with atomic_path(args.output_json) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    if args.curve:
        curve(rows, top1, record["arch"], args.curve)
    if args.models_figure and len({r["model"] for r in rows}) > 1:
        models_figure(rows, args.models_figure)
    if args.figure and args.prototypes:
        ipc = max(r["ipc"] for r in rows)
        prompts, protos = decoded_prototypes(args)
        image = picture(prompts, [("decoded prototypes", prototype_tiles(protos)),
                                  ("D4M synthetic images", folder_images(args.syn_images, ipc)),
                                  ("random real images", folder_images(args.real_images, ipc))], ipc)
        with atomic_path(args.figure) as tmp:
            image.save(tmp, format="PNG")
    written = [p for p in (args.output_json, args.curve, args.figure) if p]
    if args.set_figures and sets:
        written += set_figures(args, sets, max(r["ipc"] for r in rows), Path(args.set_figures))
    print(markdown(rows, top1, record["arch"]))
    if scores:
        print("\n" + gaps_table(scores))
    if in_features:
        print("\n| IPC | set | precision | recall | density | coverage | KID |\n|---|---|---|---|---|---|---|")
        for s in sorted(in_features, key=lambda s: (s["ipc"], s["method"])):
            print(f"| {s['ipc']} | {LABELS.get(s['method'], s['method'])} | " +
                  " | ".join("—" if s[k] is None else f"{s[k]:.{4 if k == 'kid' else 3}f}" for k in SET_SCORES) + " |")
    print("\nwritten: " + ", ".join(str(p) for p in written))


def read_costs(path: str) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        ipc, name, seconds = line.split("\t")
        rows.append({"ipc": int(ipc), "method": name, "seconds": int(seconds)})
    return rows


def gaps_table(scores: list[dict]) -> str:
    """Each set's gap to random real per protocol with its 95 % interval over seeds, HLR and LRS, per IPC."""
    protocols = [k for k in ("ior_fkd", "ior_online", "ior_hard") if any(k in s for s in scores)]
    lines = ["| IPC | set | model | " + " | ".join(f"gap to random real, {PROTOCOL_LABELS[k[4:]]} [95 % interval]"
                                                for k in protocols) + " | HLR | LRS |",
             "|---|---|---|" + "---|" * (len(protocols) + 2)]
    for s in sorted(scores, key=lambda s: (s["ipc"], s["method"])):
        if not any(k in s for k in protocols):
            continue
        cells = [gap_text(s, k) for k in protocols]
        cells += [f"{s['hlr']:.2f}" if "hlr" in s else "—", f"{s['lrs']:.3f}" if "lrs" in s else "—"]
        lines.append(f"| {s['ipc']} | {LABELS.get(s['method'], s['method'])} | {s.get('model', '')} | " +
                     " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(ARGS)
