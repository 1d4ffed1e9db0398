"""Per-class prototypes for stage 1: the original's mini-batch k-means and a full-batch Lloyd k-means in torch.

Each takes one class's flattened latents [n, features] in the order they were encoded and returns `ipc` prototypes;
`inertia` scores them all the same way.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from d4m.runtime import seeded_generator

MAX_ITER = 300
TOL = 1e-4  # as sklearn's: stop when the centres move less than TOL * mean per-feature variance (squared)


def faithful_centres(latents: np.ndarray, ipc: int, km_expand: int) -> np.ndarray:
    """The original's fit: MiniBatchKMeans.partial_fit on chunks of km_expand*ipc latents in arrival order,
    the leftover chunk included when it holds at least ipc latents."""
    from sklearn.cluster import MiniBatchKMeans  # imported on use: only the faithful method needs it

    chunk = km_expand * ipc
    kmeans = MiniBatchKMeans(n_clusters=ipc, random_state=0, batch_size=chunk, n_init="auto")
    for start in range(0, len(latents), chunk):
        part = latents[start : start + chunk]
        if len(part) >= ipc:
            kmeans.partial_fit(part)
    return kmeans.cluster_centers_


def squared_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """[n, k] squared Euclidean distances, by the expanded form (one matrix product)."""
    return ((x * x).sum(1, keepdim=True) - 2 * x @ centres.T + (centres * centres).sum(1)).clamp_min_(0)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding: each new centre is the best of 2 + ln(k) candidates drawn by D^2 weighting.
    Draws come from the CPU `generator`, so the seeding is the same on every device."""
    trials = 2 + int(math.log(k))
    first = int(torch.randint(len(x), (1,), generator=generator))
    centres = x[first : first + 1]
    closest = squared_distances(x, centres)[:, 0]
    for _ in range(1, k):
        weights = closest.double().cpu()
        if weights.sum() <= 0:  # fewer distinct points than k: any point will do
            weights = torch.ones_like(weights)
        candidates = torch.multinomial(weights, trials, replacement=True, generator=generator).to(x.device)
        updated = torch.minimum(closest[None], squared_distances(x, x[candidates]).T)
        best = int(updated.sum(1).argmin())
        centres = torch.cat([centres, x[candidates[best] : candidates[best] + 1]])
        closest = updated[best]
    return centres


def lloyd(x: torch.Tensor, centres: torch.Tensor, max_iter: int = MAX_ITER, tol: float = TOL) -> torch.Tensor:
    """Full-batch Lloyd iterations from `centres`; a cluster left empty keeps its previous centre."""
    threshold = tol * float(x.var(0).mean())
    k = len(centres)
    for _ in range(max_iter):
        assign = squared_distances(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        shift = float(((moved - centres) ** 2).sum())
        centres = moved
        if shift <= threshold:
            break
    return centres


def full_centres(latents: torch.Tensor, ipc: int, seed: int, label: int, device: torch.device) -> np.ndarray:
    """Full-batch k-means on all of a class's latents on `device`, seeded by (seed, class)."""
    x = latents.to(device=device, dtype=torch.float32)
    centres = kmeans_plus_plus(x, ipc, seeded_generator(seed, label))
    return lloyd(x, centres).cpu().numpy()


def inertia(latents: torch.Tensor, centres: np.ndarray | torch.Tensor, device: torch.device) -> float:
    """Sum over the latents of the squared distance to their nearest centre (assignment in float32,
    distances summed as exact differences in float64)."""
    x = latents.to(device=device, dtype=torch.float32)
    c = torch.as_tensor(centres, device=device, dtype=torch.float32)
    nearest = squared_distances(x, c).argmin(1)
    wide = torch.float64 if device.type != "mps" else torch.float32
    return float(((x.to(wide) - c.to(wide)[nearest]) ** 2).sum())


def class_centres(method: str, latents: torch.Tensor, ipc: int, km_expand: int, seed: int, label: int,
                  device: torch.device) -> tuple[np.ndarray, float]:
    """One class's [ipc, features] prototypes by `method` and their inertia on the class's latents."""
    if method == "full":
        centres = full_centres(latents, ipc, seed, label, device)
    else:
        centres = faithful_centres(latents.numpy(), ipc, km_expand)
    return centres.astype(np.float32), inertia(latents, centres, device)


def nearest_members(latents: torch.Tensor, centres: np.ndarray, device: torch.device) -> list[int]:
    """For each centre in turn, the row of `latents` nearest to it among those not yet taken (distinct rows, so
    that a set of real images chosen this way has as many images as centres)."""
    x = latents.to(device=device, dtype=torch.float32)
    distances = squared_distances(x, torch.as_tensor(centres, device=device, dtype=torch.float32)).T.cpu()
    taken: list[int] = []
    for row in distances:
        row[taken] = float("inf")
        taken.append(int(row.argmin()))
    return taken
