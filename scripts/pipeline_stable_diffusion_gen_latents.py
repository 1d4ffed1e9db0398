"""Images -> Stable Diffusion VAE latents (the posterior sample that D4M clusters into prototypes)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

Generators = Union[torch.Generator, list[torch.Generator], None]


@dataclass
class GenLatentsOutput(BaseOutput):
    """`latents`: scaled posterior samples [B,4,h,w]; `noisy_latents`: them noised to the img2img start (or None)."""

    latents: torch.Tensor
    noisy_latents: Optional[torch.Tensor] = None


class StableDiffusionGenLatentsPipeline(DiffusionPipeline):
    """Encode images with an SD checkpoint's VAE; loads only `vae` and `scheduler` from a full SD folder."""

    model_cpu_offload_seq = "vae"

    def __init__(self, vae: AutoencoderKL, scheduler: KarrasDiffusionSchedulers):
        super().__init__()
        self.register_modules(vae=vae, scheduler=scheduler)

    @staticmethod
    def to_tensor(images: Union[torch.Tensor, list[PIL.Image.Image]]) -> torch.Tensor:
        """PIL images or a [B,3,H,W] tensor in [0,1] -> a [B,3,H,W] float tensor in [0,1]."""
        if isinstance(images, torch.Tensor):
            return images[None] if images.ndim == 3 else images
        if isinstance(images, PIL.Image.Image):
            images = [images]
        arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    def start_timestep(self, strength: float, num_inference_steps: int) -> torch.Tensor:
        """The first timestep img2img denoises from, for `strength` and `num_inference_steps`."""
        self.scheduler.set_timesteps(num_inference_steps, device=self.vae.device)
        skipped = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
        if skipped >= num_inference_steps:
            raise ValueError(f"strength {strength} leaves no denoising step of {num_inference_steps}")
        return self.scheduler.timesteps[skipped * self.scheduler.order]

    @torch.no_grad()
    def __call__(
        self,
        images: Union[torch.Tensor, list[PIL.Image.Image]],
        generator: Generators = None,
        strength: Optional[float] = None,
        num_inference_steps: int = 50,
        return_dict: bool = True,
    ) -> Union[GenLatentsOutput, tuple]:
        """Encode `images` (values in [0,1]).

        `generator`: one per image (a list) so that an image's latent does not depend on its batch.
        `strength`: when given, also return the latents noised to img2img's start timestep for it.
        """
        device, dtype = self.vae.device, self.vae.dtype
        # non-blocking: a pinned batch (DataLoader pin_memory) is copied while the GPU is still busy
        pixels = self.to_tensor(images).to(device=device, non_blocking=True).to(dtype) * 2 - 1
        posterior = self.vae.encode(pixels).latent_dist
        eps = randn_tensor(posterior.mean.shape, generator=generator, device=device, dtype=posterior.mean.dtype)
        latents = (posterior.mean + posterior.std * eps) * self.vae.config.scaling_factor
        noisy = None
        if strength is not None:
            timestep = self.start_timestep(strength, num_inference_steps).repeat(latents.shape[0])
            noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
            noisy = self.scheduler.add_noise(latents, noise, timestep)
        if not return_dict:
            return latents, noisy
        return GenLatentsOutput(latents=latents, noisy_latents=noisy)
