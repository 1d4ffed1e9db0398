"""Noise -> images with a Stable Diffusion checkpoint under text prompts, through the checkpoint's or another
single-step scheduler; with MGD3's mode guidance (Chan-Santiago et al., ICML 2025) and, the other way, DDIM
inversion (D3HR, Zhao et al., ICML 2025). The pipeline of D4M's successors (distillation/gen_mgd3.py, gen_d3hr.py,
gen_cao2.py)."""
from __future__ import annotations

from typing import Optional, Union

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

Generators = Union[torch.Generator, list[torch.Generator], None]

# Schedulers whose step maps x_t to x_prev in the variance-preserving parametrisation with one model call and no
# hidden state, so that a displacement added to the step's result is where the next step starts. PNDM keeps its
# first step's input and discards such a displacement; Euler-type schedulers hold x_t scaled by sqrt(1 + sigma^2).
GUIDABLE_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")


def check_guidable(scheduler) -> None:
    """Raise ValueError (one line) for a scheduler that mode guidance cannot steer."""
    name = type(scheduler).__name__
    if name not in GUIDABLE_SCHEDULERS:
        raise ValueError(f"mode guidance cannot steer {name}: it needs a single-step variance-preserving scheduler "
                         f"({', '.join(GUIDABLE_SCHEDULERS)})")
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"mode guidance cannot read the clean latent from prediction_type "
                         f"{scheduler.config.prediction_type!r}")


def alpha_bar(scheduler, t: Union[int, torch.Tensor]) -> torch.Tensor:
    """ᾱ_t of the scheduler's training schedule, in float64; 1 (a clean latent) below timestep 0."""
    return scheduler.alphas_cumprod[int(t)].double() if int(t) >= 0 else torch.tensor(1.0, dtype=torch.float64)


def split_prediction(kind: str, sample: torch.Tensor, output: torch.Tensor,
                     a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) in float64 from a model output of `kind` (a scheduler's prediction_type) for a sample at level ᾱ = a."""
    x, out = sample.double(), output.double()
    if kind == "epsilon":
        return (x - (1 - a).sqrt() * out) / a.sqrt(), out
    if kind == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * out, (1 - a).sqrt() * x + a.sqrt() * out
    return out, (x - a.sqrt() * out) / (1 - a).sqrt()


def predicted_clean(scheduler, sample: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x̂0: the clean latent that the model's output at timestep t implies, by the scheduler's prediction_type."""
    kind = scheduler.config.prediction_type
    return split_prediction(kind, sample, model_output, alpha_bar(scheduler, t))[0].float()


def stochastic_sigma(scheduler, index: int) -> float:
    """σ of a DDPM (ancestral) step from timesteps[index] to the next timestep of the schedule (a clean latent after
    the last): sqrt((1 - ᾱ_prev) / (1 - ᾱ_t) * (1 - ᾱ_t / ᾱ_prev)), the posterior standard deviation that MGD3
    scales its guidance by. It depends on the schedule only, not on the scheduler's own step."""
    steps = scheduler.timesteps
    a = alpha_bar(scheduler, steps[index])
    a_prev = alpha_bar(scheduler, steps[index + 1]) if index + 1 < len(steps) else torch.tensor(1.0, dtype=torch.float64)
    return float(((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp_min(0).sqrt())


class StableDiffusionSamplerPipeline(StableDiffusionPipeline):
    """Sample from given starting noise (one generator per image keeps each image independent of its batch)."""

    def _conditioning(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: Optional[torch.Tensor],
                      guidance_scale: float) -> torch.Tensor:
        return torch.cat([negative_prompt_embeds, prompt_embeds]) if guidance_scale > 1 else prompt_embeds

    def model_output(self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                     guidance_scale: float) -> torch.Tensor:
        """The UNet's prediction at timestep t with classifier-free guidance (embeds [negative; positive])."""
        guided = guidance_scale > 1
        model_input = self.scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        output = self.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
        if not guided:
            return output
        uncond, text = output.chunk(2)
        return uncond + guidance_scale * (text - uncond)

    @torch.no_grad()
    def __call__(
        self,
        prompt_embeds: torch.Tensor,
        latents: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        guidance_scale: float = 4.0,
        num_inference_steps: int = 50,
        start_step: int = 0,
        generator: Generators = None,
        modes: Optional[torch.Tensor] = None,
        mode_scale: float = 0.0,
        mode_stop: int = 0,
        output_type: str = "pil",
    ):
        """Denoise `latents` [B,4,h,w] through the steps start_step .. num_inference_steps - 1 of the scheduler's
        schedule and decode them. `start_step` 0: `latents` is unit Gaussian noise; above 0: a latent already at the
        noise level of timesteps[start_step] (an inverted latent, D3HR). `generator`: the stochastic steps' noise.

        Mode guidance (MGD3), for λ = `mode_scale` > 0: after each step of index i < `mode_stop` (counted from the
        first step of the schedule), the new latent moves by λ σ_i (mode - x̂0), where x̂0 is the clean latent the
        step's model output implies and σ_i the step's DDPM standard deviation (`stochastic_sigma`); `modes`
        [B,4,h,w] are clean scaled latents. λ = 0 leaves the sampler untouched.
        """
        device = self._execution_device
        embeds = self._conditioning(prompt_embeds, negative_prompt_embeds, guidance_scale)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if not 0 <= start_step < len(timesteps):
            raise ValueError(f"start_step {start_step} is outside the {len(timesteps)} steps")
        guide = mode_scale > 0 and mode_stop > start_step
        if guide:
            check_guidable(self.scheduler)
            modes = modes.to(device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=embeds.dtype)
        if start_step == 0:
            latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self.prepare_extra_step_kwargs(generator, 0.0)
        with self.progress_bar(total=len(timesteps) - start_step) as bar:
            for i in range(start_step, len(timesteps)):
                t = timesteps[i]
                output = self.model_output(latents, t, embeds, guidance_scale)
                before = latents
                latents = self.scheduler.step(output, t, latents, **step_kwargs, return_dict=False)[0]
                if guide and i < mode_stop:
                    clean = predicted_clean(self.scheduler, before, output, t)
                    shift = mode_scale * stochastic_sigma(self.scheduler, i) * (modes - clean)
                    latents = (latents.float() + shift).to(latents.dtype)
                bar.update()
        return self.decode_latents_to(latents, output_type)

    @torch.no_grad()
    def invert(self, latents: torch.Tensor, prompt_embeds: torch.Tensor,
               negative_prompt_embeds: Optional[torch.Tensor] = None, guidance_scale: float = 4.0,
               num_inference_steps: int = 50, steps: int = 30) -> torch.Tensor:
        """DDIM inversion of clean scaled latents [B,4,h,w]: `steps` deterministic steps up the schedule of
        `num_inference_steps`, each from level t_k to t_(k+1) with the model's output at x_(t_k) and timestep
        t_(k+1) (the usual approximation, as D3HR inverts). Returns the latents at the noise level of
        timesteps[num_inference_steps - steps], where a DDIM decode with start_step = num_inference_steps - steps
        takes them back. The clean level is the DDIM schedule's final ᾱ, so that inversion and decoding meet."""
        device = self._execution_device
        embeds = self._conditioning(prompt_embeds, negative_prompt_embeds, guidance_scale)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        upward = self.scheduler.timesteps.flip(0)[:steps]
        final = getattr(self.scheduler, "final_alpha_cumprod", None)
        a = final.double() if final is not None else alpha_bar(self.scheduler, 0)
        x = latents.to(device=device, dtype=embeds.dtype)
        for t in upward:
            output = self.model_output(x, t, embeds, guidance_scale)
            clean, noise = split_prediction(self.scheduler.config.prediction_type, x, output, a)
            a = alpha_bar(self.scheduler, t)
            x = (a.sqrt() * clean + (1 - a).sqrt() * noise).to(embeds.dtype)
        return x

    @torch.no_grad()
    def decode_latents_to(self, latents: torch.Tensor, output_type: str = "pil"):
        """Scaled latents -> PIL images (or `output_type` "latent": the latents, "pt": [B,3,H,W] in [0,1])."""
        if output_type == "latent":
            return latents
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(images, output_type=output_type)


def unit_noise(shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """One N(0, I) latent per generator: the starting noise of each image, drawn from its own generator."""
    return randn_tensor((len(generators), *shape), generator=generators, device=device, dtype=torch.float32)
