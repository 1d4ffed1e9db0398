"""Prototype files: the class prototypes of stage 1, read by stage 2.

Two formats carry the same content, prompts in class order and a [classes, ipc, 4, h, w] tensor:
- `.safetensors` (default): tensor `prototypes` (float32); metadata holds `prompts` (JSON list),
  `class_names` (JSON list) and the run's settings as strings.
- `.json` (the original's): a dict prompt -> nested list [ipc][4][h][w], keys in class order.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from d4m.runtime import UsageError, atomic_path

FORMATS = ("safetensors", "json")


@dataclass
class Prototypes:
    prompts: list[str]
    tensor: torch.Tensor  # [classes, ipc, 4, h, w] float32
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def per_class(self) -> int:
        return self.tensor.shape[1]


def prototype_filename(dataset: str, ipc: int, km_expand: int, fmt: str) -> str:
    return f"{dataset}-ipc{ipc}-kmexpand{km_expand}.{fmt}"


def check_json_prompts(prompts: list[str]) -> None:
    """JSON keys are the prompts, so repeated prompts would silently merge classes."""
    seen: set[str] = set()
    repeated = [p for p in prompts if p in seen or seen.add(p)]
    if repeated:
        raise UsageError(
            f"prompt {repeated[0]!r} appears more than once in the label file, so the JSON format cannot hold "
            "every class; use the default --prototype_format safetensors"
        )


def save_prototypes(path: str | Path, protos: Prototypes, fmt: str) -> None:
    """Write atomically in `fmt` (safetensors or json)."""
    tensor = protos.tensor.detach().to(torch.float32).contiguous()
    with atomic_path(path) as tmp:
        if fmt == "json":
            check_json_prompts(protos.prompts)
            data = {prompt: tensor[c].tolist() for c, prompt in enumerate(protos.prompts)}
            tmp.write_text(json.dumps(data), encoding="utf-8")
        else:
            metadata = {**protos.metadata, "prompts": json.dumps(protos.prompts)}
            tmp.write_bytes(_safetensors_bytes(tensor, metadata))


def _safetensors_bytes(tensor: torch.Tensor, metadata: dict[str, str]) -> bytes:
    """The safetensors layout written by hand with sorted header keys: safetensors' own writer orders the
    metadata differently in every process, and identical runs should give identical files."""
    data = tensor.numpy().astype("<f4").tobytes()
    header = {"__metadata__": metadata,
              "prototypes": {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [0, len(data)]}}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def load_prototypes(path: str | Path) -> Prototypes:
    """Read either format (chosen by the file's extension)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"prototype file {path} does not exist; run gen_prototype.py or fix --prototype_path")
    try:
        if path.suffix == ".json":
            return _load_json(path)
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensor = load_file(str(path))["prototypes"]
        return Prototypes(json.loads(metadata["prompts"]), tensor, metadata)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise UsageError(f"prototype file {path} is not a valid prototype file ({reason}); regenerate it") from err


def _load_json(path: Path) -> Prototypes:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not data:
        raise ValueError("expected a non-empty dict prompt -> [ipc][4][h][w]")
    return Prototypes(list(data), torch.tensor(list(data.values()), dtype=torch.float32))
