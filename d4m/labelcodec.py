"""The soft-label codec of the store (`d4m.store`): how a [N,C] block of teacher logits is kept in an epoch file.

Three encodings: the full logits (fp16 or fp32); 8 bits per logit between its row's minimum and maximum
(`logits_q`, `logits_min`, `logits_step`: half the bytes of fp16, every logit within 1/510 of its row's range); or,
with top-K, the K largest logits (`topk_values`), their class indices bit-packed at ceil(log2 C) bits each
(`topk_indices`, uint8; 10 bits for 1000 classes instead of 16) and the mean of the other C-K logits (`rest_mean`).
A top-K row is rebuilt by scattering the K values into a row filled with that mean: the tail then keeps about the
right softmax mass at any temperature (exactly in the limit of high T, where a tail of -inf or 0 would be badly off).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

KEYS = ({"logits"}, {"topk_values", "topk_indices", "rest_mean"}, {"logits_q", "logits_min", "logits_step"})


def topk_compress(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """K largest logits per row, their indices (int16 when the class count allows) and the mean of the rest."""
    classes = logits.shape[1]
    values, indices = logits.float().topk(k, dim=1)
    rest = (logits.float().sum(1) - values.sum(1)) / (classes - k)
    index_dtype = torch.int16 if classes <= 32767 else torch.int32
    return {"topk_values": values.to(logits.dtype), "topk_indices": indices.to(index_dtype),
            "rest_mean": rest.to(logits.dtype)}


def topk_rebuild(values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor, classes: int) -> torch.Tensor:
    """Full fp32 rows: the top-K scattered into a row filled with the mean of the other logits."""
    full = rest.float()[:, None].expand(len(rest), classes).clone()
    return full.scatter_(1, indices.long(), values.float())


def keep_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Apply the top-K rebuild to full logits; unchanged when K >= the class count."""
    if k >= logits.shape[1]:
        return logits
    parts = topk_compress(logits, k)
    return topk_rebuild(parts["topk_values"], parts["topk_indices"], parts["rest_mean"], logits.shape[1])


def index_bits(classes: int) -> int:
    return max(1, math.ceil(math.log2(classes)))


def pack_indices(indices: torch.Tensor, classes: int) -> torch.Tensor:
    """Class indices [N,K] -> uint8 bytes holding ceil(log2 C) bits per index."""
    bits = index_bits(classes)
    values = indices.long().cpu().numpy()[..., None] >> np.arange(bits)
    return torch.from_numpy(np.packbits((values & 1).astype(np.uint8).ravel()))


def unpack_indices(packed: torch.Tensor, rows: int, k: int, classes: int) -> torch.Tensor:
    bits = index_bits(classes)
    flat = np.unpackbits(packed.numpy(), count=rows * k * bits).reshape(rows, k, bits).astype(np.int64)
    return torch.from_numpy((flat << np.arange(bits)).sum(-1))


def quantize_rows(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each row as 8-bit steps between its own minimum and maximum: `logits_q` uint8 [N,C], `logits_min` and
    `logits_step` float32 [N]. A logit comes back within half a step, 1/510 of its row's range."""
    rows = logits.float()
    low, high = rows.min(1).values, rows.max(1).values
    step = torch.where(high > low, (high - low) / 255, torch.ones_like(low))
    q = ((rows - low[:, None]) / step[:, None]).round_().clamp_(0, 255).to(torch.uint8)
    return {"logits_q": q, "logits_min": low, "logits_step": step}


def dequantize_rows(q: torch.Tensor, low: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return low.float()[:, None] + q.float() * step.float()[:, None]


def encode(logits: torch.Tensor, topk: int | None, int8: bool) -> dict[str, torch.Tensor]:
    """An epoch's logits as stored: the K largest with their packed indices (`topk`), 8 bits per logit (`int8`), or
    as they are."""
    if topk:
        parts = topk_compress(logits, topk)
        parts["topk_indices"] = pack_indices(parts["topk_indices"], logits.shape[1])
        return parts
    if int8:
        return quantize_rows(logits)
    return {"logits": logits}


@dataclass
class SoftLabels:
    """An epoch's soft labels kept as stored (full logits, or the top-K parts), turned into full float32 rows on
    the device a batch at a time: host memory stays at the store's size, device memory at a batch's."""
    tensors: dict[str, torch.Tensor]
    classes: int

    def pin(self) -> "SoftLabels":
        return SoftLabels({k: v.pin_memory() for k, v in self.tensors.items()}, self.classes)

    def rows(self, start: int, end: int, device: torch.device | str = "cpu") -> torch.Tensor:
        part = {k: v[start:end].to(device, non_blocking=True) for k, v in self.tensors.items()}
        if "logits" in part:
            return part["logits"].float()
        if "logits_q" in part:
            return dequantize_rows(part["logits_q"], part["logits_min"], part["logits_step"])
        return topk_rebuild(part["topk_values"], part["topk_indices"], part["rest_mean"], self.classes)


def decode(tensors: dict[str, torch.Tensor], classes: int) -> SoftLabels:
    """The soft labels of an epoch file's tensors (top-K indices already unpacked)."""
    if "logits" in tensors:
        return SoftLabels({"logits": tensors["logits"]}, classes)
    if "logits_q" in tensors:
        return SoftLabels({k: tensors[k] for k in ("logits_q", "logits_min", "logits_step")}, classes)
    index_dtype = torch.int16 if classes <= 32767 else torch.int32
    parts = {"topk_values": tensors["topk_values"], "topk_indices": tensors["topk_indices"].to(index_dtype),
             "rest_mean": tensors["rest_mean"]}
    return SoftLabels(parts, classes)
