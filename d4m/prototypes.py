"""Prototype files: the class prototypes of stage 1, read by stage 2.

Two formats carry the same content, prompts in class order and a [classes, ipc, 4, h, w] tensor:
- `.safetensors` (default): tensors `prototypes` (float32), `inertia` (float64, per class) and `nearest` (int64
  [classes, ipc]: the training set's index of the distinct real image nearest to each prototype in latent space,
  -1 where unknown); metadata holds `prompts` and `class_names` (JSON lists) and the run's settings as strings.
- `.json` (the original's): a dict prompt -> nested list [ipc][4][h][w], keys in class order.

Both are written class by class (`PrototypeWriter`), so memory does not grow with the set: ImageNet at IPC 200
is 13 GB of float32. Several processes write their own classes into one temporary file; the final name
appears only once every class is in. A reader (`PrototypeFile`) of the safetensors format reads one class at a
time, so each synthesis process reads only its own classes.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open

from d4m import jsonfile
from d4m.cli import UsageError
from d4m.outputs import check_component


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


class PrototypeWriter:
    """A prototype file written class by class into `tmp` (a safetensors layout whose header is fixed up front),
    then renamed onto `path`, or converted to the JSON format class by class. `tmp` must be a name of its own:
    the JSON conversion writes through `.{name}.tmp{pid}`."""

    def __init__(self, path: str | Path, tmp: str | Path, prompts: list[str], class_shape: tuple[int, ...],
                 metadata: dict[str, str], fmt: str):
        self.path, self.tmp, self.fmt = Path(path), Path(tmp), fmt
        self.classes, self.class_shape = len(prompts), tuple(class_shape)
        self.class_bytes = int(np.prod(class_shape)) * 4
        self.per_class = self.class_shape[0]
        inertia_bytes, nearest_bytes = 8 * self.classes, 8 * self.classes * self.per_class
        self.nearest_start = inertia_bytes
        self.prototypes_start = inertia_bytes + nearest_bytes
        header = {"__metadata__": {**metadata, "prompts": json.dumps(prompts)},
                  "inertia": {"dtype": "F64", "shape": [self.classes], "data_offsets": [0, inertia_bytes]},
                  "nearest": {"dtype": "I64", "shape": [self.classes, self.per_class],
                              "data_offsets": [inertia_bytes, self.prototypes_start]},
                  "prototypes": {"dtype": "F32", "shape": [self.classes, *self.class_shape],
                                 "data_offsets": [self.prototypes_start,
                                                  self.prototypes_start + self.classes * self.class_bytes]}}
        # sorted keys: identical runs give identical files (safetensors' own writer orders them by process)
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        self.header = struct.pack("<Q", len(text) + (-len(text) % 8)) + text + b" " * (-len(text) % 8)
        self.data_start = len(self.header)

    def create(self) -> None:
        """Write the header and size the file (done by one process, before any class is written)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.tmp, "wb") as f:
            f.write(self.header)
            f.truncate(self.data_start + self.prototypes_start + self.classes * self.class_bytes)

    def write(self, label: int, prototypes: np.ndarray, inertia: float, nearest: Optional[list[int]] = None) -> None:
        """Put one class's [ipc, 4, h, w] prototypes, its inertia and its nearest real images in place."""
        if prototypes.shape != self.class_shape:
            raise UsageError(f"class {label}'s prototypes have shape {prototypes.shape}, the file expects "
                             f"{self.class_shape}; the VAE's latent shape differs from its configuration")
        nearest = [-1] * self.per_class if nearest is None else nearest
        with open(self.tmp, "r+b") as f:
            f.seek(self.data_start + 8 * label)
            f.write(np.float64(inertia).astype("<f8").tobytes())
            f.seek(self.data_start + self.nearest_start + 8 * self.per_class * label)
            f.write(np.asarray(nearest, dtype="<i8").tobytes())
            f.seek(self.data_start + self.prototypes_start + label * self.class_bytes)
            f.write(np.ascontiguousarray(prototypes, dtype="<f4").tobytes())

    def commit(self) -> None:
        """Give the finished file its name (in the chosen format); after every class is written."""
        if self.fmt == "json":
            self._write_json()
            self.tmp.unlink()
        else:
            os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)

    def _write_json(self) -> None:
        source = PrototypeFile(self.tmp)
        check_json_prompts(source.prompts)
        part = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            with open(part, "w", encoding="utf-8") as f:
                f.write("{")
                for c, prompt in enumerate(source.prompts):
                    f.write((", " if c else "") + json.dumps(prompt) + ": " + json.dumps(source.of_class(c).tolist()))
                f.write("}")
            os.replace(part, self.path)
        finally:
            part.unlink(missing_ok=True)


def save_prototypes(path: str | Path, prompts: list[str], tensor: torch.Tensor, fmt: str = "safetensors",
                    metadata: Optional[dict[str, str]] = None) -> None:
    """Write a whole [classes, ipc, 4, h, w] tensor from one process (inertia recorded as 0)."""
    path = Path(path)
    writer = PrototypeWriter(path, path.with_name(f".{path.name}.build{os.getpid()}"), prompts, tuple(tensor.shape[1:]),
                             metadata or {}, fmt)
    try:
        writer.create()
        for label, prototypes in enumerate(tensor.float().numpy()):
            writer.write(label, prototypes, 0.0)
        writer.commit()
    finally:
        writer.discard()


class PrototypeFile:
    """A prototype file opened for reading; the safetensors format is read one class at a time."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"prototype file {path} does not exist; run gen_prototype.py or fix --prototype_path")
        self.path = path
        self._tensor: Optional[torch.Tensor] = None
        try:
            if path.suffix == ".json":
                self._load_json()
            else:
                self._handle = safe_open(str(path), framework="pt")
                self.metadata = self._handle.metadata() or {}
                self.prompts = jsonfile.loads(self.metadata["prompts"])
                self.shape = tuple(self._handle.get_slice("prototypes").get_shape())
            self.class_names = jsonfile.loads(self.metadata.get("class_names", "null"))
            if self.class_names is not None and not (isinstance(self.class_names, list) and
                                                     len(self.class_names) == len(self.prompts)):
                raise ValueError("its class_names are not one name per prompt")
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            reason = " ".join(f"{type(err).__name__}: {err}".split())
            raise UsageError(f"prototype file {path} is not a valid prototype file ({reason}); regenerate it") from err
        self.name = self.metadata.get("name")  # names the later stages' folders: one safe path component
        if self.name is not None:
            check_component(self.name, f"prototype file {path} records the name", "regenerate it, or give --name")
        if len(self.shape) != 5 or self.shape[0] != len(self.prompts):
            raise UsageError(f"prototype file {path} holds a tensor of shape {list(self.shape)} for "
                             f"{len(self.prompts)} prompts; regenerate it")

    def _load_json(self) -> None:
        data = jsonfile.read(self.path, max_bytes=None)  # a JSON prototype file is as large as its set
        if not isinstance(data, dict) or not data:
            raise ValueError("expected a non-empty dict prompt -> [ipc][4][h][w]")
        self.prompts, self.metadata = list(data), {}
        self._tensor = torch.tensor(list(data.values()), dtype=torch.float32)
        self.shape = tuple(self._tensor.shape)

    @property
    def per_class(self) -> int:
        return self.shape[1]

    def of_class(self, label: int) -> torch.Tensor:
        """[ipc, 4, h, w] float32 prototypes of one class."""
        if self._tensor is not None:
            return self._tensor[label]
        return self._handle.get_slice("prototypes")[label:label + 1][0]

    def all(self) -> torch.Tensor:
        """[classes, ipc, 4, h, w]: every class at once (for small sets)."""
        if self._tensor is not None:
            return self._tensor
        return self._handle.get_tensor("prototypes")

    def inertia(self) -> Optional[torch.Tensor]:
        """Per-class k-means inertia, where the file records it (the JSON format does not)."""
        return self._optional("inertia")

    def nearest(self) -> Optional[torch.Tensor]:
        """[classes, ipc] training-set indices of the real images nearest to the prototypes, where recorded."""
        return self._optional("nearest")

    def _optional(self, name: str) -> Optional[torch.Tensor]:
        if self._tensor is not None or name not in self._handle.keys():
            return None
        return self._handle.get_tensor(name)
