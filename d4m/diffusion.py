"""Loading Stable Diffusion checkpoints (local diffusers folders or hub ids) with clear errors.

diffusers and transformers are imported where they are used, so that a stage loads them once its inputs are checked."""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import safe_open
from torch import nn

from d4m import jsonfile
from d4m.cli import UsageError, first_line
from d4m.device import DTYPES, compile_unavailable
from d4m.outputs import load_torch

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def pipeline_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """`name` from DTYPES, or auto: fp16 on CUDA (as the original runs SD), fp32 elsewhere."""
    if name != "auto":
        return DTYPES[name]
    return torch.float16 if device.type == "cuda" else torch.float32


def use_sdpa(pipe) -> None:
    """Make every attention layer use PyTorch's fused scaled_dot_product_attention (flash / memory-efficient
    kernels where the device has them) through diffusers' AttnProcessor2_0, whatever the checkpoint set."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for component in pipe.components.values():
        processors = getattr(component, "attn_processors", None)
        if processors and not all(isinstance(p, AttnProcessor2_0) for p in processors.values()):
            component.set_attn_processor(AttnProcessor2_0())


def compile_unet(pipe, device: torch.device) -> str:
    """torch.compile the pipeline's UNet in place; returns '' or, when compiling is unavailable (the UNet then
    stays as it was), the reason."""
    reason = compile_unavailable(device)
    if not reason:
        pipe.unet.compile()
    return reason


class EmbeddingCache:
    """Each prompt (and the negative prompt) goes through a pipeline's text encoder once."""

    def __init__(self, pipe, negative: str, guidance: bool):
        self.pipe, self.negative, self.guidance = pipe, negative, guidance
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def __call__(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if prompt not in self.cache:
            negative = [self.negative] if self.guidance else None
            self.cache[prompt] = self.pipe.encode_prompt([prompt], self.pipe.device, 1, self.guidance, negative)
        return self.cache[prompt]

    def batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(positive, negative or None) embeddings for `prompts`, concatenated in order."""
        pairs = [self(p) for p in prompts]
        negative = torch.cat([n for _, n in pairs]) if self.guidance else None
        return torch.cat([p for p, _ in pairs]), negative


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(),) + tuple(args[1:])


def _linear_by_rows(module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    rows = args[0]
    if rows.ndim != 2:
        return None
    # each row as the first of a 2-row product: the same kernel path whatever the batch
    return torch.cat([F.linear(row.expand(2, -1), module.weight, module.bias)[:1] for row in rows.split(1)])


@contextlib.contextmanager
def batch_invariant(pipe, device: torch.device) -> Iterator[None]:
    """On CPU, make every image's result independent of the images batched beside it, bit for bit.

    Without this an image changes in the last bits (sometimes by one PNG level) with the batch size, from
    three CPU kernel choices: oneDNN convolutions pick algorithms by batch size, and NNPACK takes over
    convolutions of 16 images or more (both turned off: PyTorch's own convolution handles each image separately); GroupNorm and convolution reduce in another order when
    handed channels-last strided tensors, which diffusers' attention blocks produce for some batch sizes
    (inputs made contiguous); and 2-D matrix products (the timestep embedding) take other paths for
    1, 2-3 and more rows (computed row by row). cuBLAS and cuDNN give no such guarantee on GPU.
    """
    if device.type != "cpu":
        yield
        return
    handles = []
    for component in pipe.components.values():
        for module in component.modules() if isinstance(component, nn.Module) else ():
            if isinstance(module, (nn.Conv2d, nn.GroupNorm)):
                handles.append(module.register_forward_pre_hook(_contiguous_input))
            elif isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(_linear_by_rows))
    mkldnn = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with torch.backends.nnpack.flags(enabled=False):
            yield
    finally:
        torch.backends.mkldnn.enabled = mkldnn
        for handle in handles:
            handle.remove()


# the weights each library loads from a component folder: NAME.safetensors (or shards of it), else the .bin
WEIGHT_FILES = {"diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                "transformers": ("model.safetensors", "pytorch_model.bin")}


def _check_local_folder(cls, folder: Path) -> None:
    """Before diffusers reads a local checkpoint: its model_index.json lists the pipeline's components, each
    component is there, and every model's weights open (safetensors headers cover their files; a .bin holds tensors
    only). Each flaw is one line naming the file."""
    index = folder / "model_index.json"
    fix = "re-download the checkpoint or save it again with save_pretrained"
    if not index.is_file():
        raise UsageError(
            f"{folder} is not a diffusers Stable Diffusion folder (no model_index.json); "
            "pass a folder written by save_pretrained or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    try:
        listed = jsonfile.read(index)
    except (OSError, ValueError) as err:
        raise UsageError(f"{index} is not valid JSON ({first_line(err)}); {fix}") from None
    if not isinstance(listed, dict):
        raise UsageError(f"{index} is not a JSON object of the pipeline's components; {fix}")
    components = {name: entry for name, entry in listed.items()
                  if isinstance(entry, list) and len(entry) == 2 and entry[0] is not None}
    required, _ = cls._get_signature_keys(cls)
    missing = [name for name in required if name not in cls._optional_components
               and (name not in components or not (folder / name).is_dir())]
    if missing:
        raise UsageError(f"{folder} is not a Stable Diffusion checkpoint: it lacks {', '.join(missing)}")
    for name, (library, _) in components.items():
        if library in WEIGHT_FILES and (folder / name / "config.json").is_file():
            _check_weights(folder / name, WEIGHT_FILES[library], fix)


def _check_weights(component: Path, names: tuple[str, str], fix: str) -> None:
    safetensors = sorted(component.glob("*.safetensors"))
    for path in safetensors:
        try:
            safe_open(str(path), framework="pt").keys()
        except (SafetensorError, OSError) as err:
            raise UsageError(f"{path} is damaged ({first_line(err)}); {fix}") from None
    if safetensors:
        return
    pickled = sorted(component.glob("*.bin"))
    if not pickled:
        raise UsageError(f"{component / names[0]} is missing (no weights in {component}); {fix}")
    for path in pickled:
        try:
            load_torch(path, mmap=True)
        except Exception as err:  # a truncated, damaged or crafted file: torch raises many kinds
            raise UsageError(f"{path} does not load ({first_line(err)}); {fix}") from None


def no_library_bars() -> None:
    """diffusers' and transformers' loading and saving bars off: they would sit above any later one-line error."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_pipeline(cls, path: str, device: torch.device, safety_checker: bool = False, dtype: str = "auto"):
    """`cls.from_pretrained(path)` on `device` in `dtype` (a DTYPES name or auto), its attention on SDPA, without
    the safety checker unless asked for; or a UsageError."""
    local = Path(path).expanduser()
    if local.exists():
        _check_local_folder(cls, local)
    elif not HUB_ID.match(path):
        raise UsageError(f"model {path!r} is neither an existing folder nor a hub id like owner/name; "
                         "fix --diffusion_checkpoints_path")
    kwargs = {}
    if "safety_checker" in cls._get_signature_keys(cls)[0] and not safety_checker:
        kwargs = dict(safety_checker=None, requires_safety_checker=False)
    no_library_bars()
    try:
        pipe = cls.from_pretrained(str(local) if local.exists() else path, dtype=pipeline_dtype(device, dtype), **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        # diffusers' messages run long (and point at a stack trace the user will not see): keep the gist
        gist = (str(err).strip().splitlines() or [type(err).__name__])[0].split(" (")[0]
        where = "" if local.exists() else " (a hub id: is it right, and is it downloaded or the network reachable?)"
        raise UsageError(f"cannot load Stable Diffusion checkpoint {path}{where}: {gist}") from err
    if safety_checker and getattr(pipe, "safety_checker", None) is None:
        raise UsageError(f"--safety_checker asked for, but checkpoint {path} has none; run without --safety_checker")
    pipe.set_progress_bar_config(disable=True)
    use_sdpa(pipe)
    return pipe.to(device)


def load_sampler(path: str, device: torch.device, dtype: str, scheduler: str):
    """The successors' StableDiffusionSamplerPipeline from `path`, its scheduler replaced by `use_scheduler`."""
    from scripts.pipeline_stable_diffusion_sampler import StableDiffusionSamplerPipeline

    pipe = load_pipeline(StableDiffusionSamplerPipeline, path, device, dtype=dtype)
    return use_scheduler(pipe, scheduler)


def use_scheduler(pipe, scheduler: str):
    """`pipe` with its scheduler replaced by the diffusers scheduler class named `scheduler`, built from the
    checkpoint's scheduler configuration (same training schedule). A configuration that does not say whether x̂0 is
    clipped (a PNDM one: it never clips) gets SD-1.5's no clipping, not DDIM's and DDPM's default clipping to
    [-1, 1], which latents (not pixels) exceed."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, scheduler, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise UsageError(f"--scheduler {scheduler} is not a diffusers scheduler class; use e.g. DDPMScheduler")
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **({} if "clip_sample" in pipe.scheduler.config
                                                                else {"clip_sample": False}))
    return pipe
