"""Deterministic DDIM sampling with optional classifier-free guidance, keeping every position.

One function serves the teacher's N·M-step trajectories (guidance W, all positions kept), the
N-step teacher baseline and the distilled student (LoRA enabled, guidance 1.0), so all of them
step exactly as diffusers' ``DDIMScheduler`` does (see ``schedule.py``).
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch

from rapm_core.conditioning import Conditioning
from rapm_core.schedule import ddim_step, inference_scheduler, previous_timestep


def guided_prediction(
    unet: torch.nn.Module,
    sample: torch.Tensor,
    t: int,
    cond: Conditioning,
    guidance: float = 1.0,
    uncond: Conditioning | None = None,
) -> torch.Tensor:
    """UNet output at ``t``; with guidance > 1, uncond + w·(cond − uncond) from one doubled batch.

    ``uncond`` may hold a single row; it is broadcast to the batch as diffusers does.
    """
    if guidance > 1.0:
        if uncond is None:
            raise ValueError("guidance > 1 needs unconditional embeddings")
        b = sample.shape[0]
        if uncond.prompt_embeds.shape[0] != b:
            uncond = uncond[[0] * b]
        both = uncond.cat(cond)
        out = unet(torch.cat([sample, sample]), t, **both.unet_kwargs()).sample
        out_u, out_c = out.chunk(2)
        return out_u + guidance * (out_c - out_u)
    return unet(sample, t, **cond.unet_kwargs()).sample


@torch.no_grad()
def ddim_sample(
    unet: torch.nn.Module,
    scheduler_config: Mapping[str, Any] | Any,
    latents: torch.Tensor,
    cond: Conditioning,
    num_steps: int,
    guidance: float = 1.0,
    uncond: Conditioning | None = None,
    return_positions: bool = False,
) -> torch.Tensor:
    """Run ``num_steps`` trailing DDIM steps from ``latents`` (already at the initial noise level).

    Returns the final latents, or with ``return_positions`` a (B, num_steps + 1, C, H, W) tensor
    whose index k is the position after k steps (index 0 is ``latents`` itself).
    """
    sched = inference_scheduler(scheduler_config, num_steps)
    ac = sched.alphas_cumprod.to(latents.device)
    prediction_type = sched.config.prediction_type
    z = latents
    positions = [z] if return_positions else None
    for t in sched.timesteps.tolist():
        out = guided_prediction(unet, z, t, cond, guidance, uncond)
        z = ddim_step(z.float(), out.float(), t, previous_timestep(t, num_steps, sched.config.num_train_timesteps),
                      ac, prediction_type).to(latents.dtype)
        if positions is not None:
            positions.append(z)
    return torch.stack(positions, dim=1) if positions is not None else z


@torch.no_grad()
def scheduler_sample(
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    cond: Conditioning,
    num_steps: int,
    guidance: float = 1.0,
    uncond: Conditioning | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    return_positions: bool = False,
) -> torch.Tensor:
    """A stock pipeline's denoising loop with any diffusers scheduler (DPM-Solver++, LCM …), on
    already-encoded conditioning; ``generator`` feeds schedulers that draw noise between steps,
    as a pipeline passes it. ``return_positions`` as :func:`ddim_sample`."""
    scheduler.set_timesteps(num_steps)
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    z = latents * scheduler.init_noise_sigma
    positions = [z] if return_positions else None
    for t in scheduler.timesteps:
        out = guided_prediction(unet, scheduler.scale_model_input(z, t), t, cond, guidance, uncond)
        z = scheduler.step(out, t, z, **extra).prev_sample
        if positions is not None:
            positions.append(z)
    return torch.stack(positions, dim=1) if positions is not None else z
