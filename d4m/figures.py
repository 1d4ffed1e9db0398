"""Accuracy over seeds, as every script summarises and prints it."""
from __future__ import annotations

import math
from typing import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value, which `as_text` does not print)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def as_text(mean: float, std: float, runs: int) -> str:
    """'80.74 ± 0.18' over several runs, '80.94 (1 seed)' for one: a spread of one run is not a spread."""
    return f"{mean:.2f} ± {std:.2f}" if runs > 1 else f"{mean:.2f} (1 seed)"
