"""Candidate selection for stage 2 (beyond D4M, after CaO2's first stage, arXiv 2506.22637): several candidates are
made per slot (class c, image j) and a teacher keeps, per class, those it classifies right:

  confidence  per slot, the right candidate the teacher is surest of (CaO2's rule);
  diverse     per class, a greedy k-center over the teacher's penultimate features among the right candidates,
              starting from the surest: confidence alone favours typical images, k-center spreads the kept ones.

Where fewer candidates than slots are right, the surest of the others fill the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from d4m.data import load_rgb
from d4m.labelcheck import eval_transform
from d4m.scores import features_and_logits

@dataclass
class Scored:
    """One class's candidates as the teacher sees them, in slot-major order (slot j's candidates are j*n .. j*n+n-1)."""
    confidence: torch.Tensor  # softmax probability of the class
    correct: torch.Tensor  # top-1 is the class
    features: torch.Tensor


@torch.no_grad()
def score_candidates(teacher: nn.Module, record: dict, paths: list[Path], label: int, device: torch.device) -> Scored:
    transform = eval_transform(record["input_size"], record["mean"], record["std"])
    images = torch.stack([transform(load_rgb(path)) for path in paths]).to(device)
    features, logits = features_and_logits(teacher.eval(), images)
    probabilities = logits.softmax(1)
    return Scored(probabilities[:, label].cpu(), (logits.argmax(1) == label).cpu(), features.cpu())


def keep_confident(scored: Scored, per_slot: int) -> list[int]:
    """Per slot, the right candidate with the highest confidence (the most confident one where none is right)."""
    rank = scored.confidence.double() + scored.correct.double()  # right ones first: a confidence is below 1
    return [j * per_slot + int(rank[j * per_slot:(j + 1) * per_slot].argmax())
            for j in range(len(rank) // per_slot)]


def keep_diverse(scored: Scored, keep: int) -> list[int]:
    """Greedy k-center over the right candidates' features: the surest first, then each time the candidate farthest
    from all kept so far."""
    order = torch.argsort(scored.confidence, descending=True, stable=True).tolist()
    right = [i for i in order if scored.correct[i]]
    if len(right) <= keep:
        return right + [i for i in order if not scored.correct[i]][:keep - len(right)]
    kept = [right[0]]
    feats = scored.features[right].double()
    nearest = torch.cdist(feats, feats[:1]).squeeze(1)
    while len(kept) < keep:
        far = int(nearest.argmax())
        kept.append(right[far])
        nearest = torch.minimum(nearest, torch.cdist(feats, feats[far:far + 1]).squeeze(1))
    return kept


def describe(scored: Scored, kept: list[int]) -> dict:
    """What a class's selection kept and why: counts, the kept images' mean confidence and their diversity (mean
    distance of each kept image to its nearest other kept image, in the teacher's feature space)."""
    feats = scored.features[kept].double()
    distances = torch.cdist(feats, feats)
    distances.fill_diagonal_(float("inf"))
    diversity = float(distances.min(1).values.mean()) if len(kept) > 1 else 0.0
    return {"made": len(scored.confidence), "right": int(scored.correct.sum()), "kept": len(kept),
            "kept_right": int(scored.correct[kept].sum()), "confidence": float(scored.confidence[kept].mean()),
            "diversity": diversity}
