"""Evaluate a distilled set beside its baselines: several students, protocols and seeds, one table.

Every set named with --set (D4M's images and the baselines of distillation/sample_real.py, say) is trained on
with every --models architecture under every --protocols protocol, --seeds times, with the same recipe:
  fkd     the soft labels of one store per set, made here once by matching/generate_soft_label.py (the teacher's
          label check included) and reused by every architecture;
  online  the teacher labels every batch on the fly (no store), with RDED's recipe by default (--online-recipe);
  hard    cross-entropy on the class labels, no teacher.
Each run is validate/train_FKD.py; the figures are the final-epoch top-1 on the real validation split. Results go
to OUTPUT/results.json (and .md): one row per set, architecture and protocol with every seed's top-1, their mean
and standard deviation; each set's gap to the set named `random` with its 95 % interval over seeds, hard-label
recovery and DD-Ranking's label-robust score; and its scores in the teacher's features (docs/evaluation.md).

    python validate/evaluate.py --dataset fashion_mnist --data-dir data/fashion_mnist \\
        --set d4m=outputs/syn/fashion_mnist_ipc10_10_s0.7_g8.0_kmexpand1 --set random=outputs/syn/real_fashion_mnist_ipc10 \\
        --teacher-path models/fashion_mnist/teacher_convnet.pt --models convnet --protocols fkd,hard --seeds 3 \\
        --epochs 150 --batch-size 50 --input-size 32 -j 0 --output outputs/eval/fashion_mnist_ipc10
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import runpy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from d4m.cli import (ArgumentParser, DATASETS, MIX_TYPES, PROTOCOLS, UsageError, cli, non_negative_float,
                     non_negative_int, positive_float, positive_int)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", required=True, metavar="NAME=FOLDER[,FOLDER...]",
                   help="an image set (ImageFolder) to evaluate, e.g. d4m=..., random=..., nearest=...; several "
                        "folders (one per seed: random draws with other sampling seeds) train one student each")
    p.add_argument("--dataset", default="imagefolder", choices=DATASETS)
    p.add_argument("--data-dir", "--data_dir", default=None, help="the dataset's folder (its validation split)")
    p.add_argument("--val-dir", "--val_dir", default=None, help="a real validation ImageFolder (with --dataset imagefolder)")
    p.add_argument("--teacher-path", default=None, help="teacher file of matching/train_teacher.py")
    p.add_argument("-a", "--arch", default=None, help="else a torchvision teacher with its ImageNet weights")
    p.add_argument("--models", default="resnet18", help="comma-separated student architectures")
    p.add_argument("--protocols", default="fkd", help=f"comma-separated, of {', '.join(PROTOCOLS)}")
    p.add_argument("--seeds", type=positive_int, default=1, help="students per set, architecture and protocol")
    p.add_argument("--epochs", type=positive_int, default=300)
    p.add_argument("--eval-interval", type=positive_int, default=None,
                   help="validate the students every N epochs too (default: once, at the last epoch, whose top-1 is "
                        "the figure reported; validating more often changes no weight)")
    p.add_argument("-b", "--batch-size", type=positive_int, default=1024)
    p.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    p.add_argument("--input-size", type=positive_int, default=224)
    p.add_argument("-T", "--temperature", type=positive_float, default=20.0)
    p.add_argument("--adamw-lr", type=positive_float, default=0.001)
    p.add_argument("--adamw-weight-decay", type=non_negative_float, default=0.01)
    p.add_argument("--mix-type", default="cutmix", choices=MIX_TYPES)
    p.add_argument("--use-fp16", action="store_true", help="fp16 soft labels in the stores (matching)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips, in every protocol")
    p.add_argument("--online-recipe", default="rded", choices=("rded", "same"),
                   help="rded: the online runs take RDED's batch size, learning rate per architecture, temperature "
                        "and half-cosine schedule; same: the recipe of the other protocols")
    p.add_argument("--real-hard-top1", type=non_negative_float, default=None,
                   help="top-1 of the architecture trained on the whole real training set with hard labels, for the "
                        "hard-label recovery score (default: the teacher file's, for the teacher's architecture)")
    p.add_argument("--no-label-check", action="store_true", help="passed to matching")
    p.add_argument("--score-per-class", type=non_negative_int, default=1000,
                   help="real training images per class (a seeded sample of --data-dir's) the sets' precision, recall, "
                        "density, coverage and KID are measured against, in the teacher's feature space; 0: no scores")
    p.add_argument("-j", "--workers", type=non_negative_int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--nproc", type=positive_int, default=1, help="run each stage under torchrun with this many processes")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    args.sets = dict(parse_set(text) for text in args.set)
    args.models = [m for m in args.models.split(",") if m]
    args.protocols = [p for p in args.protocols.split(",") if p]
    unknown = [p for p in args.protocols if p not in PROTOCOLS]
    if unknown:
        raise UsageError(f"unknown protocol {unknown[0]!r}; choose from {', '.join(PROTOCOLS)}")
    if ("fkd" in args.protocols or "online" in args.protocols) and not (args.teacher_path or args.arch):
        raise UsageError("protocols fkd and online need a teacher: --teacher-path or -a")
    for name, folders in args.sets.items():
        if len(folders) not in (1, args.seeds):
            raise UsageError(f"--set {name} names {len(folders)} folders; give one, or one per seed ({args.seeds})")
    return args


def parse_set(text: str) -> tuple[str, list[Path]]:
    name, sep, folders = text.partition("=")
    if not sep or not name or not folders:
        raise UsageError(f"--set {text!r}: write NAME=FOLDER")
    for folder in folders.split(","):
        if not Path(folder).is_dir():
            raise UsageError(f"--set {name}: {folder} is not a folder")
    return name, [Path(folder) for folder in folders.split(",")]


if __name__ == "__main__":  # the flags are checked before torch loads (seconds): --help answers at once
    ARGS = cli(parse_args)()

import torch
from torch.utils.data import Subset

from d4m.data import ImageFolderDataset, train_dataset
from d4m.device import pick_device
from d4m.figures import as_text, gap_interval, gap_text, label_robust_score, mean_std
from d4m.labelcheck import eval_transform
from d4m.models import load_teacher, load_teacher_file, recorded_top1
from d4m.outputs import atomic_path, check_writable, exclusive
from d4m.scores import dataset_features, set_scores

REPO = Path(__file__).resolve().parent.parent
MATCH = REPO / "matching" / "generate_soft_label.py"
TRAIN = REPO / "validate" / "train_FKD.py"

# RDED's learning rates for AdamW, per student (its other students take 1e-3)
RDED_LR = {"mobilenet_v2": 0.0025, "efficientnet_b0": 0.002, "vgg11": 0.0005, "alexnet": 0.0001,
           "vit_b_16": 0.0001, "swin_v2_t": 0.0001}


def run(script: Path, argv: list, log: Path, nproc: int) -> None:
    """Run a stage script (in this process, or under torchrun), its output in `log`; one line on failure."""
    argv = [str(a) for a in argv]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        if nproc > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(script)]
            status = subprocess.run(command + argv, stdout=out, stderr=subprocess.STDOUT).returncode
        else:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                try:
                    stage = runpy.run_path(str(script), run_name="stage")
                    stage["main"](cli(stage["parse_args"])(argv))
                    status = 0
                except SystemExit as stop:
                    status = stop.code if isinstance(stop.code, int) else 1
    if status:
        lines = [line for line in log.read_text().splitlines() if line.startswith("error:")]
        reason = lines[-1] if lines else f"exit status {status}"
        raise UsageError(f"{script.name} {' '.join(argv[:2])} failed ({reason}); its output is in {log}")


def teacher_flags(args: argparse.Namespace) -> list:
    return ["--teacher-path", args.teacher_path] if args.teacher_path else (["-a", args.arch] if args.arch else [])


def validation_flags(args: argparse.Namespace) -> list:
    flags = ["--dataset", args.dataset]
    flags += ["--data-dir", args.data_dir] if args.data_dir else []
    return flags + (["--val-dir", args.val_dir] if args.val_dir else [])


def match(args: argparse.Namespace, name: str, folder: Path) -> Path:
    """The folder's soft-label store (made once; a rerun resumes or reuses it)."""
    store = Path(args.output) / "fkd" / name
    argv = ["--data", folder, "--fkd-path", store, *teacher_flags(args), "-b", args.batch_size, "--epochs",
            args.epochs, "--input-size", args.input_size, "--mix-type", args.mix_type, "-j", args.workers,
            *validation_flags(args), *(["--use-fp16"] if args.use_fp16 else []), *flip_flags(args),
            *(["--no-label-check"] if args.no_label_check else []), *device_flags(args)]
    run(MATCH, argv, Path(args.output) / "logs" / f"match_{name}.log", args.nproc)
    return store


def flip_flags(args: argparse.Namespace) -> list:
    return ["--no-flip"] if args.no_flip else []


def device_flags(args: argparse.Namespace) -> list:
    return ["--device", args.device] if args.device else []


def rded_recipe(model: str, ipc: int, classes: int, mix_type: str) -> dict:
    """RDED's validation settings: batch by IPC and class count, AdamW rate by student, T by mix, half-cosine."""
    batch = {1: 10, 10: 50, 50: 100}.get(ipc, 100 if ipc > 10 else 50)
    if classes >= 100:
        batch *= 2
    return {"--batch-size": min(batch, ipc * classes), "--adamw-lr": RDED_LR.get(model, 0.001),
            "-T": 4.0 if mix_type == "mixup" else 20.0, "--lr-schedule": "half-cosine"}


@dataclass
class Part:
    """A set's folder with the seeds trained on it: every seed on one folder, or seed k alone on random draw k."""
    name: str
    folder: Path
    seeds: int
    first_seed: int
    store: Path | None = None  # its soft labels (protocol fkd)


def train(args: argparse.Namespace, part: Part, model: str, protocol: str, ipc: int, classes: int) -> list[float]:
    """The final top-1 of each student trained on the part's folder."""
    name, store = part.name, part.store
    out = Path(args.output) / name / model / protocol
    recipe = {"--batch-size": args.batch_size, "--adamw-lr": args.adamw_lr, "-T": args.temperature,
              "--lr-schedule": "cosine"}
    if protocol == "online" and args.online_recipe == "rded":
        recipe.update(rded_recipe(model, ipc, classes, args.mix_type))
    argv = ["--train-dir", part.folder, "--output-dir", out, "--model", model, "--protocol", protocol,
            "--epochs", args.epochs, "--eval-interval", args.eval_interval or args.epochs,
            "--input-size", args.input_size, "--adamw-weight-decay", args.adamw_weight_decay,
            "--gradient-accumulation-steps", args.gradient_accumulation_steps, "--mix-type", args.mix_type,
            "--seeds", part.seeds, "--seed", part.first_seed, "-j", args.workers, *flip_flags(args),
            *[v for pair in recipe.items() for v in pair],
            *validation_flags(args), *device_flags(args)]
    if protocol == "fkd":
        argv += ["--fkd-path", store]
    elif protocol == "online":
        argv += ["--teacher-path", args.teacher_path] if args.teacher_path else ["--teacher-arch", args.arch]
    elif args.teacher_path:
        argv += ["--teacher-path", args.teacher_path]  # the hard runs normalise as the soft ones do
    if any(out.glob("**/checkpoint.pth.tar")):
        argv.append("--resume")  # a finished run is read back, an interrupted one continues
    run(TRAIN, argv, Path(args.output) / "logs" / f"train_{name}_{model}_{protocol}.log", args.nproc)
    return [r["top1"] for r in json.loads((out / "results.json").read_text())["runs"]]


def row(name: str, model: str, protocol: str, ipc: int, runs: list[float]) -> dict:
    mean, std = mean_std(runs)
    return {"method": name, "model": model, "protocol": protocol, "ipc": ipc, "runs": runs, "top1_mean": mean,
            "top1_std": std}


def real_hard_top1(args: argparse.Namespace, model: str) -> float | None:
    if args.real_hard_top1 is not None:
        return args.real_hard_top1
    if args.teacher_path:
        _, record = load_teacher_file(args.teacher_path)
        if record["arch"] == model:
            return recorded_top1(record, args.dataset)
    return None


def scores(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """Per set and architecture: the gap to random real under each protocol with its 95 % interval over seeds (not
    for `random` itself), the hard-label recovery (HLR: real-data hard top-1 minus the set's), DD-Ranking's
    label-robust score from the soft-label gap and HLR, and the share of its soft-label top-1 kept with hard labels."""
    runs = {(r["method"], r["model"], r["protocol"]): r["runs"] for r in rows}
    out = []
    for name in args.sets:
        for model in args.models:
            row = {"method": name, "model": model}
            for protocol in args.protocols:
                if name != "random" and (name, model, protocol) in runs and ("random", model, protocol) in runs:
                    gap, low, high = gap_interval(runs[(name, model, protocol)], runs[("random", model, protocol)])
                    row[f"ior_{protocol}"] = gap
                    row[f"ior_{protocol}_ci"] = [low, high] if math.isfinite(low) else None  # None: one seed
            hard, soft = runs.get((name, model, "hard")), runs.get((name, model, "fkd"), runs.get((name, model, "online")))
            real = real_hard_top1(args, model)
            if hard is not None and real is not None:
                row["hlr"] = real - mean_std(hard)[0]
                soft_gap = row.get("ior_fkd", row.get("ior_online"))
                if soft_gap is not None:
                    row["lrs"] = label_robust_score(soft_gap, row["hlr"])
            if hard is not None and soft and mean_std(soft)[0] > 0:
                row["kept"] = 100 * mean_std(hard)[0] / mean_std(soft)[0]
            out.append(row)
    return out


def measure_sets(args: argparse.Namespace) -> dict[str, dict]:
    """Each set's precision, recall, density, coverage and KID against a seeded sample of the real training images,
    in the teacher's penultimate features (a set of several folders, one per seed: the mean over its folders)."""
    device = pick_device(args.device)
    teacher, record = load_teacher(args.teacher_path, args.arch, 0, None, device, "")
    transform = eval_transform(record["input_size"], record["mean"], record["std"])
    real = train_dataset(args.dataset, args.data_dir, transform)
    targets = torch.as_tensor(real.targets)
    gen, picks = torch.Generator().manual_seed(0), []
    for c in range(int(targets.max()) + 1):
        members = (targets == c).nonzero().flatten()
        picks += members[torch.randperm(len(members), generator=gen)][:args.score_per_class].tolist()
    real_feats, _ = dataset_features(teacher, Subset(real, picks), device, args.workers)
    out = {}
    for name, folders in args.sets.items():
        runs = [set_scores(real_feats, dataset_features(teacher, ImageFolderDataset(f, transform), device,
                                                        args.workers)[0]) for f in folders]
        out[name] = {key: None if any(r[key] is None for r in runs) else sum(r[key] for r in runs) / len(runs)
                     for key in runs[0]}
        print(f"{name}: " + ", ".join(f"{key} {out[name][key]:.4f}" for key in ("coverage", "density", "kid")
                                      if out[name][key] is not None), flush=True)
    return out


def markdown(rows: list[dict], score_rows: list[dict], in_features: dict[str, dict]) -> str:
    lines = ["| method | model | protocol | IPC | top-1 % (mean ± std) | runs |", "|---|---|---|---|---|---|"]
    for r in rows:
        runs = " / ".join(f"{v:.2f}" for v in r["runs"])
        lines.append(f"| {r['method']} | {r['model']} | {r['protocol']} | {r['ipc']} | "
                     f"{as_text(r['top1_mean'], r['top1_std'], len(r['runs']))} | {runs} |")
    if score_rows:
        keys = [k for k in ("ior_fkd", "ior_online", "ior_hard", "hlr", "lrs", "kept") if any(k in s for s in score_rows)]
        lines += ["", "| method | model | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for s in score_rows:
            cells = [gap_text(s, k) if k.startswith("ior") else f"{s[k]:.{3 if k == 'lrs' else 2}f}" if k in s else "—"
                     for k in keys]
            lines.append(f"| {s['method']} | {s['model']} | " + " | ".join(cells) + " |")
    if in_features:
        lines += ["", "| method | precision | recall | density | coverage | KID |", "|---|---|---|---|---|---|"]
        lines += [f"| {name} | " + " | ".join("—" if s[k] is None else f"{s[k]:.{4 if k == 'kid' else 3}f}"
                                          for k in ("precision", "recall", "density", "coverage", "kid")) + " |"
                  for name, s in in_features.items()]
    return "\n".join(lines) + "\n"


def evaluate_all(args: argparse.Namespace) -> None:
    rows = []
    for name, folders in args.sets.items():
        data = ImageFolderDataset(folders[0])
        classes, ipc = len(data.classes), len(data.samples) // len(data.classes)
        # one folder: every seed trains on it; one per seed: seed k trains on folder k (its own store)
        parts = [Part(name, folders[0], args.seeds, 0)] if len(folders) == 1 else \
                [Part(f"{name}{k}", folder, 1, k) for k, folder in enumerate(folders)]
        for part in parts:
            part.store = match(args, part.name, part.folder) if "fkd" in args.protocols else None
        for model in args.models:
            for protocol in args.protocols:
                runs = [top1 for part in parts for top1 in train(args, part, model, protocol, ipc, classes)]
                rows.append(row(name, model, protocol, ipc, runs))
                print(f"{name} {model} {protocol}: top-1 "
                      f"{as_text(rows[-1]['top1_mean'], rows[-1]['top1_std'], len(runs))}", flush=True)
    score_rows = scores(args, rows)
    in_features = measure_sets(args) if args.score_per_class and args.data_dir and (args.teacher_path or args.arch) else {}
    out = Path(args.output)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps({"dataset": args.dataset, "rows": rows, "scores": score_rows,
                                   "set_scores": in_features,
                                   "sets": {name: [str(f) for f in folders] for name, folders in args.sets.items()}},
                                  indent=1))
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(markdown(rows, score_rows, in_features))
    print(f"table: {out / 'results.md'}")


@cli
def main(args: argparse.Namespace) -> None:
    check_writable(args.output, "--output")
    with exclusive(Path(args.output) / ".lock", f"evaluation folder {args.output}"):
        evaluate_all(args)


if __name__ == "__main__":
    main(ARGS)
