"""What the consistency peers (PCM, LCM-LoRA) share, as their published training scripts compute it.

Both skip along a K-step DDIM teacher grid (K = 50): timestep i of the grid is t₊ = T/K·(i+1) − 1
(19 … 999), its previous one t = t₊ − T/K (0 for i = 0, whose ᾱ is ᾱ_0, the clean end). An
iteration draws one index i, noises the clean latents x0 to t₊, and asks the guided teacher for
one DDIM step t₊ → t, with LCM's form of guidance x̂0 = x̂0_c + w(x̂0_c − x̂0_u), i.e. CFG scale
1 + w. The teacher is the student's own UNet with its adapters bypassed; the scale is drawn from
``peer.teacher_guidance`` (default: the store's own guidance, so every method distils the same
guided teacher). All draws come from the run's generator. The grid, the noising and the step are
the teacher ODE's (``Ode.skipping_grid``): on a rectified-flow teacher, as PCM's SD3 script, the
grid is the scheduler's training σ at the same indices, the network is fed 1000·σ and the step is
one guided Euler step (its script's guidance c + w(c − u) is the same CFG scale 1 + w).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rapm_core.distill.config import MethodConfig
from rapm_core.distill.method import Example, GuidedTeacher, Method
from rapm_core.distill.student import Student, teacher_mode
from rapm_core.errors import ConfigError
from rapm_core.sampler import guided_prediction
from rapm_core.ode import Level, Ode, SlotGrid


@dataclass(frozen=True)
class SkippingGrid:
    """The peers' K-step teacher grid (levels of the teacher's ODE)."""

    timesteps: tuple  # t₊ of index i (levels of the teacher's ODE)
    previous: tuple  # t of index i: where the teacher's one step lands

    @classmethod
    def make(cls, ode: Ode, steps: int) -> "SkippingGrid":
        return cls(*ode.skipping_grid(steps))

    def __len__(self) -> int:
        return len(self.timesteps)


@dataclass(frozen=True)
class ConsistencyDraw:
    """One iteration's draws and the teacher's step: x₊ at t₊, its one-step target x at t."""

    index: int
    t_plus: Level
    t: Level
    x_plus: torch.Tensor
    x_teacher: torch.Tensor
    guidance: float


class ConsistencyMethod(Method):
    """A peer: needs clean latents per example and the store's unconditional row for CFG."""

    def __init__(self, student: Student, grid: SlotGrid, config: MethodConfig, teacher: GuidedTeacher | None = None):
        super().__init__(student, grid, config, teacher)
        if teacher is None:
            raise ConfigError(f"{self.name} calls the guided teacher: it needs the store's unconditional embeddings")
        self.solver = SkippingGrid.make(student.ode, config.peer.solver_steps)
        self.guidance_range = config.peer.teacher_guidance or (teacher.guidance, teacher.guidance)
        self.uncond = teacher.uncond.to(student.device, student.dtype)

    def draw(self, example: Example, generator: torch.Generator) -> ConsistencyDraw:
        """Index, noise and guidance from the run's generator, then the teacher's one step."""
        if example.x0 is None:
            raise ConfigError(f"{self.name} needs clean latents x0 for trajectory {example.index}")
        student = self.student
        x0 = example.x0.to(student.device, torch.float32)
        index = int(torch.randint(len(self.solver), (1,), generator=generator))
        noise = torch.randn(x0.shape, generator=generator).to(student.device)
        low, high = self.guidance_range
        guidance = low + (high - low) * float(torch.rand((), generator=generator))
        t_plus, t = self.solver.timesteps[index], self.solver.previous[index]
        x_plus = student.ode.noise(x0, t_plus, noise)
        cond = example.cond.to(student.device, student.dtype)
        with torch.no_grad(), teacher_mode(student.unet), student.autocast():
            out = guided_prediction(student.unet, x_plus.to(student.dtype), student.ode.network_time(t_plus), cond,
                                    guidance, self.uncond).float()
        x_teacher = student.ode.step(x_plus, out, t_plus, t)
        return ConsistencyDraw(index, t_plus, t, x_plus, x_teacher, guidance)
