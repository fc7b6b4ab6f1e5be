"""Measure a shapes teacher the way the quality benchmark will: same prompts, same seeded noise,
judged by the domain evaluator. The UNet teacher samples by trailing DDIM through the project's
shared sampler; the flow teacher by the stock StableDiffusion3Pipeline call (its Euler loop).

The reference for domain FID is a set of real renders of the very same prompts, so FID measures
image quality and diversity, not a mismatch of prompt mixes. A second render seed gives the
real-vs-real floor the numbers should be read against.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline
from PIL import Image

from rapm_core.conditioning import Conditioning
from rapm_core.evaluate.features import frechet_distance, gaussian_stats
from rapm_shapes.evaluator import (
    features, images_from_uint8, images_to_uint8, load_evaluator, prompt_adherence,
)
from rapm_shapes.shapes import all_prompts, render_prompts
from rapm_core.sampler import ode_sample

REAL_SEED_OFFSET = 7919  # real renders use other generators than the initial noise


def prompt_cycle(n: int) -> list[str]:
    """``n`` prompts that walk through every attribute combination in turn."""
    prompts = all_prompts()
    return [prompts[i % len(prompts)] for i in range(n)]


def initial_latents(pipe: StableDiffusionPipeline | StableDiffusion3Pipeline, n: int, seed: int) -> torch.Tensor:
    """Seeded noise at the denoiser's (UNet's or transformer's) latent shape."""
    config = (pipe.unet if hasattr(pipe, "unet") else pipe.transformer).config
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, config.in_channels, config.sample_size, config.sample_size), generator=gen)


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompts: list[str], latents: torch.Tensor, num_steps: int,
             guidance: float, batch_size: int = 120) -> torch.Tensor:
    """Decoded images (B, 3, H, W) in [-1, 1] from ``latents`` after ``num_steps`` guided DDIM steps."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        cond, uncond = pipe.encode_prompt(chunk, torch.device("cpu"), 1, guidance > 1.0)
        z = ode_sample(pipe.unet, pipe.scheduler.config, latents[i:i + batch_size], Conditioning(cond), num_steps,
                        guidance, Conditioning(uncond) if uncond is not None else None)
        out.append(pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.clamp(-1, 1))
    return torch.cat(out)


def _save_grid(path: Path, rows: list[np.ndarray], columns: int = 24) -> None:
    grid = np.concatenate([np.concatenate(list(r[:columns]), axis=1) for r in rows], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def measure_sampler(sample: Callable[..., torch.Tensor], vae: AutoencoderKL, evaluator_dir: str | Path,
                    prompts: list[str], *, seed: int, num_slots: int, steps_per_slot: int,
                    settings: list[dict], sampler: str, grid_path: Path | None) -> dict:
    """Adherence and domain FID of ``sample(steps, **setting)`` at N·M steps for each of ``settings``
    (guidance, and for flows the shift), then at N steps with the best one.

    ``sample`` returns decoded images (B, 3, H, W) in [-1, 1] for ``prompts`` from the same seeded
    noise each call. Writes a picture (real renders / N·M steps / N steps, same prompts) to
    ``grid_path`` unless it is None.
    """
    judge = load_evaluator(evaluator_dir)
    real = images_from_uint8(render_prompts(prompts, seed + REAL_SEED_OFFSET))
    real_stats = gaussian_stats([features(judge, real)])
    real2_feats = features(judge, images_from_uint8(render_prompts(prompts, seed + 2 * REAL_SEED_OFFSET)))
    with torch.no_grad():  # the VAE alone bounds what any sampler can reach
        roundtrip = vae.decode(vae.encode(real).latent_dist.mean).sample.clamp(-1, 1)

    def row(steps: int, setting: dict) -> tuple[dict, torch.Tensor]:
        t = time.perf_counter()
        images = sample(steps, **setting)
        return {"sampler": sampler, "steps": steps, **setting,
                "adherence": prompt_adherence(judge, images, prompts),
                "domain_fid": frechet_distance(real_stats, [features(judge, images)]),
                "wall_s": round(time.perf_counter() - t, 1)}, images

    full = [row(num_slots * steps_per_slot, s) for s in settings]
    best = max(range(len(full)), key=lambda i: (full[i][0]["adherence"], -full[i][0]["domain_fid"]))
    few, few_images = row(num_slots, settings[best])
    if grid_path is not None:
        _save_grid(grid_path, [images_to_uint8(real), images_to_uint8(full[best][1]), images_to_uint8(few_images)])
    return {"n_prompts": len(prompts), "seed": seed, "num_slots": num_slots, "steps_per_slot": steps_per_slot,
            **settings[best], "guidances_tried": sorted({s["guidance"] for s in settings}),
            "real_vs_real_fid": frechet_distance(real_stats, [real2_feats]),
            "vae_roundtrip_adherence": prompt_adherence(judge, roundtrip, prompts),
            "vae_roundtrip_fid": frechet_distance(real_stats, [features(judge, roundtrip)]),
            "rows": [r for r, _ in full] + [few]}


def measure_teacher(teacher_dir: str | Path, evaluator_dir: str | Path, *, n_prompts: int = 240, seed: int = 0,
                    num_slots: int = 4, steps_per_slot: int = 10, guidances: list[float] = (3.0, 5.0, 7.5),
                    grid_path: str | Path | None = "samples.png") -> dict:
    """Adherence and domain FID of N·M-step DDIM at each guidance, and of N-step DDIM at the best one
    (``measure_sampler``; the picture goes to ``grid_path`` inside the teacher directory)."""
    teacher_dir = Path(teacher_dir)
    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = prompt_cycle(n_prompts)
    latents = initial_latents(pipe, n_prompts, seed)
    return measure_sampler(lambda steps, guidance: generate(pipe, prompts, latents, steps, guidance), pipe.vae,
                           evaluator_dir, prompts, seed=seed, num_slots=num_slots, steps_per_slot=steps_per_slot,
                           settings=[{"guidance": g} for g in guidances], sampler="DDIM",
                           grid_path=None if grid_path is None else teacher_dir / grid_path)


def load_flow_teacher(teacher_dir: str | Path) -> StableDiffusion3Pipeline:
    """A T5-less StableDiffusion3Pipeline directory, loaded as any user loads it."""
    pipe = StableDiffusion3Pipeline.from_pretrained(teacher_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_flow(pipe: StableDiffusion3Pipeline, prompts: list[str], latents: torch.Tensor, num_steps: int,
                  guidance: float, shift: float, max_sequence_length: int, batch_size: int = 100) -> torch.Tensor:
    """Decoded images (B, 3, H, W) in [-1, 1]: the stock pipeline's own call (its Euler loop, CFG,
    ``vae.decode(latents / scaling_factor + shift_factor)``) from ``latents``, with the scheduler's
    ``shift`` set to ``shift``."""
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
    side = latents.shape[-1] * pipe.vae_scale_factor
    out = []
    for i in range(0, len(prompts), batch_size):
        images = pipe(prompts[i:i + batch_size], latents=latents[i:i + batch_size], num_inference_steps=num_steps,
                      guidance_scale=guidance, height=side, width=side, output_type="pt",
                      max_sequence_length=max_sequence_length).images
        out.append(images * 2 - 1)
    return torch.cat(out)


def measure_flow_teacher(teacher_dir: str | Path, evaluator_dir: str | Path, *, max_sequence_length: int,
                         n_prompts: int = 200, seed: int = 0, num_slots: int = 4, steps_per_slot: int = 10,
                         guidances: list[float] = (4.0, 7.5), shifts: list[float] = (1.0,),
                         grid_path: str | Path | None = "samples.png") -> dict:
    """``measure_sampler`` for a flow teacher: the stock pipeline's Euler at every (shift, guidance),
    N·M steps, then N steps at the best pair."""
    teacher_dir = Path(teacher_dir)
    pipe = load_flow_teacher(teacher_dir)
    prompts = prompt_cycle(n_prompts)
    latents = initial_latents(pipe, n_prompts, seed)

    def sample(steps: int, shift: float, guidance: float) -> torch.Tensor:
        return generate_flow(pipe, prompts, latents, steps, guidance, shift, max_sequence_length)

    return measure_sampler(sample, pipe.vae, evaluator_dir, prompts, seed=seed, num_slots=num_slots,
                           steps_per_slot=steps_per_slot, settings=[{"shift": s, "guidance": g} for s in shifts
                                                                    for g in guidances],
                           sampler="Euler", grid_path=None if grid_path is None else teacher_dir / grid_path)
