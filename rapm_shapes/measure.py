"""Measure a shapes teacher the way the quality benchmark will: same prompts, same seeded noise,
trailing DDIM through the project's shared sampler, judged by the domain evaluator.

The reference for domain FID is a set of real renders of the very same prompts, so FID measures
image quality and diversity, not a mismatch of prompt mixes. A second render seed gives the
real-vs-real floor the numbers should be read against.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
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


def initial_latents(pipe: StableDiffusionPipeline, n: int, seed: int) -> torch.Tensor:
    size = pipe.unet.config.sample_size
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, pipe.unet.config.in_channels, size, size), generator=gen)


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


def measure_teacher(teacher_dir: str | Path, evaluator_dir: str | Path, *, n_prompts: int = 240, seed: int = 0,
                    num_slots: int = 4, steps_per_slot: int = 10, guidances: list[float] = (3.0, 5.0, 7.5),
                    grid_path: str | Path | None = "samples.png") -> dict:
    """Adherence and domain FID of N·M-step DDIM at each guidance, and of N-step DDIM at the best one.

    Writes a picture (real renders / N·M steps / N steps, same prompts) to ``grid_path`` inside
    the teacher directory unless it is None.
    """
    teacher_dir = Path(teacher_dir)
    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    judge = load_evaluator(evaluator_dir)
    prompts = prompt_cycle(n_prompts)
    real = images_from_uint8(render_prompts(prompts, seed + REAL_SEED_OFFSET))
    real_stats = gaussian_stats([features(judge, real)])
    real2_feats = features(judge, images_from_uint8(render_prompts(prompts, seed + 2 * REAL_SEED_OFFSET)))
    latents = initial_latents(pipe, n_prompts, seed)
    with torch.no_grad():  # the VAE alone bounds what any sampler can reach
        roundtrip = pipe.vae.decode(pipe.vae.encode(real).latent_dist.mean).sample.clamp(-1, 1)

    def row(steps: int, guidance: float) -> tuple[dict, torch.Tensor]:
        t = time.perf_counter()
        images = generate(pipe, prompts, latents, steps, guidance)
        return {"sampler": "DDIM", "steps": steps, "guidance": guidance,
                "adherence": prompt_adherence(judge, images, prompts),
                "domain_fid": frechet_distance(real_stats, [features(judge, images)]),
                "wall_s": round(time.perf_counter() - t, 1)}, images

    full = [row(num_slots * steps_per_slot, g) for g in guidances]
    best = max(range(len(full)), key=lambda i: (full[i][0]["adherence"], -full[i][0]["domain_fid"]))
    few, few_images = row(num_slots, guidances[best])
    if grid_path is not None:
        _save_grid(teacher_dir / grid_path, [images_to_uint8(real), images_to_uint8(full[best][1]),
                                             images_to_uint8(few_images)])
    return {"n_prompts": n_prompts, "seed": seed, "num_slots": num_slots, "steps_per_slot": steps_per_slot,
            "guidance": guidances[best], "guidances_tried": list(guidances),
            "real_vs_real_fid": frechet_distance(real_stats, [real2_feats]),
            "vae_roundtrip_adherence": prompt_adherence(judge, roundtrip, prompts),
            "vae_roundtrip_fid": frechet_distance(real_stats, [features(judge, roundtrip)]),
            "rows": [r for r, _ in full] + [few]}
