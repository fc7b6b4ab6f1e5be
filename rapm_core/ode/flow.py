"""Rectified flow, as diffusers' ``FlowMatchEulerDiscreteScheduler`` samples SD3-family teachers.

x_σ = (1 − σ)·x0 + σ·ε for σ ∈ [0, 1]; the network, fed t = T·σ (the scheduler's timesteps),
predicts the velocity v ≈ ε − x0; one Euler step σ_t → σ_s is x_s = x_t + (σ_s − σ_t)·v and
x̂0 = x_t − σ_t·v. The scheduler's ``shift`` maps a grid value s to shift·s / (1 + (shift − 1)·s);
levels here are the shifted σ the network sees, grids are chosen as pre-shift values.

The N-step grid: pre-shift s = 1, (N−1)/N, …, 1/N, then 0, i.e. linspace(1, 0, N + 1), so every
step covers 1/N of the pre-shift range and the last one lands on the clean end. The stock default,
linspace(1, 1/T, N) then the terminal 0, ends its last-but-one step at σ ≈ 1/T, so its last step
moves from ≈ 0.004 to 0 and does almost nothing: a few-step student would waste one of its N
calls. The fine grid of N slots × M steps is the same rule for N·M steps; since (n·M)/(N·M) and
n/N are the same correctly rounded number it contains the N-step grid at every M-th point exactly.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from rapm_core.errors import ConfigError
from rapm_core.flow_grid import pre_shift_sigmas
from rapm_core.ode.base import Level, Ode, StockSampler, Step

# Options that change the σ grid beyond a static shift; none of this family's teachers needs them yet
# (FLUX's dynamic shift depends on the image's token count: the next family).
_UNSUPPORTED = ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
                "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")


def _per_sample(level: Level | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ as float32 (the scheduler's dtype), shaped to broadcast over a batch of ``like``."""
    s = torch.as_tensor(level, dtype=torch.float32, device=like.device)
    return s.reshape(-1, *([1] * (like.ndim - 1))) if s.ndim else s


class RectifiedFlow(Ode):
    """The Euler ODE of a ``FlowMatchEulerDiscreteScheduler`` teacher (static shift)."""

    family = "flow"

    def __init__(self, scheduler_config: Mapping[str, Any] | Any, device: torch.device | str = "cpu"):
        cfg = {k: v for k, v in dict(getattr(scheduler_config, "config", scheduler_config)).items()
               if not k.startswith("_")}
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        used = [k for k in _UNSUPPORTED if scheduler.config.get(k)]
        if used:
            raise ConfigError(f"flow-matching scheduler options {used} are not supported; RAPM handles a static shift")
        self.scheduler_config = dict(scheduler.config)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def sigmas(self, num_steps: int) -> list[float]:
        """The N + 1 shifted levels of the ``num_steps``-step grid, exactly as the stock scheduler
        computes them from :func:`pre_shift_sigmas` (float32 values)."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(sigmas=pre_shift_sigmas(num_steps))
        return scheduler.sigmas.tolist()

    def steps(self, num_steps: int) -> tuple[Step, ...]:
        s = self.sigmas(num_steps)
        return tuple(zip(s[:-1], s[1:]))

    def network_time(self, level: Level | torch.Tensor) -> torch.Tensor:
        # The scheduler's timesteps: sigmas · T in float32.
        return torch.as_tensor(level, dtype=torch.float32) * self.num_train_timesteps

    def step(self, x, output, level_from, level_to):
        # As FlowMatchEulerDiscreteScheduler.step: float32 sample, dt = σ_next − σ in float32.
        x32 = x.to(torch.float32)
        dt = _per_sample(level_to, x32) - _per_sample(level_from, x32)
        return (x32 + dt * output).to(output.dtype)

    def predict_x0(self, x, output, level):
        return x - _per_sample(level, x).to(x.dtype) * output

    def step_x0(self, z_from, z_to, level_from, level_to):
        # v = (z_to − z_from)/(σ_to − σ_from), x̂0 = z_from − σ_from·v; in float64 as the VP solve is.
        s_from, s_to = float(level_from), float(level_to)
        v = (z_to.double() - z_from.double()) / (s_to - s_from)
        return (z_from.double() - s_from * v).to(z_from.dtype)

    def noise(self, x0, level, noise):
        s = _per_sample(level, x0).to(x0.dtype)
        return (1 - s) * x0 + s * noise

    def renoise(self, x, level_from, level_to, noise):
        """x at σ_b from x at σ_a ≤ σ_b with fresh ε′, derived from the interpolation:

        x_b = (1 − σ_b)/(1 − σ_a) · x_a + √(σ_b² − ((1 − σ_b)·σ_a/(1 − σ_a))²) · ε′.
        With x_a = (1 − σ_a)·x0 + σ_a·ε this has x0's coefficient 1 − σ_b and noise variance
        ((1 − σ_b)·σ_a/(1 − σ_a))² + σ_b² − the same = σ_b², i.e. it is distributed as
        (1 − σ_b)·x0 + σ_b·ε″, the forward process sampled directly. σ_a = 1 has no x0 left:
        the result is pure noise there."""
        a, b = _per_sample(level_from, x).to(x.dtype), _per_sample(level_to, x).to(x.dtype)
        keep = torch.where(a < 1, (1 - b) / (1 - a).clamp(min=1e-12), torch.zeros_like(a))
        carried = keep * a
        return keep * x + (b * b - carried * carried).clamp(min=0).sqrt() * noise

    def draw_level(self, low: Level, high: Level, generator: torch.Generator) -> float:
        return float(low) + (float(high) - float(low)) * float(torch.rand((), generator=generator))

    def level_above(self, level: Level, divisions: int) -> float:
        # 1/divisions of the pre-shift range, where the grids are uniform: PCM's SD3 script draws
        # its t′ among the K/P grid points above the phase end.
        # σ = k·s/(1 + (k − 1)·s) ⇔ s = σ/(k − (k − 1)·σ).
        k, sigma = float(self.scheduler_config["shift"]), float(level)
        above = min(sigma / (k - (k - 1) * sigma) + 1.0 / divisions, 1.0)
        return k * above / (1 + (k - 1) * above)

    def training_levels(self) -> list[float]:
        # The stock scheduler's own training σ (shifted, float32), which PCM's SD3 script indexes.
        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config).sigmas.flip(0).tolist()

    def stock_sampler(self, num_steps: int) -> StockSampler:
        return StockSampler({"_class_name": "FlowMatchEulerDiscreteScheduler", **self.scheduler_config}, num_steps,
                            {"sigmas": pre_shift_sigmas(num_steps)})

    def dpm_solver(self, num_steps: int) -> StockSampler:
        # diffusers' flow form of DPM-Solver++ (velocity as "flow_prediction", the same static shift);
        # it takes no sigmas=, so it steps its own N-step grid, which also ends at σ = 0.
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=self.num_train_timesteps, algorithm_type="dpmsolver++", use_flow_sigmas=True,
            prediction_type="flow_prediction", flow_shift=float(self.scheduler_config["shift"]))
        return StockSampler({"_class_name": "DPMSolverMultistepScheduler", **scheduler.config}, num_steps)
