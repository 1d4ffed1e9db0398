"""FKD augmentation plans, the two view paths, and the top-K soft-label rebuild."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder
from d4m import fkd, labelcodec, store, views
from d4m.cli import LOADERS
from d4m.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset


pytestmark = pytest.mark.usefixtures("one_thread")


def plan_for(n: int = 12, mix: str = "cutmix", epoch: int = 0, hw=(32, 32)) -> fkd.EpochPlan:
    return fkd.draw_epoch(42, epoch, np.tile(np.array(hw), (n, 1)), 5, 32, mix)


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
    boxes = views.pixel_boxes(plan.crops, torch.tensor([[40, 56]]).expand(12, 2))
    back = boxes.double() / torch.tensor([40, 56, 40, 56], dtype=torch.float64)
    assert torch.allclose(back, plan.crops, atol=1e-12)


def test_topk_rebuild():
    logits = torch.tensor([[5.0, 1.0, 3.0, -1.0, 0.0], [0.0, 2.0, 2.5, 9.0, -4.0]])
    parts = labelcodec.topk_compress(logits, 2)
    assert parts["topk_indices"].dtype == torch.int16
    rebuilt = labelcodec.topk_rebuild(parts["topk_values"], parts["topk_indices"], parts["rest_mean"], 5)
    expected = torch.tensor([[5.0, 0.0, 3.0, 0.0, 0.0], [-2 / 3, -2 / 3, 2.5, 9.0, -2 / 3]])
    assert torch.allclose(rebuilt, expected)
    assert torch.allclose(labelcodec.keep_topk(logits, 2), expected)
    assert labelcodec.keep_topk(logits, 5) is logits and labelcodec.keep_topk(logits, 1000) is logits
    # the row mean is kept exactly
    assert torch.allclose(rebuilt.mean(1), logits.mean(1))


def test_packed_indices_round_trip():
    for classes in (2, 10, 1000, 40000):
        indices = torch.randint(classes, (7, 5), generator=torch.Generator().manual_seed(classes))
        packed = labelcodec.pack_indices(indices, classes)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-7 * 5 * labelcodec.index_bits(classes) // 8)
        assert torch.equal(labelcodec.unpack_indices(packed, 7, 5, classes), indices)


def test_compact_plan_replays_the_same_pixel_boxes():
    plan = plan_for(hw=(223, 517))
    compact = store.compact_plan(plan)
    hw = torch.tensor([[223, 517]]).expand(12, 2)
    assert torch.equal(views.pixel_boxes(compact["crops"].double(), hw), views.pixel_boxes(plan.crops, hw))
    assert torch.equal(compact["perm"].long(), plan.perm) and compact["perm"].dtype == torch.int16


def views_of(loader: str, data, plan, jobs, workers=0):
    paths = [p for p, _ in data.samples]
    source = views.build_source(loader, paths, views.image_sizes(paths), 32, 0)
    meta = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "mix_type": "cutmix"}
    return [x for _, x in fkd.replay_batches(plan, jobs, source, workers, torch.device("cpu"), meta)]


@pytest.mark.parametrize("loader", LOADERS)
def test_worker_count_gives_same_batches(tmp_path, loader):
    data = ImageFolderDataset(make_image_folder(tmp_path, 3, 4, 32) / "train")
    plan = plan_for()
    jobs = [fkd.make_job(plan, b) for b in range(plan.num_batches)]
    zero, two = views_of(loader, data, plan, jobs, 0), views_of(loader, data, plan, jobs, 2)
    assert all(torch.equal(a, b) for a, b in zip(zero, two))


def test_tensor_views_can_stop_early(tmp_path):
    """A consumer that stops after the first batch (an error, an interrupt) does not leave threads waiting: closing
    the stream returns, and no thread it started is left alive (checked with a deadline, so a leak fails the test
    rather than hanging it)."""
    before = set(threading.enumerate())
    data = ImageFolderDataset(make_image_folder(tmp_path, 3, 4, 32) / "train")
    paths = [p for p, _ in data.samples]
    source = views.build_source("tensor", paths, views.image_sizes(paths), 32, 0)
    plan = plan_for()
    specs = [fkd.job_spec(plan, fkd.make_job(plan, b)) for b in range(plan.num_batches)]
    stream = views.iterate_views(source, specs, 1, torch.device("cpu"))
    assert next(stream).shape == (5, 3, 32, 32)
    closer = threading.Thread(target=stream.close, daemon=True)
    closer.start()
    closer.join(timeout=30)
    assert not closer.is_alive(), "closing the view stream hangs"
    deadline = time.monotonic() + 30
    while any(t.is_alive() for t in set(threading.enumerate()) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]


def pixel_difference(pil: list[torch.Tensor], tensor: list[torch.Tensor]) -> tuple[float, float]:
    """Max and mean |difference| of normalised views, in pixel units of 0..1."""
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    diffs = torch.cat([((a - b) * std).abs().flatten() for a, b in zip(pil, tensor)])
    return float(diffs.max()), float(diffs.mean())


def test_pil_and_tensor_paths_differ_by_at_most_one_level(tmp_path, capsys):
    data = ImageFolderDataset(make_image_folder(tmp_path, 3, 4, 32) / "train")
    plan = plan_for()
    jobs = [fkd.make_job(plan, b) for b in range(plan.num_batches)]
    worst, mean = pixel_difference(views_of("pil", data, plan, jobs), views_of("tensor", data, plan, jobs))
    with capsys.disabled():
        print(f"\nPIL vs tensor path, one epoch of 32 px views: max |diff| {worst:.4f}, mean {mean:.4f} (pixel range 0..1)")
    assert worst <= 1 / 255 + 1e-5 and mean < 0.002


def test_mixed_size_images_replay_like_pil(tmp_path):
    """A folder of images of several sizes is valid input for both loaders, and they agree."""
    root = tmp_path / "train"
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(32, 32), (40, 28), (17, 50), (64, 48), (31, 33), (45, 45)]):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    data = ImageFolderDataset(root)
    paths = [p for p, _ in data.samples]
    plan = fkd.draw_epoch(42, 0, views.image_sizes(paths), 4, 32)
    jobs = [fkd.make_job(plan, b) for b in range(plan.num_batches)]
    worst, _ = pixel_difference(views_of("pil", data, plan, jobs), views_of("tensor", data, plan, jobs))
    assert worst <= 1 / 255 + 1e-5


@pytest.mark.parametrize("height,width,size", [(32, 32, 32), (7, 13, 32), (224, 224, 224), (300, 500, 224),
                                               (100, 37, 64), (5, 5, 48)])
def test_batched_resize_equals_torch_antialiased_interpolate(height, width, size):
    """The GPU's batched products and the CPU's per-view path both give torch's own antialiased bilinear resize
    of the crop (+ flip), whatever padding surrounds the crop."""
    gen = torch.Generator().manual_seed(height * width)
    crop = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    padded = torch.randint(0, 256, (2, height + 7, width + 3, 3), generator=gen, dtype=torch.uint8)
    padded[:, :height, :width] = crop
    reference = torch.nn.functional.interpolate(crop.permute(2, 0, 1)[None].float(), size=(size, size),
                                                mode="bilinear", antialias=True, align_corners=False) / 255
    for resize in (views.resize_batched, views.resize_each, views.resize_crops):
        out = resize(padded, torch.tensor([[height, width]] * 2), torch.tensor([False, True]), size)
        torch.testing.assert_close(out[0], reference[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1], reference[0].flip(-1), atol=1e-5, rtol=0)


def test_host_cache_holds_every_image_at_its_own_size(tmp_path):
    root = tmp_path / "train" / "a"
    root.mkdir(parents=True)
    pictures = [np.full((h, w, 3), i * 40, np.uint8) for i, (h, w) in enumerate([(4, 6), (9, 2), (3, 3)])]
    for i, picture in enumerate(pictures):
        Image.fromarray(picture).save(root / f"{i}.png")
    paths = [p for p, _ in ImageFolderDataset(tmp_path / "train").samples]
    sizes = views.image_sizes(paths)
    images = views.load_host_images(paths, sizes, workers=0, rank=0, shared_by=1)
    assert images.data.nbytes == views.HostImages.nbytes_of(sizes) == (24 + 18 + 9) * 3
    assert all(np.array_equal(images.image(i), picture) for i, picture in enumerate(pictures))
    assert views.describe_cache(sizes, 1) == "image cache 3 images, 0.00 GB of host memory"


def test_both_paths_equal_torchvision_resized_crop_of_the_same_box(tmp_path):
    """An independent reference: torchvision's resized_crop (+ hflip) on each view's pixel box. The PIL path is
    PIL's own resize of the box (exactly torchvision's on a PIL image); the tensor path is within one 8-bit level."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    data = ImageFolderDataset(make_image_folder(tmp_path, 3, 4, 40) / "train")
    paths = [p for p, _ in data.samples]
    sizes = views.image_sizes(paths)
    plan = fkd.draw_epoch(7, 0, sizes, 5, 32)
    specs = [fkd.job_spec(plan, fkd.make_job(plan, b)) for b in range(plan.num_batches)]
    got = {loader: torch.cat(list(views.iterate_views(views.build_source(loader, paths, sizes, 32, 0), specs, 0,
                                                      torch.device("cpu"))))
           for loader in LOADERS}
    rows = 0
    for index, crops, flips in specs:
        boxes = views.pixel_boxes(crops, torch.from_numpy(sizes[index.numpy()]))
        for i, (top, left, h, w), flip in zip(index.tolist(), boxes.tolist(), flips.tolist()):
            image = Image.open(paths[i]).convert("RGB")
            ref = TF.resized_crop(image, top, left, h, w, [32, 32], InterpolationMode.BILINEAR)
            ref = TF.to_tensor(TF.hflip(ref) if flip else ref)
            assert torch.equal(got["pil"][rows], ref)
            assert float((got["tensor"][rows] - ref).abs().max()) <= 1 / 255 + 1e-6
            rows += 1
    assert rows == len(got["tensor"]) == 12


def test_mixes_follow_the_original_formulas():
    """CutMix pastes the partner's box into each image, MixUp blends lam and 1 - lam, written out here as the
    original's batch code does them; and a CutMix box is the original's rand_bbox for the same draws."""
    plan = plan_for(n=10, mix="cutmix")
    batch = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    job = fkd.make_job(plan, 0)
    perm = plan.perm[:5]
    y1, x1, y2, x2 = plan.box[0].tolist()
    expected = batch.clone()
    expected[:, :, y1:y2, x1:x2] = batch[perm][:, :, y1:y2, x1:x2]
    assert torch.equal(fkd.mix_rows(batch, plan, job, "cutmix"), expected)
    mixup = plan_for(n=10, mix="mixup")
    lam = float(mixup.lam[0])
    torch.testing.assert_close(fkd.mix_rows(batch, mixup, fkd.make_job(mixup, 0), "mixup"),
                               lam * batch + (1 - lam) * batch[mixup.perm[:5]])
    for seed, lam in ((0, 0.3), (1, 0.9), (2, 0.01)):
        rng = np.random.default_rng(seed)
        cut = int(32 * np.sqrt(1.0 - lam))  # the original: cut_rat = sqrt(1 - lam), side = int(size * cut_rat)
        reference_rng = np.random.default_rng(seed)
        cy, cx = int(reference_rng.integers(32)), int(reference_rng.integers(32))
        expected_box = [int(np.clip(cy - cut // 2, 0, 32)), int(np.clip(cx - cut // 2, 0, 32)),
                        int(np.clip(cy + cut // 2, 0, 32)), int(np.clip(cx + cut // 2, 0, 32))]
        assert fkd.cutmix_box(rng, lam, 32) == expected_box


def test_int8_rows_come_back_within_half_a_step():
    logits = torch.randn(50, 1000, generator=torch.Generator().manual_seed(0)) * 4
    logits[3] = 2.5  # a constant row
    parts = labelcodec.quantize_rows(logits)
    assert parts["logits_q"].dtype == torch.uint8 and parts["logits_q"].shape == (50, 1000)
    back = labelcodec.dequantize_rows(parts["logits_q"], parts["logits_min"], parts["logits_step"])
    error = (back - logits).abs().max(1).values
    assert bool((error <= parts["logits_step"] / 2 + 1e-5).all()) and float(error[3]) == 0
    assert float(parts["logits_step"][0]) == pytest.approx(float(logits[0].max() - logits[0].min()) / 255)
