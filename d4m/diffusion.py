"""Loading Stable Diffusion checkpoints (local diffusers folders or hub ids) with clear errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from d4m.runtime import UsageError

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def pipeline_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (as the original runs SD), fp32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _check_local_folder(cls, folder: Path) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        raise UsageError(
            f"{folder} is not a diffusers Stable Diffusion folder (no model_index.json); "
            "pass a folder written by save_pretrained or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    try:
        listed = json.loads(index.read_text())
    except ValueError as err:
        raise UsageError(f"{index} is not valid JSON ({err}); re-download the checkpoint") from err
    required, _ = cls._get_signature_keys(cls)
    missing = [name for name in required if name not in cls._optional_components
               and (not isinstance(listed.get(name), list) or listed[name][0] is None or not (folder / name).is_dir())]
    if missing:
        raise UsageError(f"{folder} is not a Stable Diffusion checkpoint: it lacks {', '.join(missing)}")


def load_pipeline(cls, path: str, device: torch.device, safety_checker: bool = False):
    """`cls.from_pretrained(path)` on `device`, without the safety checker unless asked for, or a UsageError."""
    local = Path(path).expanduser()
    if local.exists():
        _check_local_folder(cls, local)
    elif not HUB_ID.match(path):
        raise UsageError(f"model {path!r} is neither an existing folder nor a hub id like owner/name; fix --diffusion_checkpoints_path")
    kwargs = {}
    if "safety_checker" in cls._get_signature_keys(cls)[0] and not safety_checker:
        kwargs = dict(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(str(local) if local.exists() else path, dtype=pipeline_dtype(device), **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load Stable Diffusion checkpoint {path}: {first}") from err
    if safety_checker and getattr(pipe, "safety_checker", None) is None:
        raise UsageError(f"--safety_checker asked for, but checkpoint {path} has none; run without --safety_checker")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
