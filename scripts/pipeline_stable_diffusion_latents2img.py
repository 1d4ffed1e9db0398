"""Latents + prompts -> images: Stable Diffusion img2img that starts from a latent instead of an image."""
from __future__ import annotations

from typing import Optional, Union

import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

Generators = Union[torch.Generator, list[torch.Generator], None]


class StableDiffusionLatents2ImgPipeline(StableDiffusionImg2ImgPipeline):
    """Denoise (prototype) latents conditioned on text, as stock img2img does for a 4-channel `image`."""

    def _encode(
        self,
        prompt: Union[str, list[str], None],
        negative_prompt: Union[str, list[str], None],
        prompt_embeds: Optional[torch.Tensor],
        negative_prompt_embeds: Optional[torch.Tensor],
        batch_size: int,
        guidance: bool,
    ) -> torch.Tensor:
        """The UNet's text conditioning: [negative; positive] embeddings with guidance, else positive only."""
        if isinstance(prompt, str):
            prompt = [prompt] * batch_size
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * batch_size
        if prompt is not None and len(prompt) != batch_size:
            raise ValueError(f"got {len(prompt)} prompts for {batch_size} latents; pass one prompt per latent")
        positive, negative = self.encode_prompt(
            prompt,
            self._execution_device,
            1,
            guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        return torch.cat([negative, positive]) if guidance else positive

    def start_noise(self, latents: torch.Tensor, timestep: torch.Tensor, generator: Generators) -> torch.Tensor:
        """Noise clean latents to `timestep`; a list of generators draws each latent's noise independently."""
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        return self.scheduler.add_noise(latents, noise, timestep.repeat(latents.shape[0]))

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str], None] = None,
        latents: Optional[torch.Tensor] = None,
        negative_prompt: Union[str, list[str], None] = None,
        is_init: bool = True,
        strength: float = 0.75,
        guidance_scale: float = 8.0,
        num_inference_steps: int = 50,
        generator: Generators = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[StableDiffusionPipelineOutput, tuple]:
        """Generate one image per latent.

        `latents`: [B,4,h,w] scaled VAE latents. `is_init=True`: they are clean and get noised to the start
        timestep that `strength` picks; `is_init=False`: they are already noised to it (e.g. the
        `noisy_latents` of StableDiffusionGenLatentsPipeline). `prompt`: one string for all or one per
        latent; or pass precomputed `prompt_embeds` [B,77,D] (and `negative_prompt_embeds`).
        `generator`: one per latent for results that do not depend on the batch.
        """
        if latents is None or latents.ndim != 4:
            raise ValueError("latents must be a [batch, channels, height, width] tensor")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        self._guidance_scale = guidance_scale
        guidance = guidance_scale > 1
        device = self._execution_device
        embeds = self._encode(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, len(latents), guidance)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps, steps = self.get_timesteps(num_inference_steps, strength, device)
        if steps == 0:
            raise ValueError(f"strength {strength} leaves no denoising step of {num_inference_steps}; raise either")
        if is_init:
            # noised in float32 and only then cast, so fp16 runs do not round the clean prototype first
            latents = self.start_noise(latents.to(device=device, dtype=torch.float32), timesteps[:1], generator)
        latents = latents.to(device=device, dtype=embeds.dtype)

        step_kwargs = self.prepare_extra_step_kwargs(generator, 0.0)
        with self.progress_bar(total=len(timesteps)) as bar:
            for t in timesteps:
                model_input = torch.cat([latents] * 2) if guidance else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
                if guidance:
                    uncond, text = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (text - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                bar.update()
        return self._decode(latents, output_type, embeds.dtype, return_dict)

    def _decode(self, latents: torch.Tensor, output_type: str, dtype: torch.dtype, return_dict: bool):
        if output_type == "latent":
            images, nsfw = latents, None
        else:
            images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            images, nsfw = self.run_safety_checker(images, latents.device, dtype)
            denormalize = [True] * len(images) if nsfw is None else [not flagged for flagged in nsfw]
            images = self.image_processor.postprocess(images, output_type=output_type, do_denormalize=denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, nsfw
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw)
