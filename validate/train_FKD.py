"""Train a student from scratch on the synthetic set, replaying the stored FKD augmentations and soft labels.

Data parallel under torchrun: the global batch is --batch-size; the batch is cut into max(A, world)
contiguous pieces (A = --gradient-accumulation-steps), each process forwards its own pieces (one pass
per piece), loads only those rows and their mix partners, and the gradients are summed over processes
with one all-reduce per optimiser step. Each piece's loss is its KL sum divided by the global batch
length, so the summed gradient equals the one-process gradient of KLDiv(batchmean) over the batch.
A must be a multiple of the world size or the world size a multiple of A; when A >= world every
forward pass sees exactly the rows of one one-process accumulation chunk, so BatchNorm statistics match too.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader
from tqdm import tqdm

from d4m import fkd
from d4m.data import DATASETS, ImageFolderDataset, val_dataset
from d4m.models import build_model
from d4m.runtime import UsageError, atomic_path, barrier, cli, init_distributed, pick_device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a student on FKD soft labels and validate on the real set.")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--start-epoch", type=int, default=0)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("-j", "--workers", type=int, default=4)
    p.add_argument("--train-dir", required=True, help="the synthetic ImageFolder used for matching")
    p.add_argument("--val-dir", default=None, help="real validation ImageFolder (with --dataset imagefolder)")
    p.add_argument("--dataset", default="imagefolder", choices=list(DATASETS))
    p.add_argument("--data-dir", default=None, help="the dataset's folder for its validation split")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--cos", action="store_true", help="cosine schedule (else linear)")
    p.add_argument("--sgd", action="store_true", help="SGD (else AdamW)")
    p.add_argument("-lr", "--learning-rate", type=float, default=1.024)
    p.add_argument("--momentum", type=float, default=0.875)
    p.add_argument("--weight-decay", type=float, default=3e-5)
    p.add_argument("--adamw-lr", type=float, default=0.001)
    p.add_argument("--adamw-weight-decay", type=float, default=0.01)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--keep-topk", type=int, default=1000)
    p.add_argument("-T", "--temperature", type=float, default=3.0)
    p.add_argument("--fkd-path", required=True)
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases")
    p.add_argument("--wandb-project", default="d4m")
    p.add_argument("--wandb-api-key", default=None)
    p.add_argument("--mix-type", default=None, choices=list(fkd.MIX_TYPES), help="default: the store's")
    p.add_argument("--fkd_seed", type=int, default=None, help="default: the store's (42 in the launchers)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--resume", nargs="?", const="", default=None,
                   help="continue from a checkpoint (default: OUTPUT_DIR/checkpoint.pth.tar)")
    p.add_argument("--seed", type=int, default=0, help="seed of the student's initialisation")
    p.add_argument("--device", default=None)
    p.add_argument("--loader", default="tensor", choices=list(fkd.LOADERS))
    args = p.parse_args(argv)
    if min(args.batch_size, args.epochs, args.gradient_accumulation_steps, args.eval_interval, args.keep_topk) < 1:
        raise UsageError("--batch-size, --epochs, --gradient-accumulation-steps, --eval-interval and --keep-topk must be positive")
    if args.temperature <= 0 or args.workers < 0 or args.start_epoch < 0:
        raise UsageError("--temperature must be positive and --workers, --start-epoch non-negative")
    return args


def check_store(args: argparse.Namespace, meta: dict, data: ImageFolderDataset) -> None:
    """Everything that must agree between this run and the matching run, with the fix in the message."""
    checks = [
        (args.batch_size == meta["batch_size"], f"--batch-size {args.batch_size} differs from the store's {meta['batch_size']}"),
        (args.epochs <= meta["epochs"], f"--epochs {args.epochs} exceeds the {meta['epochs']} epochs stored"),
        (args.input_size == meta["input_size"], f"--input-size {args.input_size} differs from the store's {meta['input_size']}"),
        (len(data.samples) == meta["num_images"], f"{args.train_dir} has {len(data.samples)} images, the store {meta['num_images']}"),
        (len(data.classes) == meta["data_classes"], f"{args.train_dir} has {len(data.classes)} classes, the store {meta['data_classes']}"),
        (args.mix_type in (None, meta["mix_type"]), f"--mix-type {args.mix_type} differs from the store's {meta['mix_type']}"),
        (args.fkd_seed in (None, meta["fkd_seed"]), f"--fkd_seed {args.fkd_seed} differs from the store's {meta['fkd_seed']}"),
        (fkd.image_fingerprint(args.train_dir, data.samples) == meta["images"],
         f"the images in {args.train_dir} are not the ones the store was made from"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(f"{message}; use the settings and images of the matching run (see {args.fkd_path}/meta.json)")


def build_val(args: argparse.Namespace, meta: dict) -> DataLoader:
    size = args.input_size
    resize = int(size * 256 / 224) if size >= 224 else size
    transform = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), T.Normalize(meta["mean"], meta["std"])])
    if args.dataset == "imagefolder":
        if not args.val_dir:
            raise UsageError("--val-dir is required with --dataset imagefolder; pass the real validation ImageFolder")
        data = ImageFolderDataset(args.val_dir, transform)
    else:
        data = val_dataset(args.dataset, args.data_dir, transform)
    if len(data.classes) > meta["num_classes"]:
        raise UsageError(f"the validation set has {len(data.classes)} classes but the soft labels {meta['num_classes']}")
    return DataLoader(data, batch_size=256, shuffle=False, num_workers=args.workers)


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]
    others = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.ndim > 1)]
    if args.sgd:
        groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": others, "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=args.learning_rate, momentum=args.momentum)
    groups = [{"params": decay, "weight_decay": args.adamw_weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.adamw_lr)


def lr_factor(cos: bool, epochs: int):
    if cos:
        return lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs))
    return lambda e: 1 - e / epochs


def pieces(length: int, accumulation: int, rank: int, world: int) -> list[tuple[int, int]]:
    """This process's forward passes over a batch of `length` rows: (start, end) in batch-local rows."""
    count = max(accumulation, world)
    edges = [p * (length // count) + min(p, length % count) for p in range(count + 1)]
    per_rank = count // world
    return [(edges[p], edges[p + 1]) for p in range(rank * per_rank, (rank + 1) * per_rank)]


def kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1), reduction="sum")


def all_reduce_grads(model: nn.Module, loss: torch.Tensor, world: int) -> float:
    """Sum gradients and the loss over processes; returns the summed loss."""
    params = list(model.parameters())
    if world == 1:
        return float(loss)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params] + [loss.reshape(1)])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    return float(flat[-1])


def train_epoch(args, model, optimizer, source, meta: dict, epoch: int, rank: int, world: int,
                device: torch.device) -> float:
    plan, soft = fkd.read_epoch(args.fkd_path, epoch, meta)
    soft = fkd.keep_topk(soft.to(device), args.keep_topk)
    jobs, my_pieces = [], []
    for b in range(plan.num_batches):
        start, end = plan.bounds(b)
        mine = pieces(end - start, args.gradient_accumulation_steps, rank, world)
        jobs.append(fkd.make_job(plan, b, torch.arange(mine[0][0], mine[-1][1])))
        my_pieces.append(mine)
    model.train()
    total = 0.0
    batches = fkd.replay_batches(plan, jobs, args.loader, source, args.workers, device, meta["mean"], meta["std"],
                                 meta["mix_type"])
    for (job, x), mine in zip(tqdm(batches, total=len(jobs), disable=rank != 0, leave=False, desc=f"epoch {epoch}"), my_pieces):
        start, end = plan.bounds(job.batch)
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)
        for lo, hi in mine:
            if hi == lo:
                continue
            offset = mine[0][0]
            piece = kl_sum(model(x[lo - offset:hi - offset]), soft[start + lo:start + hi], args.temperature) / (end - start)
            piece.backward()
            loss = loss + piece.detach()
        batch_loss = all_reduce_grads(model, loss, world)
        if not math.isfinite(batch_loss):
            raise UsageError(f"the loss is {batch_loss} at epoch {epoch}, batch {job.batch}; lower the learning rate "
                             "or check the soft labels for NaN/inf")
        optimizer.step()
        total += batch_loss
    return total / plan.num_batches


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device) -> tuple[float, float, int]:
    model.eval()
    k = min(5, num_classes)
    correct1 = correctk = seen = 0
    for images, labels in loader:
        out = model(images.to(device))
        top = out.topk(k, 1).indices.cpu()
        correct1 += int((top[:, 0] == labels).sum())
        correctk += int((top == labels[:, None]).any(1).sum())
        seen += len(labels)
    return 100.0 * correct1 / seen, 100.0 * correctk / seen, k


def atomic_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_metrics(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_metrics(path: Path, before_epoch: int) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["epoch"] < before_epoch]


def load_checkpoint(args, model, optimizer, scheduler) -> tuple[int, float]:
    path = Path(args.resume or Path(args.output_dir) / "checkpoint.pth.tar")
    if not path.is_file():
        raise UsageError(f"cannot resume: {path} does not exist; drop --resume or pass the checkpoint's path")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["epoch"]), float(state["best_top1"])


def start_wandb(args: argparse.Namespace):
    try:
        import wandb
    except ImportError as err:
        raise UsageError("--wandb needs the wandb package; pip install wandb or drop --wandb") from err
    if args.wandb_api_key:
        wandb.login(key=args.wandb_api_key)
    return wandb.init(project=args.wandb_project, config=vars(args))


@cli
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world = init_distributed()
    accumulation = args.gradient_accumulation_steps
    if accumulation % world and world % accumulation:
        raise UsageError(f"--gradient-accumulation-steps {accumulation} and {world} processes: one must be a multiple of the other")
    device = pick_device(args.device)
    meta = fkd.read_meta(args.fkd_path)
    data = ImageFolderDataset(args.train_dir)
    check_store(args, meta, data)
    if not fkd.epoch_file(args.fkd_path, args.epochs - 1).is_file():
        raise UsageError(f"the store {args.fkd_path} lacks epoch {args.epochs - 1}; finish matching first")
    val_loader = build_val(args, meta)
    paths = [path for path, _ in data.samples]
    hw = fkd.image_sizes(paths)
    if args.loader == "tensor":
        fkd.check_one_size(hw)
    torch.manual_seed(args.seed)
    model = build_model(args.model, meta["num_classes"], args.input_size).to(device)
    optimizer = build_optimizer(args, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args.cos, args.epochs))
    start, best = args.start_epoch, -1.0
    for _ in range(start):
        scheduler.step()
    if args.resume is not None:
        start, best = load_checkpoint(args, model, optimizer, scheduler)
    out = Path(args.output_dir)
    source = fkd.build_source(args.loader, paths, hw, args.input_size, args.workers, device)
    metrics = read_metrics(out / "metrics.jsonl", start)
    run = start_wandb(args) if args.wandb and rank == 0 else None
    top1 = topk = None
    for epoch in tqdm(range(start, args.epochs), disable=rank != 0, desc="training", initial=start, total=args.epochs):
        began = time.time()
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row["loss"] = train_epoch(args, model, optimizer, source, meta, epoch, rank, world, device)
        scheduler.step()
        if rank == 0 and ((epoch + 1) % args.eval_interval == 0 or epoch == args.epochs - 1):
            top1, topk, k = evaluate(model, val_loader, meta["num_classes"], device)
            row.update({"top1": top1, f"top{k}": topk})
            if top1 >= best:
                best = top1
                atomic_save({"model": model.state_dict(), "epoch": epoch + 1, "top1": top1}, out / "model_best.pth.tar")
        if rank == 0:
            row["seconds"] = time.time() - began
            metrics.append(row)
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "epoch": epoch + 1, "best_top1": best, "rng": torch.get_rng_state()}, out / "checkpoint.pth.tar")
            write_metrics(out / "metrics.jsonl", metrics)
            if run is not None:
                run.log(row)
        barrier()
    if rank == 0:
        k = min(5, meta["num_classes"])
        if top1 is None:
            top1, topk, k = evaluate(model, val_loader, meta["num_classes"], device)
        with atomic_path(out / "results.json") as tmp:
            tmp.write_text(json.dumps({"top1": top1, f"top{k}": topk, "best_top1": max(best, top1),
                                       "epochs": args.epochs, "model": args.model}, indent=1))
        print(f"final: top-1 {top1:.2f} top-{k} {topk:.2f}")


if __name__ == "__main__":
    main()
