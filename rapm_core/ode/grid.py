"""The coarse/fine slot grid RAPM cuts from a teacher ODE's step grids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from rapm_core.ode.base import Level, Ode, Step
from rapm_core.ode.family import ode_for


@dataclass(frozen=True)
class SlotGrid:
    """N coarse slots, each split into M fine teacher steps (the ODE's N·M- and N-step grids).

    ``fine_steps[k]`` is the teacher's k-th fine step (the level its network call is evaluated at,
    the level it lands on); stored position ``Z[k]`` is the chain after k fine steps, so ``Z[0]``
    is the initial noise. Slot ``n`` (n = N-1 … 0, sampled high to low) is the N-step sampler's
    step N-1-n: it starts at ``slot_start(n)`` and lands on ``slot_end(n)``, the level of
    ``Z[(N-n)·M]``. The fine grid must contain the coarse one at every M-th point.
    """

    num_slots: int
    steps_per_slot: int
    fine_steps: tuple[Step, ...]
    coarse_steps: tuple[Step, ...]
    ode: Ode = field(compare=False, repr=False)

    @classmethod
    def from_ode(cls, ode: Ode, num_slots: int, steps_per_slot: int) -> "SlotGrid":
        if num_slots < 1 or steps_per_slot < 1:
            raise ValueError(f"slots and steps per slot must be >= 1, got N={num_slots}, M={steps_per_slot}")
        fine, coarse = ode.steps(num_slots * steps_per_slot), ode.steps(num_slots)
        if tuple(s for s, _ in fine[::steps_per_slot]) != tuple(s for s, _ in coarse):
            raise ValueError(
                f"the {num_slots * steps_per_slot}-step grid {[s for s, _ in fine]} does not contain the "
                f"{num_slots}-step grid {[s for s, _ in coarse]} at every {steps_per_slot}-th point; choose another N, M"
            )
        return cls(num_slots, steps_per_slot, fine, coarse, ode)

    @classmethod
    def from_scheduler(cls, scheduler_config: Mapping[str, Any] | Any, num_slots: int, steps_per_slot: int) -> "SlotGrid":
        return cls.from_ode(ode_for(scheduler_config), num_slots, steps_per_slot)

    @property
    def fine(self) -> tuple[Level, ...]:
        """The level each fine step evaluates the network at."""
        return tuple(s for s, _ in self.fine_steps)

    @property
    def coarse(self) -> tuple[Level, ...]:
        """The level each of the N student steps evaluates the network at."""
        return tuple(s for s, _ in self.coarse_steps)

    @property
    def num_train_timesteps(self) -> int:
        return self.ode.num_train_timesteps

    @property
    def total_steps(self) -> int:
        return self.num_slots * self.steps_per_slot

    def fine_prev(self, k: int) -> Level:
        """Level that fine step ``k`` lands on (the level of stored position ``Z[k+1]``)."""
        return self.fine_steps[k][1]

    def slot_start(self, n: int) -> Level:
        """t_{n+1}: the level the student evaluates at when it enters slot ``n``."""
        return self.coarse_steps[self.num_slots - 1 - n][0]

    def slot_end(self, n: int) -> Level:
        """t_n, where the N-step sampler's step lands (the clean end for the last slot)."""
        return self.coarse_steps[self.num_slots - 1 - n][1]

    def boundary_indices(self) -> list[int]:
        """Indices into Z of the N+1 slot boundaries, noise first: 0, M, 2M, …, N·M."""
        return [k * self.steps_per_slot for k in range(self.num_slots + 1)]

    def boundary_times(self) -> list[Level]:
        """The level of each slot boundary, noise first (VP's ``-1`` = clean end).

        A boundary position is where a step landed, so its level is ``slot_end``, which for VP
        (diffusers' ``t - T // N`` rule) can sit one below the level the next step evaluates at:
        for N = 3 the second boundary is at 333 while the coarse grid's next time is 332. Every
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

    def relative_time(self, n: int, d: int) -> Level:
        """τ = t_{n+1} − Δ: the fine level the teacher would evaluate ``Z[relative_index]`` at."""
        return self.fine[self.relative_index(n, d)]

    def _check_slot(self, n: int) -> None:
        if not 0 <= n < self.num_slots:
            raise ValueError(f"slot must be in [0, N={self.num_slots}), got {n}")
