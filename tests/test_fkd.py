"""FKD augmentation plans, the two view paths, and the top-K soft-label rebuild."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder
from d4m import fkd
from d4m.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset
from d4m.runtime import UsageError


pytestmark = pytest.mark.usefixtures("one_thread")


def plan_for(n: int = 12, mix: str = "cutmix", epoch: int = 0, hw=(32, 32)) -> fkd.EpochPlan:
    return fkd.draw_epoch(42, epoch, np.tile(np.array(hw), (n, 1)), 5, 32, mix, 0.8, 1.0, (0.08, 1.0))


def test_plan_depends_only_on_seed_and_epoch():
    a, b, c = plan_for(), plan_for(), plan_for(epoch=1)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values()))
    assert not torch.equal(a.order, c.order)
    assert sorted(a.order.tolist()) == list(range(12)) and a.num_batches == 3
    top, left, h, w = a.crops.unbind(1)
    assert (h > 0).all() and (w > 0).all() and (top + h <= 1).all() and (left + w <= 1).all()
    for bi in range(a.num_batches):
        start, end = a.bounds(bi)
        assert sorted(a.perm[start:end].tolist()) == list(range(end - start))
    y1, x1, y2, x2 = a.box.unbind(1)
    assert ((0 <= y1) & (y1 <= y2) & (y2 <= 32) & (0 <= x1) & (x1 <= x2) & (x2 <= 32)).all()
    none = plan_for(mix="None")
    assert (none.lam == 1).all() and torch.equal(none.perm[:5], torch.arange(5))


def test_crops_are_whole_pixels_of_each_image():
    plan = plan_for(hw=(40, 56))
    boxes = fkd.pixel_boxes(plan.crops, torch.tensor([[40, 56]]).expand(12, 2))
    back = boxes.double() / torch.tensor([40, 56, 40, 56], dtype=torch.float64)
    assert torch.allclose(back, plan.crops, atol=1e-12)


def test_topk_rebuild():
    logits = torch.tensor([[5.0, 1.0, 3.0, -1.0, 0.0], [0.0, 2.0, 2.5, 9.0, -4.0]])
    parts = fkd.topk_compress(logits, 2)
    assert parts["topk_indices"].dtype == torch.int16
    rebuilt = fkd.topk_rebuild(parts["topk_values"], parts["topk_indices"], parts["rest_mean"], 5)
    expected = torch.tensor([[5.0, 0.0, 3.0, 0.0, 0.0], [-2 / 3, -2 / 3, 2.5, 9.0, -2 / 3]])
    assert torch.allclose(rebuilt, expected)
    assert torch.allclose(fkd.keep_topk(logits, 2), expected)
    assert fkd.keep_topk(logits, 5) is logits and fkd.keep_topk(logits, 1000) is logits
    # the row mean is kept exactly
    assert torch.allclose(rebuilt.mean(1), logits.mean(1))


def test_packed_indices_round_trip():
    for classes in (2, 10, 1000, 40000):
        indices = torch.randint(classes, (7, 5), generator=torch.Generator().manual_seed(classes))
        packed = fkd.pack_indices(indices, classes)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-7 * 5 * fkd.index_bits(classes) // 8)
        assert torch.equal(fkd.unpack_indices(packed, 7, 5, classes), indices)


def test_compact_plan_replays_the_same_pixel_boxes():
    plan = plan_for(hw=(223, 517))
    compact = fkd.compact_plan(plan)
    hw = torch.tensor([[223, 517]]).expand(12, 2)
    assert torch.equal(fkd.pixel_boxes(compact["crops"].double(), hw), fkd.pixel_boxes(plan.crops, hw))
    assert torch.equal(compact["perm"].long(), plan.perm) and compact["perm"].dtype == torch.int16


def views_of(loader: str, data, plan, jobs, workers=0):
    paths = [p for p, _ in data.samples]
    hw = fkd.image_sizes(paths)
    source = fkd.build_source(loader, paths, hw, 32, 0, torch.device("cpu"))
    return [x for _, x in fkd.replay_batches(plan, jobs, loader, source, workers, torch.device("cpu"),
                                             IMAGENET_MEAN, IMAGENET_STD, "cutmix")]


def test_worker_count_gives_same_batches(tmp_path):
    data = ImageFolderDataset(make_image_folder(tmp_path, 3, 4, 32) / "train")
    plan = plan_for()
    jobs = [fkd.make_job(plan, b) for b in range(plan.num_batches)]
    zero, two = views_of("pil", data, plan, jobs, 0), views_of("pil", data, plan, jobs, 2)
    assert all(torch.equal(a, b) for a, b in zip(zero, two))


def test_pil_and_tensor_paths_differ_only_by_resize(tmp_path, capsys):
    data = ImageFolderDataset(make_image_folder(tmp_path, 3, 4, 32) / "train")
    plan = plan_for()
    jobs = [fkd.make_job(plan, b) for b in range(plan.num_batches)]
    pil, tensor = views_of("pil", data, plan, jobs), views_of("tensor", data, plan, jobs)
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    diff = max(float(((a - b) * std).abs().max()) for a, b in zip(pil, tensor))  # in [0,1] pixel units
    mean_diff = float(torch.cat([((a - b) * std).abs().flatten() for a, b in zip(pil, tensor)]).mean())
    with capsys.disabled():
        print(f"\nPIL vs tensor path, one epoch of 32 px views: max |diff| {diff:.4f}, mean {mean_diff:.4f} (pixel range 0..1)")
    assert mean_diff < 0.05 and diff < 0.5


def test_tensor_cache_needs_one_size(tmp_path):
    root = make_image_folder(tmp_path, 2, 2, 32) / "train"
    Image.new("RGB", (40, 32)).save(root / "class0" / "odd.png")
    paths = [p for p, _ in ImageFolderDataset(root).samples]
    with pytest.raises(UsageError, match="one size"):
        fkd.build_source("tensor", paths, fkd.image_sizes(paths), 32, 0, torch.device("cpu"))
