"""What a set is like in a teacher's feature space (its penultimate layer): how much of the real training set it
covers, and how far its distribution is from the real one. Used to explain why a set wins or ties, and by stage 2's
candidate selection for its diversity criterion.

- coverage: the share of real training images whose nearest set image (of their class) lies within the real
  data's own median nearest-neighbour distance (of that class). A set of typical images near the class centre
  covers the images around it and misses the rest.
- Fréchet distance: between Gaussians fitted to the set's and the real images' features (as FID does with
  Inception features); lower is closer.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from d4m.device import memory_format


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
def dataset_features(model: nn.Module, data: Dataset, device: torch.device, workers: int = 0,
                     batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] on the CPU, labels [N]) of a labelled dataset whose items are normalised image tensors."""
    model.eval()
    feats, labels = [], []
    for images, targets in DataLoader(data, batch_size=batch_size, num_workers=workers):
        images = images.to(device).contiguous(memory_format=memory_format(device))
        feats.append(features_and_logits(model, images)[0].cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(feats), torch.cat(labels)


def coverage(real: torch.Tensor, real_labels: torch.Tensor, chosen: torch.Tensor,
             chosen_labels: torch.Tensor) -> tuple[float, list[float]]:
    """(overall %, per class %): the share of real images whose nearest chosen image of their class is within their
    class's median real nearest-neighbour distance. Overall counts every real image once."""
    covered, per_class = 0, []
    for c in range(int(real_labels.max()) + 1):
        r, s = real[real_labels == c].double(), chosen[chosen_labels == c].double()
        if len(r) < 2 or len(s) == 0:
            per_class.append(float("nan"))
            continue
        own = torch.cdist(r, r)
        own.fill_diagonal_(float("inf"))
        radius = own.min(1).values.median()
        hits = int((torch.cdist(r, s).min(1).values <= radius).sum())
        covered += hits
        per_class.append(100.0 * hits / len(r))
    return 100.0 * covered / len(real), per_class


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (the matrix square root through the
    eigenvalues of sqrt(S_a) S_b sqrt(S_a), which stays real and symmetric)."""
    a, b = a.double().numpy(), b.double().numpy()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a = np.cov(a, rowvar=False) if len(a) > 1 else np.zeros((a.shape[1],) * 2)
    cov_b = np.cov(b, rowvar=False) if len(b) > 1 else np.zeros((b.shape[1],) * 2)
    root_a = _psd_sqrt(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    distance = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross
    return max(float(distance), 0.0)  # rounding can leave a tiny negative for two equal sets


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def set_scores(real: torch.Tensor, real_labels: torch.Tensor, chosen: torch.Tensor,
               chosen_labels: torch.Tensor) -> dict:
    """A set's coverage and Fréchet distance, overall and per class."""
    overall, per_class = coverage(real, real_labels, chosen, chosen_labels)
    classes = range(int(real_labels.max()) + 1)
    return {"coverage": overall, "coverage_per_class": per_class, "frechet": frechet(real, chosen),
            "frechet_per_class": [frechet(real[real_labels == c], chosen[chosen_labels == c]) for c in classes]}
