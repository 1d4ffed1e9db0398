"""The pixels of FKD's augmented views: a crop box and a flip per view, resized to the input size.

Two sources give the views of a list of jobs (one job = the views one batch needs), each job prepared whole by
one worker, so that any worker count gives the same batches:
  * `PilViews`, the reference: every view decoded from its file, cropped and resized by PIL (bilinear, PIL's
    antialiased filter), flipped; the original's way.
  * `CropViews` (the default "tensor" loader): the image set is decoded once into host memory (`HostImages`:
    uint8, every image at its own size, shared between the processes of a machine where /dev/shm allows).
    Threads cut each view's crop out of it into pinned buffers; only those crops travel to the device, where a
    GPU resizes them all at once by a batched pair of matrix products with the antialiased bilinear weights PIL
    uses, the flip folded into the weights (the CPU resizes view by view). Device memory depends on the batch,
    never on the size of the set.
"""
from __future__ import annotations

import hashlib
import os
import queue
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from d4m.cli import UsageError
from d4m.data import IMAGE_ERRORS, image_error, load_rgb
from d4m.runtime import Progress, barrier, first_error

SHARED_MEMORY = Path("/dev/shm")
RESIZE_CHUNK = 256  # views resized per matrix product: bounds the device memory of a batch
Spec = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # image indices, crop fractions, flips of a job's views


def pixel_boxes(crops: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
    """Fraction boxes [k,4] and image sizes [k,2] -> integer top, left, height, width."""
    scale = torch.stack([hw[:, 0], hw[:, 1], hw[:, 0], hw[:, 1]], 1).double()
    return torch.round(crops.double() * scale).long()


def image_sizes(paths: Sequence[str]) -> np.ndarray:
    """[N,2] heights and widths, read from the file headers."""
    sizes = []
    for path in paths:
        try:
            with Image.open(path) as img:
                sizes.append((img.height, img.width))
        except IMAGE_ERRORS as err:
            raise UsageError(image_error(path, err)) from err
    return np.array(sizes, dtype=np.int64).reshape(-1, 2)


# ----------------------------------------------------------------------------- the PIL reference


class PilViews(Dataset):
    """Item j: job j's views as a float tensor [k,3,S,S] in [0,1], each decoded, cropped and resized by PIL."""

    def __init__(self, paths: Sequence[str], size: int):
        self.paths, self.size, self.specs = list(paths), size, []

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, j: int) -> torch.Tensor:
        index, crops, flips = self.specs[j]
        if len(index) == 0:
            return torch.empty(0, 3, self.size, self.size)
        return torch.stack([self.view(int(i), c, bool(f)) for i, c, f in zip(index, crops, flips)])

    def view(self, index: int, crop: torch.Tensor, flip: bool) -> torch.Tensor:
        img = load_rgb(self.paths[index])
        top, left, h, w = pixel_boxes(crop[None], torch.tensor([[img.height, img.width]]))[0].tolist()
        img = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BILINEAR)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)

    def finish(self, views: torch.Tensor, device: torch.device) -> torch.Tensor:
        return views.to(device, non_blocking=True)


# ----------------------------------------------------------------------------- the host cache


class _Decode(Dataset):
    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.array(load_rgb(self.paths[i]), dtype=np.uint8)


class HostImages:
    """Every image of a set in one flat uint8 buffer, each image [h,w,3] at its own size."""

    def __init__(self, data: np.ndarray, sizes: np.ndarray):
        self.data, self.sizes = data, sizes
        lengths = sizes[:, 0] * sizes[:, 1] * 3
        self.offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)

    @staticmethod
    def nbytes_of(sizes: np.ndarray) -> int:
        return int((sizes[:, 0] * sizes[:, 1]).sum() * 3)

    def image(self, i: int) -> np.ndarray:
        h, w = self.sizes[i]
        return self.data[self.offsets[i]:self.offsets[i] + h * w * 3].reshape(h, w, 3)

    def fill(self, paths: Sequence[str], workers: int, show: bool) -> None:
        """Decode every image into the buffer (DataLoader workers decode, this process copies)."""
        loader = DataLoader(_Decode(paths), batch_size=None, num_workers=workers)
        for i, image in enumerate(Progress(loader, "decoding images", 0 if show else 1, total=len(paths),
                                           unit="images")):
            if tuple(image.shape[:2]) != tuple(self.sizes[i]):
                raise UsageError(f"image {paths[i]} decodes to {tuple(image.shape[:2])} pixels but its header says "
                                 f"{tuple(self.sizes[i])}; re-save the file")
            self.data[self.offsets[i]:self.offsets[i] + image.numel()] = image.numpy().ravel()


def cache_sharing(sizes: np.ndarray, loader: str = "tensor") -> int:
    """How many processes will share the host cache: the processes of this machine under torchrun when every
    machine has room in /dev/shm for it, else 1 (each decodes its own; the PIL loader keeps no cache). A collective
    under torchrun."""
    if loader != "tensor":
        return 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world > 1 and dist.is_initialized() and _everyone(_shm_room(HostImages.nbytes_of(sizes))):
        return local_world
    return 1


def describe_cache(sizes: np.ndarray, shared_by: int, loader: str = "tensor") -> str:
    """The loader's part of a stage's first line."""
    if loader != "tensor":
        return "PIL loader"
    shared = f", shared by {shared_by} processes" if shared_by > 1 else ""
    return f"image cache {len(sizes)} images, {HostImages.nbytes_of(sizes) / 1e9:.2f} GB of host memory{shared}"


def load_host_images(paths: Sequence[str], sizes: np.ndarray, workers: int, rank: int, shared_by: int) -> HostImages:
    """Decode the set once into host memory, shared through /dev/shm by `shared_by` local processes."""
    if shared_by > 1:
        return _shared_host_images(paths, sizes, workers)
    images = HostImages(np.empty(HostImages.nbytes_of(sizes), np.uint8), sizes)
    images.fill(paths, workers, show=rank == 0)
    return images


def _shm_room(total: int) -> bool:
    try:
        stat = os.statvfs(SHARED_MEMORY)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize > total * 1.1 + 2**28


def _everyone(flag: bool) -> bool:
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, flag)
    return all(flags)


def _shared_host_images(paths: Sequence[str], sizes: np.ndarray, workers: int) -> HostImages:
    """Local rank 0 decodes into a /dev/shm file, the others map it, and the name is unlinked once all have
    it mapped (the memory lives on until the last process exits)."""
    run = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT", "0")
    digest = hashlib.sha256(os.fsencode("\n".join(paths))).hexdigest()[:12]
    name = SHARED_MEMORY / f"d4m-images-{run}-{digest}"
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    total = HostImages.nbytes_of(sizes)
    error = ""
    if first:
        tmp = name.with_name(name.name + f".tmp{os.getpid()}")
        try:
            buffer = np.memmap(tmp, np.uint8, "w+", shape=(total,))
            HostImages(buffer, sizes).fill(paths, workers, show=dist.get_rank() == 0)
            buffer.flush()
            del buffer
            os.replace(tmp, name)
        except UsageError as err:
            error = str(err)
            tmp.unlink(missing_ok=True)
    error = first_error(error, dist.get_world_size())
    if error:
        raise UsageError(error)
    images = HostImages(np.memmap(name, np.uint8, "r", shape=(total,)), sizes)
    barrier()
    if first:
        name.unlink()
    return images


# ----------------------------------------------------------------------------- crops resized on the device


class CropViews:
    """The tensor path: threads cut each job's crops out of the host images into reusable buffers (pinned on
    CUDA) while the device copies and resizes the previous jobs'; `views` yields them in order."""

    def __init__(self, images: HostImages, size: int):
        self.images, self.size = images, size

    def cut(self, spec: Spec, buffer: torch.Tensor | None, pin: bool):
        """(crops uint8 [k,hmax,wmax,3] in `buffer` (grown when too small), their sizes [k,2], flips [k], buffer).
        The padding beyond each crop is left as it is: its resampling weights are 0."""
        index, crops, flips = spec
        boxes = pixel_boxes(crops, torch.from_numpy(self.images.sizes[index.numpy()])).numpy()
        height, width = (int(boxes[:, 2].max()), int(boxes[:, 3].max())) if len(index) else (1, 1)
        need = len(index) * height * width * 3
        if buffer is None or buffer.numel() < need:
            buffer = torch.empty(need, dtype=torch.uint8, pin_memory=pin)
        out = buffer[:need].view(len(index), height, width, 3)
        array = out.numpy()
        for row, (i, (top, left, h, w)) in enumerate(zip(index.tolist(), boxes.tolist())):
            array[row, :h, :w] = self.images.image(i)[top:top + h, left:left + w]
        return out, torch.from_numpy(boxes[:, 2:].copy()), flips.bool(), buffer

    def resized(self, crops: torch.Tensor, sizes: torch.Tensor, flips: torch.Tensor,
                device: torch.device) -> torch.Tensor:
        crops = crops.to(device, non_blocking=True)
        return resize_crops(crops, sizes.to(device, non_blocking=True), flips.to(device, non_blocking=True), self.size)

    def views(self, specs: list[Spec], threads: int, device: torch.device) -> Iterator[torch.Tensor]:
        if threads == 0:
            for spec in specs:
                crops, sizes, flips, _ = self.cut(spec, None, pin=False)
                yield self.resized(crops, sizes, flips, device)
            return
        pin = device.type == "cuda"
        free: queue.SimpleQueue = queue.SimpleQueue()  # (buffer, event after which its copy is done)
        for _ in range(threads + 1):
            free.put((None, None))

        def cut_into_free(spec: Spec):
            buffer, copied = free.get()
            if copied is not None:
                copied.synchronize()
            return self.cut(spec, buffer, pin)

        pool = ThreadPoolExecutor(threads)
        try:
            pending = deque(pool.submit(cut_into_free, spec) for spec in specs[:threads])
            for j in range(len(specs)):
                crops, sizes, flips, buffer = pending.popleft().result()
                if j + threads < len(specs):
                    pending.append(pool.submit(cut_into_free, specs[j + threads]))
                views = self.resized(crops, sizes, flips, device)
                copied = None
                if pin:
                    copied = torch.cuda.Event()
                    copied.record()
                free.put((buffer, copied))  # on the CPU the resize above has already read the buffer
                yield views
        finally:
            for _ in range(threads):  # a consumer that stops early must not leave a thread waiting for a buffer
                free.put((None, None))
            pool.shutdown(wait=True, cancel_futures=True)


def resample_weights(lengths: torch.Tensor, out: int, span: int) -> torch.Tensor:
    """[k, out, span] weights of PIL's antialiased bilinear resampling from `lengths[i]` pixels to `out`: a
    triangle filter widened by the downscale factor, centred on each output pixel, cut at the input's end
    (columns from lengths[i] to span are zero) and normalised to sum 1."""
    scale = lengths.float() / out
    support = scale.clamp(min=1.0)
    centres = (torch.arange(out, device=lengths.device) + 0.5)[None] * scale[:, None]
    source = torch.arange(span, device=lengths.device) + 0.5
    weights = (1 - ((source[None, None] - centres[..., None]) / support[:, None, None]).abs()).clamp_(min=0)
    weights *= source[None, None] < lengths[:, None, None]
    return weights / weights.sum(-1, keepdim=True)


def resize_crops(crops: torch.Tensor, sizes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 crops [k,H,W,3] (the top-left sizes[i] of each is real) -> float views [k,3,size,size] in [0,1],
    horizontally flipped where `flips`, computed in float32 whatever autocast is active. On a GPU all views go
    through batched matrix products (one launch per chunk, not per view); on the CPU, where those products cost
    more than the crops themselves, each view is resized by torch's antialiased interpolation, which gives the
    same numbers (the tests compare the two)."""
    with torch.autocast(crops.device.type, enabled=False):
        if crops.device.type == "cpu":
            return resize_each(crops, sizes, flips, size)
        return resize_batched(crops, sizes, flips, size)


def resize_batched(crops: torch.Tensor, sizes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    views = []
    for part in range(0, len(crops), RESIZE_CHUNK):
        rows = slice(part, part + RESIZE_CHUNK)
        pixels = crops[rows].permute(0, 3, 1, 2).float()
        along_y = resample_weights(sizes[rows, 0], size, crops.shape[1])
        along_x = resample_weights(sizes[rows, 1], size, crops.shape[2])
        along_x = torch.where(flips[rows, None, None], along_x.flip(1), along_x)
        views.append(along_y[:, None] @ pixels @ along_x.transpose(1, 2)[:, None])
    if not views:
        return torch.empty(0, 3, size, size, device=crops.device)
    return torch.cat(views).div_(255)


def resize_each(crops: torch.Tensor, sizes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    views = torch.empty(len(crops), 3, size, size, device=crops.device)
    for i, ((h, w), flip) in enumerate(zip(sizes.tolist(), flips.tolist())):
        crop = crops[i, :h, :w].permute(2, 0, 1)[None].float()
        view = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        views[i] = view[0].flip(-1) if flip else view[0]
    return views.div_(255)


# ----------------------------------------------------------------------------- both sources


def build_source(loader: str, paths: Sequence[str], sizes: np.ndarray, size: int, workers: int,
                 rank: int = 0, shared_by: int = 1) -> PilViews | CropViews:
    if loader == "tensor":
        return CropViews(load_host_images(paths, sizes, workers, rank, shared_by), size)
    if loader == "pil":
        return PilViews(paths, size)
    raise UsageError(f"unknown --loader {loader!r}; choose tensor or pil")


def iterate_views(source: PilViews | CropViews, specs: list[Spec], workers: int,
                  device: torch.device) -> Iterator[torch.Tensor]:
    """Float [k,3,S,S] views of each job spec in order, on the device: the PIL path through DataLoader worker
    processes, the tensor path through `workers` threads (0: in this thread)."""
    if isinstance(source, CropViews):
        yield from source.views(specs, workers, device)
        return
    source.specs = specs
    loader = DataLoader(source, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda")
    for views in loader:
        yield source.finish(views, device)
