"""Small Stable-Diffusion-shaped models: the tests' offline stand-in and the Fashion-MNIST model's shape.

Everything here is saved in diffusers' Stable Diffusion folder layout and loaded back through the
same `from_pretrained` path as SD-1.5.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# The scheduler configuration that SD-1.5 ships.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    trained_betas=None,
)


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-to-printable-character table, in CLIP's own order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    order = printable + [b for b in range(256) if b not in printable]
    table = dict(zip(range(256), chars))
    return [table[b] for b in order]


def write_char_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with no merges: every word is spelt out in characters (514 tokens)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_sd(
    folder: str | Path,
    image_size: int = 32,
    vae_channels: tuple[int, ...] = (32, 64),
    unet_channels: tuple[int, ...] = (32, 64),
    text_dim: int = 32,
    text_layers: int = 2,
    seed: int = 0,
    save: bool = True,
) -> StableDiffusionPipeline:
    """A randomly initialised SD-shaped pipeline; saved to `folder` when `save`."""
    torch.manual_seed(seed)
    n_vae = len(vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(32, vae_channels[0]),
        sample_size=image_size,
        scaling_factor=0.18215,
    )
    n_unet = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2 ** (n_vae - 1),
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n_unet - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_unet - 1),
        block_out_channels=unet_channels,
        layers_per_block=1,
        cross_attention_dim=text_dim,
        attention_head_dim=8,
        norm_num_groups=min(32, unet_channels[0]),
    )
    tokenizer_dir = Path(folder) / "tokenizer"
    tokenizer = write_char_tokenizer(tokenizer_dir)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_dim,
            intermediate_size=text_dim * 4,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if save:
        pipe.save_pretrained(folder)
    return pipe


def build_sd15(folder: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Stable Diffusion 1.5's UNet, VAE and text encoder shapes with random weights (they time the same as the
    trained ones), with a character tokenizer written to `folder`: the components of a pipeline."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
    )
    tokenizer = write_char_tokenizer(Path(folder) / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    return dict(unet=unet.to(dtype), vae=vae.to(dtype), text_encoder=text_encoder.to(dtype), tokenizer=tokenizer,
                scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
