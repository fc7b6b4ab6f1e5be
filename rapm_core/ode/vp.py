"""VP-DDIM: the deterministic DDIM ODE of ε/v-prediction UNets, as diffusers' ``DDIMScheduler``.

Everything here follows diffusers' ``DDIMScheduler`` conventions exactly (trailing spacing,
``set_alpha_to_one=False``, the ``t - T // num_steps`` rule for the previous timestep), so that
trajectories, the student's jumps and the exported sampler agree with stock pipelines to float
precision. Levels are integer timesteps; the clean end of the chain is written as ``-1`` and uses
``alphas_cumprod[0]``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from rapm_core.ode.base import Level, Ode, StockSampler, Step

CLEAN_END = -1


def inference_scheduler(config: Mapping[str, Any] | Any, num_steps: int | None = None) -> DDIMScheduler:
    """The DDIM scheduler RAPM samples with, built from any diffusers scheduler config.

    Teachers ship PNDM/Euler/DDIM configs; only the betas and the prediction type carry over.
    The spacing and clipping are forced to RAPM's (trailing, no clipping, ᾱ_final = ᾱ_0).
    """
    cfg = dict(getattr(config, "config", config))
    scheduler = DDIMScheduler.from_config(
        cfg, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False, steps_offset=0
    )
    if num_steps is not None:
        scheduler.set_timesteps(num_steps)
    return scheduler


def previous_timestep(t: int, num_steps: int, num_train_timesteps: int = 1000) -> int:
    """diffusers' DDIM rule for the time a step from ``t`` lands on (``-1`` = clean end)."""
    return max(int(t) - num_train_timesteps // num_steps, CLEAN_END)


def alpha_bar(alphas_cumprod: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """ᾱ_t, with the clean end (t < 0) mapped to ᾱ_0 as in ``set_alpha_to_one=False``."""
    t = torch.as_tensor(t, device=alphas_cumprod.device)
    return alphas_cumprod[t.clamp(min=0).long()]


def _per_sample(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1))) if a.ndim else a.to(like.dtype)


def predict_x0_eps(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    t: int | torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) from a UNet output of either parameterisation, at time ``t``."""
    a = _per_sample(alpha_bar(alphas_cumprod, t), sample)
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - s1a * eps) / sa
    elif prediction_type == "v_prediction":
        x0 = sa * sample - s1a * model_output
        eps = sa * model_output + s1a * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - sa * x0) / s1a
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return x0, eps


def ddim_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    t_from: int | torch.Tensor,
    t_to: int | torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Deterministic (η = 0) DDIM jump from ``t_from`` to any ``t_to`` (``-1`` = clean end)."""
    x0, eps = predict_x0_eps(sample, model_output, t_from, alphas_cumprod, prediction_type)
    a_to = _per_sample(alpha_bar(alphas_cumprod, t_to), sample)
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


def renoise(
    x: torch.Tensor,
    t_from: int | torch.Tensor,
    t_to: int | torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """Forward diffusion between two noise levels: q(x_{t_to} | x_{t_from}), t_to ≥ t_from."""
    ratio = _per_sample(alpha_bar(alphas_cumprod, t_to) / alpha_bar(alphas_cumprod, t_from), x)
    return ratio.sqrt() * x + (1 - ratio).clamp(min=0).sqrt() * noise


def solve_x0_eps(
    z_s: torch.Tensor, z_r: torch.Tensor, t_s: int, t_r: int, alphas_cumprod: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) the teacher used for the DDIM step z_s (time t_s) → z_r (time t_r), with no UNet call.

    A deterministic DDIM step writes both positions as combinations of the same (x̂0, ε̂):
    z_s = √ᾱ_s·x̂0 + √(1−ᾱ_s)·ε̂ and z_r = √ᾱ_r·x̂0 + √(1−ᾱ_r)·ε̂; two stored positions solve it.
    """
    a_s = alpha_bar(alphas_cumprod, t_s).double()
    a_r = alpha_bar(alphas_cumprod, t_r).double()
    ss, ns, sr, nr = a_s.sqrt(), (1 - a_s).sqrt(), a_r.sqrt(), (1 - a_r).sqrt()
    det = ss * nr - ns * sr
    zs, zr = z_s.double(), z_r.double()
    x0 = (nr * zs - ns * zr) / det
    eps = (ss * zr - sr * zs) / det
    return x0.to(z_s.dtype), eps.to(z_s.dtype)


class VpDdim(Ode):
    """The DDIM ODE of a VP teacher (any DDIM/PNDM/Euler… config: betas and prediction type)."""

    family = "vp"

    def __init__(self, scheduler_config: Mapping[str, Any] | Any, device: torch.device | str = "cpu"):
        scheduler = inference_scheduler(scheduler_config)
        self.scheduler_config = dict(scheduler.config)
        self.prediction_type = scheduler.config.prediction_type
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device, torch.float32)

    def to(self, device: torch.device | str) -> "VpDdim":
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def tensors(self) -> list[torch.Tensor]:
        return [self.alphas_cumprod]

    def steps(self, num_steps: int) -> tuple[Step, ...]:
        timesteps = inference_scheduler(self.scheduler_config, num_steps).timesteps.tolist()
        return tuple((int(t), previous_timestep(t, num_steps, self.num_train_timesteps)) for t in timesteps)

    def network_time(self, level: Level | torch.Tensor) -> Any:
        return level

    def step(self, x, output, level_from, level_to):
        return ddim_step(x, output, level_from, level_to, self.alphas_cumprod, self.prediction_type)

    def predict_x0(self, x, output, level):
        return predict_x0_eps(x, output, level, self.alphas_cumprod, self.prediction_type)[0]

    def step_x0(self, z_from, z_to, level_from, level_to):
        return solve_x0_eps(z_from, z_to, level_from, level_to, self.alphas_cumprod.to(z_from.device))[0]

    def noise(self, x0, level, noise):
        a = alpha_bar(self.alphas_cumprod, level)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def renoise(self, x, level_from, level_to, noise):
        return renoise(x, level_from, level_to, noise, self.alphas_cumprod)

    def draw_level(self, low: Level, high: Level, generator: torch.Generator) -> int:
        # The clean end is never fed to the network: a window starting there starts at t = 0.
        return int(torch.randint(max(int(low), 0), int(high), (1,), generator=generator))

    def level_above(self, level: Level, divisions: int) -> int:
        return int(level) + self.num_train_timesteps // divisions

    def training_levels(self) -> range:
        return range(self.num_train_timesteps)

    def stock_sampler(self, num_steps: int) -> StockSampler:
        return StockSampler({"_class_name": "DDIMScheduler", **self.scheduler_config}, num_steps)

    def dpm_solver(self, num_steps: int) -> StockSampler:
        # The teacher's betas and parameterisation on the same trailing grid as DDIM (the teacher's
        # own spacing may be SD's "leading", which starts below t = 999).
        cfg = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        scheduler = DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++",
                                                            timestep_spacing="trailing")
        return StockSampler({"_class_name": "DPMSolverMultistepScheduler", **scheduler.config}, num_steps)
