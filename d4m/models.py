"""Classifier architectures (teachers and students) and the teacher file format."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from d4m.cli import UsageError, first_line
from d4m.data import IMAGENET_MEAN, IMAGENET_STD
from d4m.device import memory_format
from d4m.outputs import load_torch, save_torch

EXTRA_ARCHS = ("convnet", "resnet18_modified")


class _HalvingMean(torch.autograd.Function):
    """The mean of each 2x2 window in the order PyTorch's CPU kernel sums it (((a + b) + c) + d) / 4, hence the same
    bits, forward and backward; on a 2-core CPU it runs in about half the time of that kernel on NCHW tensors."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.in_shape = x.shape
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]  # an odd last row or column is left out
        mean = x[..., 0::2, 0::2] + x[..., 0::2, 1::2]
        mean += x[..., 1::2, 0::2]
        mean += x[..., 1::2, 1::2]
        return mean.div_(4)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        share = grad / 4
        h, w = 2 * share.shape[-2], 2 * share.shape[-1]
        spread = share.new_zeros(ctx.in_shape) if ctx.in_shape[-2:] != (h, w) else share.new_empty(ctx.in_shape)
        for row in (0, 1):
            for col in (0, 1):
                spread[..., row:h:2, col:w:2] = share
        return spread


class AvgPool2x2(nn.Module):
    """nn.AvgPool2d(2, 2), computed on the CPU by _HalvingMean (same values, faster); other devices use PyTorch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.avg_pool2d(x, 2, 2)
        return _HalvingMean.apply(x)


class ConvNet(nn.Module):
    """The distillation benchmarks' ConvNet: depth x [conv3x3, instance norm, ReLU, avg-pool 2]."""

    def __init__(self, num_classes: int, input_size: int = 32, width: int = 128, depth: int = 3, channels: int = 3):
        super().__init__()
        layers, in_ch = [], channels
        for _ in range(depth):
            layers += [
                nn.Conv2d(in_ch, width, kernel_size=3, padding=1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(inplace=True),
                AvgPool2x2(),
            ]
            in_ch = width
        self.features = nn.Sequential(*layers)
        side = input_size // 2**depth
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def architectures() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models)) + list(EXTRA_ARCHS)


def build_model(arch: str, num_classes: int, input_size: int = 224) -> nn.Module:
    """A randomly initialised classifier by name: any torchvision classification model, convnet, resnet18_modified."""
    if arch == "convnet":
        if input_size < 8:  # three halvings leave nothing for the classifier
            raise UsageError(f"convnet cannot take {input_size} px images (it halves them three times); choose an "
                             "--input-size of 8 or more")
        return ConvNet(num_classes, input_size)
    if arch == "resnet18_modified":
        model = torchvision.models.resnet18(num_classes=num_classes)
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise UsageError(f"unknown architecture {arch!r}; use a torchvision classification model name, convnet or resnet18_modified")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


@torch.no_grad()
def check_input_size(model: nn.Module, arch: str, input_size: int) -> None:
    """A model that cannot take `input_size` px images (too small for its downsampling, or not its fixed size) is
    refused in one line, before the work: one forward pass of two blank images."""
    try:
        model.eval()(torch.zeros(2, 3, input_size, input_size))
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"{arch} cannot take {input_size} px images ({first_line(err)}); choose an --input-size "
                         "it takes") from err


def recorded_top1(record: dict, dataset: str) -> float | None:
    """The validation top-1 train_teacher.py wrote into a teacher it trained on `dataset`, else None."""
    return float(record["top1"]) if record.get("dataset") == dataset and "top1" in record else None


def save_teacher(path: str | Path, model: nn.Module, arch: str, num_classes: int, input_size: int,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, **info) -> None:
    """Write a teacher file that carries everything needed to rebuild and feed the model."""
    record = {
        "arch": arch,
        "num_classes": int(num_classes),
        "input_size": int(input_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **info,
    }
    save_torch(record, path)


def load_teacher_file(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a teacher written by save_teacher; returns (model in eval mode, its record without weights)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"teacher file {path} does not exist; make one with matching/train_teacher.py")
    try:
        record = load_torch(path)
        model = build_model(record["arch"], record["num_classes"], record["input_size"])
        model.load_state_dict(record.pop("state_dict"))
    except UsageError:
        raise
    except Exception as err:  # any unpickling or shape error means the file is not a teacher file
        raise UsageError(f"teacher file {path} does not load as a teacher written by train_teacher.py: "
                         f"{first_line(err)}") from err
    return model.eval(), record


def load_pretrained(arch: str) -> tuple[nn.Module, dict]:
    """A torchvision model with its default ImageNet weights (downloaded by torchvision on first use)."""
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise UsageError(f"unknown architecture {arch!r}; use a torchvision classification model name or --teacher-path")
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    model = torchvision.models.get_model(arch, weights=weights)
    record = {"arch": arch, "num_classes": 1000, "input_size": 224, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
              "classes": list(weights.meta["categories"])}
    return model.eval(), record


def load_teacher(path: str | None, arch: str, data_classes: int, input_size: int | None, device: torch.device,
                 data: str) -> tuple[nn.Module, dict]:
    """The frozen teacher on `device`: a teacher file (`path`), else torchvision's pretrained `arch`, with its record
    (`source` added). Refused in one line when it knows fewer classes than `data` holds, or cannot take `input_size`
    px views (None: its own size)."""
    teacher, record = load_teacher_file(path) if path else load_pretrained(arch)
    input_size = input_size or record["input_size"]
    record["source"] = str(path) if path else "torchvision-default-weights"
    if record["num_classes"] < data_classes:
        raise UsageError(f"the teacher has {record['num_classes']} classes but {data}; use a teacher trained on this "
                         "dataset")
    try:
        with torch.no_grad():
            teacher(torch.zeros(1, 3, input_size, input_size))
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"the teacher ({record['arch']}) cannot take {input_size} px inputs; use --input-size "
                         f"{record['input_size']}") from err
    return teacher.to(device, memory_format=memory_format(device)).requires_grad_(False), record
