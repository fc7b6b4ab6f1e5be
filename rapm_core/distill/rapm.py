"""RAPM: relative and absolute position matching (Zhang et al., arXiv 2503.20744), as one method.

Per slot n (N−1 → 0) the student jumps once, z^φ_n = DDIM(z_{n+1}, t_{n+1} → t_n, ε_φ), and is
compared with two targets from the stored teacher trajectory Z: the absolute position
z̃_n = Z[(N−n)·M] and the relative position ẑ_n, the student's own (detached) jump from the
teacher's point d fine steps into the slot. The relative targets start from stored positions, not
from the student's chain, so all of an iteration's are computed before the slot loop, in one
batch. The student's position is detached before the next slot, so each slot's graph is freed by
its own backward. Each target is matched pointwise, by a
discriminator head set on the frozen teacher's features, or both.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from rapm_core.conditioning import Conditioning
from rapm_core.distill.config import MethodConfig
from rapm_core.distill.adversarial import Discriminators
from rapm_core.distill.losses import pointwise_loss
from rapm_core.distill.method import Example, GuidedTeacher, LossTerms, Method
from rapm_core.distill.student import Student
from rapm_core.errors import ConfigError
from rapm_core.ode import SlotGrid

KINDS = ("rel", "abs")


class SlotTargets(NamedTuple):
    absolute: torch.Tensor  # z̃_n = Z[(N−n)·M], shape (1, C, H, W)
    relative_start: torch.Tensor  # ẑ^Δ_{n+1} = Z[(N−1−n)·M + d]
    relative_time: int  # τ = t_{n+1} − Δ


def slot_targets(positions: torch.Tensor, grid: SlotGrid, n: int, d: int) -> SlotTargets:
    """The stored positions slot ``n`` is trained against (no teacher call needed)."""
    a, r = grid.absolute_index(n), grid.relative_index(n, d)
    return SlotTargets(positions[a:a + 1], positions[r:r + 1], grid.relative_time(n, d))


class Rapm(Method):
    name = "rapm"
    title = "Relative and Absolute Position Matching (Zhang et al., arXiv 2503.20744)"

    def __init__(self, student: Student, grid: SlotGrid, config: MethodConfig, teacher: GuidedTeacher | None = None):
        super().__init__(student, grid, config, teacher)
        rapm = config.rapm
        if not 0 <= rapm.relative_offset < grid.steps_per_slot:
            raise ConfigError(f"relative_offset d={rapm.relative_offset} must be in [0, M={grid.steps_per_slot})")
        # Heads only for the adversarial losses: a pointwise run carries no untrained weights in
        # its checkpoints, and its optimizer state holds only the LoRA's.
        kinds = [k for k in KINDS if rapm.adversarial(k)]
        self.discriminators = (Discriminators(student, kinds, config.adversarial, config.training.init_seed)
                               if kinds else None)
        if self.discriminators is not None:
            self.heads = self.discriminators.heads

    def student_passes(self) -> int:
        return 1 if self.config.rapm.slots_per_iteration == "random" else self.grid.num_slots

    def losses(self, example: Example, generator: torch.Generator) -> Iterator[LossTerms]:
        student, grid = self.student, self.grid
        positions = example.positions.to(student.device, torch.float32)
        if positions.shape[0] != grid.total_steps + 1:
            raise ConfigError(
                f"trajectory has {positions.shape[0]} positions, the grid N·M+1 = {grid.total_steps + 1}")
        cond = example.cond.to(student.device, student.dtype)
        z = positions[0:1]  # the student starts from the teacher's own initial noise
        slots = list(range(grid.num_slots - 1, -1, -1))
        if self.config.rapm.slots_per_iteration == "random":
            chosen = int(torch.randint(grid.num_slots, (1,), generator=generator))
            with torch.no_grad():
                for n in range(grid.num_slots - 1, chosen, -1):
                    z = student.jump(z, grid.slot_start(n), grid.slot_end(n), cond)
            slots = [chosen]
        relatives = self.relative_targets(positions, cond, slots)
        for n, relative in zip(slots, relatives):
            terms, z_next = self.slot_losses(z, positions, relative, cond, n, generator)
            yield terms
            z = z_next.detach()  # z_n = detach(z^φ_n): no gradient crosses a slot boundary

    @torch.no_grad()
    def relative_targets(self, positions: torch.Tensor, cond: Conditioning,
                         slots: list[int]) -> list[torch.Tensor | None]:
        """ẑ_n of every slot in ``slots``, in one batched student call (``None`` when ℓ_rel is off).

        They start from stored teacher positions, not from the student's chain, so they are known
        before the slot loop: one batch of N rows, each at its own time τ → t_n, instead of N
        batch-1 calls inside it. No random draw is made here, so the run's generator sees the same
        sequence either way.
        """
        if self.config.rapm.loss_relative == "off":
            return [None] * len(slots)
        d, grid = self.config.rapm.relative_offset, self.grid
        starts = torch.cat([slot_targets(positions, grid, n, d).relative_start for n in slots])
        times = torch.tensor([grid.relative_time(n, d) for n in slots], device=positions.device)
        ends = torch.tensor([grid.slot_end(n) for n in slots], device=positions.device)
        return list(self.student.jump(starts, times, ends, cond[[0] * len(slots)]).split(1))

    def slot_losses(self, z: torch.Tensor, positions: torch.Tensor, relative: torch.Tensor | None,
                    cond: Conditioning, n: int, generator: torch.Generator) -> tuple[LossTerms, torch.Tensor]:
        """Slot ``n``'s student jump, targets and loss terms (the per-slot box of the diagram);
        ``relative`` is the slot's ẑ_n from :meth:`relative_targets`."""
        rapm, student, grid = self.config.rapm, self.student, self.grid
        t_start, t_end = grid.slot_start(n), grid.slot_end(n)
        fake = student.jump(z.detach(), t_start, t_end, cond)
        real = {"rel": relative, "abs": slot_targets(positions, grid, n, rapm.relative_offset).absolute}
        terms = LossTerms(generator={}, slot=n)
        if self.discriminators is not None:
            # t′ ∈ [t_n, t_{n+1}): inside the slot the student just crossed.
            adv = self.discriminators.terms(fake=fake, reals=real, level=t_end, t_range=(t_end, t_start),
                                            cond=cond, weights={k: rapm.weight(k) for k in KINDS},
                                            generator=generator)
            terms = LossTerms(generator=adv.generator, discriminator=adv.discriminator, stats=adv.stats, slot=n)
        for kind in KINDS:
            if rapm.pointwise_on(kind):
                p = pointwise_loss(fake, real[kind], self.config.pointwise.pointwise, self.config.pointwise.huber_c)
                terms.generator[f"{kind}_pointwise"] = rapm.weight(kind) * p
                terms.stats[f"{kind}_pointwise"] = float(p.detach())
        return terms, fake
