"""LCM-LoRA, latent consistency distillation (Luo et al., arXiv 2311.05556), as diffusers'
``examples/consistency_distillation`` LoRA script computes it.

The consistency function is f(x, t) = c_skip(t)·x + c_out(t)·x̂0_θ(x, t) with
c_skip = σ²/((st)² + σ²), c_out = st/√((st)² + σ²) (σ = σ_data, s the timestep scaling): nearly
x̂0 everywhere but exactly x at t = 0. The student is f at the noised x₊ (time t₊); the target is
f of the same LoRA UNet (no gradient, no EMA in the LoRA script) at the guided teacher's one step
t₊ → t. It samples with diffusers' ``LCMScheduler``, which re-noises between steps.
"""

from __future__ import annotations

from typing import Iterator

import torch
from diffusers import LCMScheduler

from rapm_core.conditioning import Conditioning
from rapm_core.distill.consistency import ConsistencyMethod
from rapm_core.distill.losses import pointwise_loss
from rapm_core.distill.method import Example, LossTerms
from rapm_core.errors import ConfigError
from rapm_core.ode import StockSampler

SIGMA_DATA = 0.5  # diffusers' LCMScheduler fixes it
# Its boundary scalings c_skip/c_out and LCMScheduler are VP-DDIM's: refused on a flow teacher
# before a run starts (rapm distill, rapm plan) and by the method itself.
LCM_ON_FLOW = "--method lcm on an SD3-class (rectified-flow) teacher is not implemented yet; use --method rapm or pcm"


def lcm_scheduler(scheduler_config, solver_steps: int, timestep_scaling: float) -> LCMScheduler:
    """The teacher's betas and parameterisation in diffusers' LCMScheduler, skipping along the
    same K-step grid the student was distilled on."""
    cfg = {k: v for k, v in dict(getattr(scheduler_config, "config", scheduler_config)).items()
           if not k.startswith("_")}
    return LCMScheduler.from_config(cfg, original_inference_steps=solver_steps, timestep_scaling=timestep_scaling,
                                    clip_sample=False, set_alpha_to_one=False)


class Lcm(ConsistencyMethod):
    name = "lcm"
    title = "Latent Consistency Models (Luo et al., arXiv 2311.05556), LoRA"

    def __init__(self, student, grid, config, teacher=None):
        if student.ode.family != "vp":
            raise ConfigError(LCM_ON_FLOW)
        super().__init__(student, grid, config, teacher)

    def boundary(self, t: int) -> tuple[float, float]:
        scaled = self.config.lcm.timestep_scaling * t
        return SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2), scaled / (scaled ** 2 + SIGMA_DATA ** 2) ** 0.5

    def consistency(self, x: torch.Tensor, t: int, cond: Conditioning) -> torch.Tensor:
        student = self.student
        x0 = student.ode.predict_x0(x, student.predict(x, t, cond), t)
        c_skip, c_out = self.boundary(t)
        return c_skip * x + c_out * x0

    def losses(self, example: Example, generator: torch.Generator) -> Iterator[LossTerms]:
        student = self.student
        draw = self.draw(example, generator)
        cond = example.cond.to(student.device, student.dtype)
        prediction = self.consistency(draw.x_plus, draw.t_plus, cond)
        with torch.no_grad():
            target = self.consistency(draw.x_teacher, draw.t, cond)
        p = pointwise_loss(prediction, target, self.config.pointwise.pointwise, self.config.pointwise.huber_c)
        yield LossTerms(generator={"lcm_pointwise": p}, stats={"lcm_pointwise": float(p.detach()),
                                                                "grid_index": float(draw.index)})

    def stock_sampler(self) -> StockSampler:
        scheduler = lcm_scheduler(self.student.scheduler_config, self.config.peer.solver_steps,
                                  self.config.lcm.timestep_scaling)
        return StockSampler({"_class_name": "LCMScheduler", **scheduler.config}, self.grid.num_slots)
