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


def gap_interval(runs: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean(runs) - mean(baseline), low, high): the difference of two means with Welch's t interval at `level`
    (NaN bounds when either side has fewer than two runs). A gap whose interval excludes 0 is a win or a loss."""
    from scipy.stats import t

    gap = mean_std(runs)[0] - mean_std(baseline)[0]
    if len(runs) < 2 or len(baseline) < 2:
        return gap, math.nan, math.nan
    va, vb = mean_std(runs)[1] ** 2 / len(runs), mean_std(baseline)[1] ** 2 / len(baseline)
    if va + vb == 0:
        return gap, gap, gap
    dof = (va + vb) ** 2 / (va ** 2 / (len(runs) - 1) + vb ** 2 / (len(baseline) - 1))
    half = float(t.ppf(0.5 + level / 2, dof)) * math.sqrt(va + vb)
    return gap, gap - half, gap + half


def label_robust_score(ior: float, hlr: float, weight: float = 0.5) -> float:
    """DD-Ranking's label-robust score (ddranking 0.2.0's formula): with alpha = weight * IOR - (1 - weight) * HLR,
    (e^alpha - e^-1) / (e - e^-1). IOR and HLR are taken as fractions (accuracy points / 100), which keeps the
    score in [0, 1] as the DD-Ranking paper defines it (ddranking 0.2.0 passes percentages)."""
    alpha = weight * ior / 100 - (1 - weight) * hlr / 100
    return (math.exp(alpha) - math.exp(-1)) / (math.exp(1) - math.exp(-1))


def gap_text(score: dict, key: str) -> str:
    """'+1.23 [+0.10, +2.36]': the gap `key` of a score row with its 95 % interval (the gap alone for one seed)."""
    if key not in score:
        return "—"
    interval = score.get(f"{key}_ci")
    return f"{score[key]:+.2f}" + (f" [{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval else "")
