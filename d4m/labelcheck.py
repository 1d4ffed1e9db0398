"""The label-order check run before matching: do the synthetic folders, their prompts, the real validation
folders and the teacher agree on which class is which?

A teacher that labels the synthetic images' folders (or the real validation folders) at about chance, or whose
class names differ from those recorded beside the synthetic set (classes.json), means that one of them is in
another class order; hours of matching and training would then teach the student noise.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

from d4m.cli import UsageError, printable
from d4m.data import ImageFolderDataset, read_class_list
from d4m.device import autocast, eval_batch, memory_format


def floor(classes: int) -> float:
    """The agreement (%) under which the class orders are taken to differ: three times chance, or halfway from
    chance to 100 % where three times chance would be more than that (few classes)."""
    chance = 100 / classes
    return min(3 * chance, (100 + chance) / 2)


def eval_transform(input_size: int, mean, std):
    """The validation transform of train_FKD.py: resize (by 256/224 at ImageNet sizes), centre crop, normalise."""
    resize = int(input_size * 256 / 224) if input_size >= 224 else input_size
    return T.Compose([T.Resize(resize), T.CenterCrop(input_size), T.ToTensor(), T.Normalize(mean, std)])


@torch.no_grad()
def per_class_top1(teacher: nn.Module, data: Dataset, classes: int, device: torch.device, amp,
                   workers: int) -> torch.Tensor:
    """[classes] top-1 of `teacher` on `data`'s images of each class, in % (NaN for a class without images)."""
    hits, counts = torch.zeros(classes), torch.zeros(classes)
    for images, labels in DataLoader(data, batch_size=eval_batch(device), num_workers=workers):
        with autocast(device, amp):
            logits = teacher(images.to(device).contiguous(memory_format=memory_format(device)))
        right = (logits.float().argmax(1).cpu() == labels).float()
        hits.index_add_(0, labels, right)
        counts.index_add_(0, labels, torch.ones_like(right))
    return 100 * hits / counts


def name_mismatch(teacher_names: Optional[list[str]], class_list: Optional[list[dict]]) -> Optional[str]:
    """A message when the teacher's class names disagree with classes.json's for most classes, else None.
    A teacher name agrees with a class when it is that class's name or appears in its prompt."""
    if not teacher_names or not class_list:
        return None

    def agrees(teacher_name: str, row: dict) -> bool:
        name, prompt = teacher_name.lower(), (row.get("prompt") or "").lower()
        return name == str(row["name"]).lower() or (bool(prompt) and name in prompt)

    pairs = list(zip(teacher_names, class_list))
    agreeing = [agrees(name, row) for name, row in pairs]
    if sum(agreeing) >= len(pairs) / 2:
        return None
    c = agreeing.index(False)
    return (f"class {c} is {teacher_names[c]!r} for the teacher but {class_list[c]['name']!r} "
            f"({class_list[c].get('prompt')!r}) beside the synthetic images; only {sum(agreeing)} of {len(pairs)} "
            "class names agree")


def check(synthetic: torch.Tensor, real: Optional[float], names: Optional[str], classes: int) -> None:
    """Stop with one line when the figures say the class orders differ."""
    least = floor(classes)
    skip = "; if the order is right, rerun with --no-label-check"
    if names:
        raise UsageError(f"label check: {names}{skip}")
    if real is not None and real < least:
        raise UsageError(f"label check: the teacher gets {real:.1f}% on the real validation split "
                         f"(chance {100 / classes:.1f}%): its class order differs from the validation folders' "
                         f"(or it is untrained){skip}")
    if float(synthetic.nanmean()) < least:
        raise UsageError(f"label check: the teacher agrees with the synthetic images' folders on "
                         f"{float(synthetic.nanmean()):.1f}% of them (chance {100 / classes:.1f}%): the folders are "
                         f"not in the teacher's class order{skip}")


def report(synthetic: torch.Tensor, real: Optional[float], recorded: bool, class_names: list[str], classes: int) -> str:
    """One line: the two agreements and the weakest classes on the synthetic images."""
    parts = [f"{float(synthetic.nanmean()):.1f}% agreement with the synthetic images' folders"]
    if real is not None:
        parts.insert(0, f"teacher top-1 {real:.1f}% on the real validation split" +
                     (" (recorded in the teacher file)" if recorded else ""))
    weakest = synthetic.nan_to_num(101).argsort()[:3].tolist()
    low = ", ".join(f"{printable(class_names[c])} {float(synthetic[c]):.0f}%" for c in weakest)
    return f"label check: {', '.join(parts)} (chance {100 / classes:.1f}%); weakest synthetic classes: {low}"


def run(teacher: nn.Module, record: dict, root: str, synthetic: ImageFolderDataset, real: Dataset | None,
        device: torch.device, amp: torch.dtype | None, workers: int, recorded_real: float | None = None) -> dict:
    """Score the teacher per class on the synthetic images of `root` (and the real validation split when given;
    `recorded_real` instead: its top-1 there, recorded when it was trained), both transformed by `eval_transform`,
    compare its class names with classes.json, print one line, and stop when the class orders look different."""
    classes = len(synthetic.classes)
    class_list = read_class_list(root)
    if class_list is not None and [row["folder"] for row in class_list] != synthetic.classes:
        raise UsageError(f"{root}/classes.json lists other class folders than {root} holds; regenerate "
                         "the set or remove classes.json")
    synthetic_top1 = per_class_top1(teacher, synthetic, classes, device, amp, workers)
    real_top1 = None
    if real is not None:
        if len(real.classes) != classes:
            raise UsageError(f"the validation split has {len(real.classes)} classes but {root} has {classes}")
        real_top1 = per_class_top1(teacher, real, classes, device, amp, workers)
    real_mean = float(real_top1.nanmean()) if real_top1 is not None else recorded_real
    check(synthetic_top1, real_mean, name_mismatch(record.get("classes"), class_list), classes)
    names = [str(row["name"]) for row in class_list] if class_list else synthetic.classes
    print(report(synthetic_top1, real_mean, real_top1 is None, names, classes), flush=True)
    return {"class_names": names, "synthetic_top1": synthetic_top1.tolist(),
            "real_top1": None if real_top1 is None else real_top1.tolist(), "recorded_real_top1": recorded_real,
            "teacher": record["arch"]}
