"""A student's run folder (validate/train_FKD.py): checkpoints that record the settings they were trained with
(`d4m.settings.student_settings`), resume that refuses another run's checkpoint, and the rule for a folder that
already holds a run (--resume or --overwrite). One call per use: `claim_folder` before the work, `resume` when a
student starts, `state_of` for each epoch's checkpoint."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from d4m.cli import UsageError, first_line
from d4m.outputs import atomic_path, check_confined, check_settings, load_torch
from d4m.runtime import together

CHECKPOINT = "checkpoint.pth.tar"
RUN_FILES = (CHECKPOINT, "model_best.pth.tar", "metrics.jsonl", "results.json")
KEYS = frozenset({"model", "optimizer", "scheduler", "scaler", "epoch", "best_top1", "rng", "settings", "metrics"})
AFRESH = "or start afresh: --overwrite in place of --resume"


@dataclass
class Student:
    """One of the --seeds students: its seed, folder, plan seed and the settings its checkpoints record."""
    seed: int
    folder: Path
    plan_seed: int
    settings: dict


@dataclass
class Training:
    """What a checkpoint saves and restores."""
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def flag(key: str) -> str:
    """The command-line flag of a setting, for messages."""
    return {"fkd_seed": "--fkd_seed", "workers": "-j", "num_classes": "the class count"}.get(
        key, "--" + key.replace("_", "-"))


def resume_path(resume: str | None, folder: Path, seeds: int) -> Path | None:
    """--resume CKPT, else with --resume the folder's own checkpoint (a seed of several that has none starts
    afresh), else none."""
    if resume is None:
        return None
    path = Path(resume) if resume else folder / CHECKPOINT
    if path.is_file():
        return path
    if resume or seeds == 1:
        raise UsageError(f"cannot resume: {path} does not exist; drop --resume or pass the checkpoint's path")
    return None


def load(path: Path, settings: dict) -> dict:
    """The checkpoint at `path`, refused in one line when it does not load, is not one of train_FKD.py's, is
    malformed, or is of a run with other settings."""
    try:
        state = load_torch(path)
    except Exception as err:  # a truncated, damaged or foreign file: torch raises many kinds
        raise UsageError(f"checkpoint {path} does not load ({first_line(err)}); resume from an intact one, "
                         f"{AFRESH}") from err
    if not isinstance(state, dict) or not KEYS <= state.keys():
        raise UsageError(f"{path} is not a checkpoint of validate/train_FKD.py (or one from before checkpoints "
                         f"recorded their settings); resume from one, {AFRESH}")
    malformed = [key for key, ok in [("settings", isinstance(state["settings"], dict)),
                                     ("epoch", type(state["epoch"]) is int and 0 <= state["epoch"]),
                                     ("best_top1", isinstance(state["best_top1"], (int, float))),
                                     ("metrics", isinstance(state["metrics"], list))] if not ok]
    if malformed:
        raise UsageError(f"checkpoint {path} is damaged (its {', '.join(malformed)} is not what train_FKD.py "
                         f"writes); resume from an intact one, {AFRESH}")
    check_settings(state["settings"], settings, f"checkpoint {path}",
                   f"resume with the settings it was started with, {AFRESH}", name=flag)
    if state["epoch"] > settings["epochs"]:
        raise UsageError(f"checkpoint {path} is at epoch {state['epoch']}, past --epochs {settings['epochs']}; "
                         f"resume from one of this run, {AFRESH}")
    return state


def claim_folder(base: Path, students: list[Student], resume: str | None, overwrite: bool, rank: int,
                 world: int) -> None:
    """The folder's rule, on rank 0, every process learning of a refusal: a folder holding a run is refused unless
    --resume or --overwrite; --overwrite discards that run's files; every checkpoint to resume from is checked."""
    with together(world):
        if rank == 0:
            folders = [base, *sorted(p for p in base.glob("seed*") if p.is_dir())]
            held = [f / CHECKPOINT for f in folders if (f / CHECKPOINT).is_file()]
            if held and resume is None and not overwrite:
                raise UsageError(f"{base} holds a training run ({held[0]}); continue it with --resume, or discard it "
                                 "and start afresh with --overwrite")
            if overwrite:
                for folder in folders:
                    for name in RUN_FILES:
                        check_confined(folder / name)
                        (folder / name).unlink(missing_ok=True)
            for student in students:
                path = resume_path(resume, student.folder, len(students))
                if path is not None:
                    load(path, student.settings)


def state_of(run: Training, epoch: int, best: float, device: torch.device, settings: dict, metrics: list[dict]) -> dict:
    """Everything a resumed run needs to continue with the weights of an uninterrupted one, the settings it must
    repeat, and the metrics rows so far (the metrics file is rewritten from them)."""
    state = {"model": run.net.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "epoch": epoch,
             "best_top1": best, "rng": torch.get_rng_state(), "settings": settings, "metrics": metrics}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def write_metrics(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))


def resume(path: Path | None, student: Student, run: Training, device: torch.device, rank: int,
           start_epoch: int) -> tuple[int, float, list[dict]]:
    """(first epoch, best top-1, metrics rows so far): `start_epoch`'s on a fresh run (no `path`), else the
    checkpoint's, whose rows are written out again (a run stopped between the checkpoint and the metrics file had not
    written the last)."""
    if path is None:
        for _ in range(start_epoch):
            run.scheduler.step()
        return start_epoch, -1.0, []
    state = load(path, student.settings)
    try:
        run.net.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:  # e.g. a torchvision whose model differs
        raise UsageError(f"checkpoint {path} does not fit this {type(run.net).__name__} ({first_line(err)}); "
                         f"resume with the library versions it was written with, {AFRESH}") from err
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    if rank == 0:
        write_metrics(student.folder / "metrics.jsonl", state["metrics"])
    return state["epoch"], float(state["best_top1"]), list(state["metrics"])
