"""What a set is like in a teacher's feature space (its penultimate layer), measured against a seeded sample of the
real training images; used to explain why a set wins, ties or loses.

- precision, recall, density and coverage (Naeem et al., ICML 2020, k = 5 nearest neighbours), computed by `prdc`,
  the authors' package: coverage is the share of real images whose k-th-neighbour ball (among the real images) holds
  a set image; density counts how many real balls each set image falls in (1 for a set spread like the real data).
- KID (Bińkowski et al., ICLR 2018): the unbiased squared MMD with a cubic polynomial kernel, computed by
  `torchmetrics` with the teacher's features as its features; unlike the Fréchet distance it has no bias at
  small sets, so it can rank sets of 10-100 images.
- the Fréchet distance (FID's formula), only where the set has more images than the features have dimensions
  (below that the set's covariance is singular and the distance is biased by the set's size).
"""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from d4m.device import eval_batch, memory_format

NEAREST_K = 5  # Naeem et al.'s k
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # torchmetrics' default, lowered to the smaller of the two sets


@torch.no_grad()
def features_and_logits(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features [B, D], logits [B, C]) of a classifier whose last layer is a Linear: its input is
    the feature."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen = []
    hook = last.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].flatten(1)))
    try:
        logits = model(images)
    finally:
        hook.remove()
    return seen[-1].float(), logits.float()


@torch.no_grad()
def dataset_features(model: nn.Module, data: Dataset, device: torch.device,
                     workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] on the CPU, labels [N]) of a labelled dataset whose items are normalised image tensors."""
    model.eval()
    feats, labels = [], []
    for images, targets in DataLoader(data, batch_size=eval_batch(device), num_workers=workers):
        images = images.to(device).contiguous(memory_format=memory_format(device))
        feats.append(features_and_logits(model, images)[0].cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(feats), torch.cat(labels)


def kid(real: torch.Tensor, chosen: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over KID_SUBSETS subsets of torchmetrics' KID between two feature sets [N, D]; subsets of the
    smaller set's size, drawn from a generator seeded by `seed`."""
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():  # that it keeps the features in memory: they are here already
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=nn.Identity(), subsets=KID_SUBSETS,
                                         subset_size=min(KID_SUBSET_SIZE, len(real), len(chosen)))
    metric.update(real.double(), real=True)
    metric.update(chosen.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (the matrix square root through the
    eigenvalues of sqrt(S_a) S_b sqrt(S_a), which stays real and symmetric)."""
    a, b = a.double().numpy(), b.double().numpy()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    distance = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross
    return max(float(distance), 0.0)  # rounding can leave a tiny negative for two equal sets


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def set_scores(real: torch.Tensor, chosen: torch.Tensor) -> dict:
    """A set's precision, recall, density and coverage (k = NEAREST_K, fewer for a set of 6 images or fewer; None
    below 3), KID (mean and std over subsets) and, where it has more images than dimensions, Fréchet distance,
    against the real features."""
    from prdc import compute_prdc

    # prdc takes each point's k-th neighbour among the others of its set: k below each set's size less one
    k = min(NEAREST_K, len(chosen) - 2, len(real) - 2)
    if k < 1:
        scores = dict.fromkeys(("precision", "recall", "density", "coverage"))
    else:
        with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
            found = compute_prdc(real_features=real.double().numpy(), fake_features=chosen.double().numpy(),
                                 nearest_k=k)
        scores = {key: float(value) for key, value in found.items()}
    scores["kid"], scores["kid_std"] = kid(real, chosen)
    scores["frechet"] = frechet(real, chosen) if len(chosen) > real.shape[1] else None
    return scores
