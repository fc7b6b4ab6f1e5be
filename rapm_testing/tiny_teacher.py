"""Tiny random-weight SD 1.5-class and SDXL-class pipelines, built from config offline.

They exercise exactly the loading, encoding and sampling code real teachers go through
(``from_pretrained`` on a directory, both SDXL text encoders, CFG) at a size that runs in
seconds on a CPU. The tokenizer is built here: a byte-level vocabulary with no merges,
so every word splits into characters, which is all a random text encoder needs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_DIM = 32


def _bytes_to_unicode() -> dict[int, str]:
    # The CLIP/GPT-2 reversible byte→printable-character table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def char_tokenizer(max_length: int = 32) -> CLIPTokenizer:
    """A CLIPTokenizer whose tokens are single characters (no merges); save it where needed."""
    chars = list(_bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    # transformers 5 ignores vocab_file/merges_file here: the vocabulary must be passed in.
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=max_length,
                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    return tok


def clip_text_config(projection_dim: int | None = None, vocab_size: int = 1000) -> CLIPTextConfig:
    kwargs = dict(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=TEXT_DIM, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size,
        max_position_embeddings=32, hidden_act="gelu",
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=32,
    )


def _scheduler(prediction_type: str) -> DDIMScheduler:
    # The SD 1.5 scheduler as published (PNDM-era settings on a DDIM class), so that code which
    # forces RAPM's trailing/no-clip settings is exercised.
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def build_tiny_sd15(directory: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save a random SD 1.5-class pipeline (16×16 latents) to ``directory`` and return it."""
    directory = Path(directory)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=_vae(), text_encoder=CLIPTextModel(clip_text_config()),
        tokenizer=char_tokenizer(), scheduler=_scheduler(prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def build_tiny_sdxl(directory: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save a random SDXL-class pipeline (two text encoders, pooled + time ids) to ``directory``."""
    directory = Path(directory)
    torch.manual_seed(seed)
    time_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_DIM, attention_head_dim=(2, 4), norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * time_dim, transformer_layers_per_block=1,
    )
    tok = char_tokenizer()
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=_vae(), text_encoder=CLIPTextModel(clip_text_config()), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(projection_dim=TEXT_DIM)), tokenizer_2=tok,
        scheduler=_scheduler(prediction_type), force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
