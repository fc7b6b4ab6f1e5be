"""Noise schedules, the coarse/fine slot grid and the deterministic DDIM step.

Everything here follows diffusers' ``DDIMScheduler`` conventions exactly (trailing spacing,
``set_alpha_to_one=False``, the ``t - T // num_steps`` rule for the previous timestep), so that
trajectories, the student's jumps and the exported sampler agree with stock pipelines to float
precision. The clean end of the chain is written as time ``-1`` and uses ``alphas_cumprod[0]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from diffusers import DDIMScheduler

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


@dataclass(frozen=True)
class SlotGrid:
    """N coarse slots, each split into M fine teacher steps (diffusers' trailing grids).

    ``fine[k]`` is the time the teacher's k-th fine step evaluates the UNet at; stored position
    ``Z[k]`` is the chain after k fine steps, so ``Z[0]`` is the initial noise. Slot ``n``
    (n = N-1 … 0, sampled high to low) starts at ``coarse[N-1-n]`` and ends at
    ``coarse_prev[N-1-n]``, which is ``Z[(N-n)·M]``'s level.
    """

    num_slots: int
    steps_per_slot: int
    fine: tuple[int, ...]
    coarse: tuple[int, ...]
    num_train_timesteps: int = 1000

    @classmethod
    def from_scheduler(cls, scheduler_config: Mapping[str, Any] | Any, num_slots: int, steps_per_slot: int) -> "SlotGrid":
        if num_slots < 1 or steps_per_slot < 1:
            raise ValueError(f"slots and steps per slot must be >= 1, got N={num_slots}, M={steps_per_slot}")
        fine_s = inference_scheduler(scheduler_config, num_slots * steps_per_slot)
        coarse_s = inference_scheduler(scheduler_config, num_slots)
        fine = tuple(int(t) for t in fine_s.timesteps)
        coarse = tuple(int(t) for t in coarse_s.timesteps)
        if fine[::steps_per_slot] != coarse:
            raise ValueError(
                f"the {num_slots * steps_per_slot}-step trailing grid {fine} does not contain the "
                f"{num_slots}-step grid {coarse} at every {steps_per_slot}-th point; choose another N, M"
            )
        return cls(num_slots, steps_per_slot, fine, coarse, int(fine_s.config.num_train_timesteps))

    @property
    def total_steps(self) -> int:
        return self.num_slots * self.steps_per_slot

    def fine_prev(self, k: int) -> int:
        """Time that fine step ``k`` lands on (the level of stored position ``Z[k+1]``)."""
        return previous_timestep(self.fine[k], self.total_steps, self.num_train_timesteps)

    def slot_start(self, n: int) -> int:
        """t_{n+1}: the time the student evaluates at when it enters slot ``n``."""
        return self.coarse[self.num_slots - 1 - n]

    def slot_end(self, n: int) -> int:
        """t_n as the stock N-step DDIM sampler lands on it (``-1`` for the last slot)."""
        return previous_timestep(self.slot_start(n), self.num_slots, self.num_train_timesteps)

    def boundary_indices(self) -> list[int]:
        """Indices into Z of the N+1 slot boundaries, noise first: 0, M, 2M, …, N·M."""
        return [k * self.steps_per_slot for k in range(self.num_slots + 1)]

    def boundary_times(self) -> list[int]:
        """The noise level of each slot boundary, noise first (``-1`` = clean end).

        A boundary position is where a DDIM step landed, so its level is ``slot_end`` (diffusers'
        ``t - T // N`` rule), which can sit one below the time the next step evaluates at: for
        N = 3 the second boundary is at 333 while the coarse grid's next time is 332. Every
        figure and label uses this one list.
        """
        return [self.slot_start(self.num_slots - 1)] + [self.slot_end(n) for n in reversed(range(self.num_slots))]

    def absolute_index(self, n: int) -> int:
        """Index into Z of the teacher's position at the end of slot ``n`` (z̃_n)."""
        self._check_slot(n)
        return (self.num_slots - n) * self.steps_per_slot

    def relative_index(self, n: int, d: int) -> int:
        """Index into Z of the teacher's point d fine steps into slot ``n`` (ẑ^Δ_{n+1})."""
        self._check_slot(n)
        if not 0 <= d < self.steps_per_slot:
            raise ValueError(f"relative offset d must be in [0, M={self.steps_per_slot}), got {d}")
        return (self.num_slots - 1 - n) * self.steps_per_slot + d

    def relative_time(self, n: int, d: int) -> int:
        """τ = t_{n+1} − Δ: the fine time the teacher would evaluate ``Z[relative_index]`` at."""
        return self.fine[self.relative_index(n, d)]

    def _check_slot(self, n: int) -> None:
        if not 0 <= n < self.num_slots:
            raise ValueError(f"slot must be in [0, N={self.num_slots}), got {n}")


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
