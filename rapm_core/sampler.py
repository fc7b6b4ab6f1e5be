"""Sampling loops with optional classifier-free guidance, keeping every position on request.

Two loops, each with one job:

- :func:`ode_sample` steps the teacher's ODE with RAPM's own arithmetic (``rapm_core.ode``): the
  teacher's N·M-step trajectories (guidance W, all positions kept) and its N-step baseline. Its
  steps equal the stock DDIM / FlowMatchEuler schedulers' to float precision (tested).
- :func:`scheduler_sample` is a stock pipeline's denoising loop over any diffusers scheduler; the
  distilled student is sampled only through it, with the scheduler it ships with
  (:func:`sample_stock`), in distillation, evaluation and the export checks alike.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch

from rapm_core.conditioning import Conditioning
from rapm_core.denoiser import denoise
from rapm_core.ode import Ode, StockSampler, ode_for


def guided_prediction(
    unet: torch.nn.Module,
    sample: torch.Tensor,
    t: Any,
    cond: Conditioning,
    guidance: float = 1.0,
    uncond: Conditioning | None = None,
) -> torch.Tensor:
    """Network output at network time ``t``; with guidance > 1, uncond + w·(cond − uncond) from one
    doubled batch. ``uncond`` may hold a single row; it is broadcast to the batch as diffusers does.
    """
    if guidance > 1.0:
        if uncond is None:
            raise ValueError("guidance > 1 needs unconditional embeddings")
        b = sample.shape[0]
        if uncond.prompt_embeds.shape[0] != b:
            uncond = uncond[[0] * b]
        both = uncond.cat(cond)
        out = denoise(unet, torch.cat([sample, sample]), t, both)
        out_u, out_c = out.chunk(2)
        return out_u + guidance * (out_c - out_u)
    return denoise(unet, sample, t, cond)


@torch.no_grad()
def ode_sample(
    unet: torch.nn.Module,
    ode: Ode | Mapping[str, Any] | Any,
    latents: torch.Tensor,
    cond: Conditioning,
    num_steps: int,
    guidance: float = 1.0,
    uncond: Conditioning | None = None,
    return_positions: bool = False,
) -> torch.Tensor:
    """Run the ODE's ``num_steps``-step grid from ``latents`` (already at the initial noise level);
    ``ode`` may be a scheduler config, whose family picks the ODE.

    Returns the final latents, or with ``return_positions`` a (B, num_steps + 1, C, H, W) tensor
    whose index k is the position after k steps (index 0 is ``latents`` itself).
    """
    ode = ode_for(ode, latents.device).to(latents.device)
    z = latents
    positions = [z] if return_positions else None
    for t_from, t_to in ode.steps(num_steps):
        out = guided_prediction(unet, z, ode.network_time(t_from), cond, guidance, uncond)
        z = ode.step(z.float(), out.float(), t_from, t_to).to(latents.dtype)
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
    **timestep_kwargs: Any,
) -> torch.Tensor:
    """A stock pipeline's denoising loop with any diffusers scheduler (DDIM, FlowMatchEuler,
    DPM-Solver++, LCM …), on already-encoded conditioning; ``timestep_kwargs`` go to
    ``set_timesteps`` as a pipeline passes them (e.g. ``sigmas=``), ``generator`` to schedulers that
    draw noise between steps. ``return_positions`` as :func:`ode_sample`."""
    scheduler.set_timesteps(num_steps, **timestep_kwargs)
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    # Flow-matching schedulers have neither (their pipelines neither scale the noise nor the input).
    z = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda sample, _t: sample)
    positions = [z] if return_positions else None
    for t in scheduler.timesteps:
        out = guided_prediction(unet, scale(z, t), t, cond, guidance, uncond)
        z = scheduler.step(out, t, z, **extra).prev_sample
        if positions is not None:
            positions.append(z)
    return torch.stack(positions, dim=1) if positions is not None else z


def sample_stock(
    unet: torch.nn.Module,
    sampler: StockSampler,
    latents: torch.Tensor,
    cond: Conditioning,
    guidance: float = 1.0,
    uncond: Conditioning | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    return_positions: bool = False,
) -> torch.Tensor:
    """``sampler`` run as a stock pipeline runs it: the distilled student (``unet`` carries its LoRA,
    guidance 1) exactly as it ships — in distillation, evaluation and the export checks alike — or
    a teacher baseline such as DPM-Solver++."""
    return scheduler_sample(unet, sampler.scheduler(), latents, cond, sampler.num_steps, guidance, uncond, generator,
                            return_positions, **sampler.timestep_kwargs)
