"""PCM, phased consistency (Wang et al., arXiv 2405.18407), as its SD 1.5 script computes it.

The teacher grid is cut into P = N phases with edges floor(linspace(0, K, N, endpoint=False)).
For the drawn index i, its phase ends at s = the grid's previous timestep of the phase's edge e.
The student jumps straight from x₊ (time t₊) to s with its own prediction; the target is the
teacher's one step t₊ → t followed by the same LoRA UNet's jump t → s (no gradient; when i is
itself an edge, t = s and the target is the teacher's step alone). Pointwise loss at the phase
end, optionally plus an adversarial term on the teacher's features (fake: the student's jump,
real: the target, both re-noised from s to t′ ∈ [s, s + T/N)). On a rectified-flow teacher the
same lines compute PCM's SD3 script: its phase edges on the σ grid of ``Ode.skipping_grid``, the
jumps Euler steps, t′ within 1/N of the pre-shift range above s (``Ode.level_above``). Its
adversarial script re-noises s → t′ as ((1 − σ′)·x + (σ′ − σ_s)·ε)/(1 − σ_s); here it is the flow's
own forward process (``Ode.renoise``), whose noise has the variance x at σ′ has.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from rapm_core.distill.adversarial import Discriminators
from rapm_core.distill.config import MethodConfig
from rapm_core.distill.consistency import ConsistencyMethod
from rapm_core.distill.losses import pointwise_loss
from rapm_core.distill.method import Example, GuidedTeacher, LossTerms
from rapm_core.distill.student import Student
from rapm_core.ode import SlotGrid


class Pcm(ConsistencyMethod):
    name = "pcm"
    title = "Phased Consistency Models (Wang et al., arXiv 2405.18407)"

    def __init__(self, student: Student, grid: SlotGrid, config: MethodConfig, teacher: GuidedTeacher | None = None):
        super().__init__(student, grid, config, teacher)
        self.edges = [int(e) for e in np.floor(np.linspace(0, len(self.solver), grid.num_slots, endpoint=False))]
        self.discriminators = (Discriminators(student, ["pcm"], config.adversarial, config.training.init_seed)
                               if config.pcm.pcm_adversarial else None)
        if self.discriminators is not None:
            self.heads = self.discriminators.heads

    def phase_end(self, index: int) -> int:
        """s: where the phase holding grid index ``index`` ends."""
        edge = max(e for e in self.edges if e <= index)
        return self.solver.previous[edge]

    def losses(self, example: Example, generator: torch.Generator) -> Iterator[LossTerms]:
        student = self.student
        draw = self.draw(example, generator)
        cond = example.cond.to(student.device, student.dtype)
        s = self.phase_end(draw.index)
        fake = student.jump(draw.x_plus, draw.t_plus, s, cond)
        with torch.no_grad():
            target = draw.x_teacher if draw.t == s else student.jump(draw.x_teacher, draw.t, s, cond)
        p = pointwise_loss(fake, target, self.config.pointwise.pointwise, self.config.pointwise.huber_c)
        generator_terms = {"pcm_pointwise": p}
        stats = {"pcm_pointwise": float(p.detach()), "grid_index": float(draw.index)}
        discriminator_terms = {}
        if self.discriminators is not None:
            t_range = (s, student.ode.level_above(s, self.grid.num_slots))
            adv = self.discriminators.terms(fake=fake, reals={"pcm": target}, level=s, t_range=t_range,
                                            cond=cond, weights={"pcm": 1.0}, generator=generator)
            generator_terms.update(adv.generator)
            discriminator_terms, stats = adv.discriminator, {**stats, **adv.stats}
        yield LossTerms(generator=generator_terms, discriminator=discriminator_terms, stats=stats)
