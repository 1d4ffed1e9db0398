"""Stage 1's encoding: training images -> Stable Diffusion VAE latents, class after class.

Each class's images are encoded in the order of a permutation seeded by (seed, class), in batches that never
cross a class, and each latent is a posterior sample drawn with a generator seeded by (seed, class, image): a
class's latents depend on nothing but the seed, whatever the batch size or the number of processes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from d4m.cli import UsageError
from d4m.device import memory_format
from d4m.runtime import Progress, seeded_generator

if TYPE_CHECKING:
    from scripts.pipeline_stable_diffusion_gen_latents import StableDiffusionGenLatentsPipeline


class ResizedImages(Dataset):
    """Items {image uint8 [3,size,size], index, error}: resized by workers, sent to the device as bytes (a
    quarter of float32's) and scaled to [0,1] there. An unreadable file gives its error, not an exception,
    because exceptions raised in DataLoader workers reach the main process wrapped in a multi-line report."""

    def __init__(self, base: Dataset, size: int):
        self.base = base
        self.size = size
        from torchvision import transforms

        self.resize = transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        try:
            image, _ = self.base[index]
            pixels = torch.from_numpy(np.array(self.resize(image), dtype=np.uint8)).permute(2, 0, 1)
            return {"image": pixels, "index": index, "error": ""}
        except UsageError as err:
            return {"image": torch.zeros(3, self.size, self.size, dtype=torch.uint8), "index": index, "error": str(err)}


def class_indices(targets: list[int], num_classes: int) -> list[list[int]]:
    members: list[list[int]] = [[] for _ in range(num_classes)]
    for index, label in enumerate(targets):
        members[int(label)].append(index)
    return members


def shuffled(indices: list[int], seed: int, label: int) -> list[int]:
    """A class's images in the order they are encoded: a permutation seeded by (seed, class) only."""
    order = torch.randperm(len(indices), generator=seeded_generator(seed, label)).tolist()
    return [indices[i] for i in order]


def class_batches(members: list[list[int]], classes: list[int], seed: int, batch_size: int) -> list[list[int]]:
    """Batches of dataset indices, class after class, never crossing a class boundary."""
    batches = []
    for label in classes:
        order = shuffled(members[label], seed, label)
        batches += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches


def encoded_classes(encode: Callable[[torch.Tensor, list], torch.Tensor], loader: DataLoader, labels: dict[int, int],
                    seed: int, device: torch.device, bar: Progress) -> Iterator[tuple[int, torch.Tensor]]:
    """(class, all its latents [n, 4, h, w] on the CPU in encoding order), each as soon as the class's last batch
    is encoded (the loader's batches come class after class); the device is waited for once per class."""
    pending: list[torch.Tensor] = []
    current = -1
    for batch in loader:
        errors = [e for e in batch["error"] if e]
        if errors:
            raise UsageError(errors[0])
        indices = batch["index"].tolist()
        label = labels[indices[0]]
        if pending and label != current:
            yield current, torch.cat(pending).float().cpu()
            pending = []
        current = label
        pixels = batch["image"].to(device, non_blocking=True).float().div_(255)
        pending.append(encode(pixels, [seeded_generator(seed, label, i) for i in indices]))
        bar.update()
    if pending:
        yield current, torch.cat(pending).float().cpu()


def latent_encoder(pipe: "StableDiffusionGenLatentsPipeline", batch_size: int,
                   compiled: bool) -> Callable[[torch.Tensor, list], torch.Tensor]:
    """pixels [n,3,S,S] in [0,1] + one generator per image -> latents; with a compiled encoder every call is
    padded to `batch_size` images (one compiled shape), the padding's latents dropped."""

    def encode(pixels: torch.Tensor, generators: list) -> torch.Tensor:
        n = len(pixels)
        if compiled and n < batch_size:
            pixels = torch.cat([pixels, pixels.new_zeros(batch_size - n, *pixels.shape[1:])])
            generators = generators + [seeded_generator(0, n + i) for i in range(batch_size - n)]
        return pipe(pixels.contiguous(memory_format=memory_format(pixels.device)), generator=generators).latents[:n]

    return encode


def latent_shape(pipe: "StableDiffusionGenLatentsPipeline", size: int) -> tuple[int, int, int]:
    """The VAE's latent of a size x size image: channels and the side after its downsampling blocks."""
    config = pipe.vae.config
    side = size // 2 ** (len(config.block_out_channels) - 1)
    return config.latent_channels, side, side
