"""A diffusers pipeline directory with random weights, built from an architecture's configs.

What a real teacher of that architecture is to the project's stages (``from_pretrained`` on a
directory, its text encoders, tokenizers, scheduler and VAE), minus the trained weights: the
planner's checks and the SD-sized dry runs (``benchmarks/sd_dry_run.py``) run the real CLI on
it. The tokenizer is ``rapm_testing.tiny_teacher``'s character tokenizer at the encoders' sequence
length, so the conditioning has its native shape without the published vocabulary files.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import diffusers
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from planner.architecture import Architecture
from rapm_testing.tiny_teacher import char_tokenizer


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Initialise in the target dtype: an SDXL UNet made in fp32 and then cast would hold 10 GB.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def with_text_layers(arch: Architecture, layers: int | None) -> Architecture:
    """``arch`` with at most ``layers`` transformer layers per text encoder (widths, sequence
    length and projection unchanged, so the conditioning keeps its shapes); None: as published."""
    if layers is None:
        return arch
    encoders = tuple((cls, {**cfg, "num_hidden_layers": min(layers, int(cfg["num_hidden_layers"]))})
                     for cls, cfg in arch.text_encoders)
    return replace(arch, source=f"{arch.source}, text encoders cut to {layers} layers", text_encoders=encoders)


def save_random_pipeline(arch: Architecture, directory: str | Path, dtype: torch.dtype = torch.float32,
                         seed: int = 0, max_shard_size: str = "1GB") -> Path:
    """Save a ``StableDiffusion(XL)Pipeline`` of ``arch`` with random weights in ``dtype``.

    Small shards keep the save's own copy of the weights (safetensors serialises a shard in
    memory) to one shard at a time.
    """
    directory = Path(directory)
    # A published config's old "_diffusers_version" makes StableDiffusionPipeline rewrite a
    # sample_size below 64 to 64; the modules made here are of the installed version.
    arch = replace(arch, denoiser={k: v for k, v in arch.denoiser.items() if k != "_diffusers_version"})
    torch.manual_seed(seed)
    with _default_dtype(dtype):
        unet = arch.build_denoiser(dtype, "cpu")
        vae = arch.build_vae(dtype, "cpu")
        encoders = arch.build_text_encoders(dtype, "cpu")
    tokenizer = char_tokenizer(arch.text_length)
    scheduler_cls = getattr(diffusers, arch.scheduler.get("_class_name", "DDIMScheduler"))
    scheduler = scheduler_cls.from_config(arch.scheduler)
    if arch.kind == "sd15":
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=encoders[0], tokenizer=tokenizer,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=encoders[0], tokenizer=tokenizer,
                                         text_encoder_2=encoders[1], tokenizer_2=tokenizer, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
    del pipe, unet, vae, encoders
    gc.collect()
    return directory
