"""The interface every teacher ODE implements, so that the method, Stage A, the samplers and
evaluation are written once for VP-DDIM and rectified-flow teachers alike.

A *level* is where a sample sits on the ODE: an integer DDIM timestep for VP (``-1`` = the clean
end), a noise level σ ∈ [0, 1] for rectified flow. Levels are compared only through the ODE
(``steps``, ``draw_level``, ``level_above``), never by the caller's arithmetic, and the network is
fed :meth:`Ode.network_time` of a level, not the level itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np
import torch

Level = Union[int, float]
Step = tuple[Level, Level]  # (level the network is evaluated at, level the step lands on)


@dataclass(frozen=True)
class StockSampler:
    """A stock diffusers sampler as a pipeline call sets it up: the scheduler (its config carries
    ``_class_name``), the step count and the extra ``set_timesteps`` arguments (e.g. ``sigmas``).
    What the exported student ships with, and the teacher baselines evaluation runs."""

    scheduler_config: dict
    num_steps: int
    timestep_kwargs: dict = field(default_factory=dict)

    def scheduler(self):
        import diffusers

        cfg = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        return getattr(diffusers, self.scheduler_config["_class_name"]).from_config(cfg)

    @property
    def class_name(self) -> str:
        return self.scheduler_config["_class_name"]


class Ode(ABC):
    """One teacher family's sampling ODE, built from the teacher's scheduler config."""

    family: str  # "vp" or "flow", recorded in exports and reports
    num_train_timesteps: int

    def to(self, device: torch.device | str) -> "Ode":
        """The ODE's tables on ``device`` (in place); a family without tables has nothing to move."""
        return self

    def tensors(self) -> list[torch.Tensor]:
        """The tables the ODE keeps on its device (for memory accounting)."""
        return []

    @abstractmethod
    def steps(self, num_steps: int) -> tuple[Step, ...]:
        """The ``num_steps``-step sampler's (from, to) levels, noise first; the last lands clean.

        The student's grid is ``steps(N)``; the teacher's fine grid is ``steps(N·M)``, which
        :class:`~rapm_core.ode.grid.SlotGrid` requires to contain the student's at every M-th
        point (VP: diffusers' trailing grids, refused for the N, M where they do not; flow: always).
        """

    @abstractmethod
    def network_time(self, level: Level | torch.Tensor) -> Any:
        """What the denoiser is fed as its timestep at ``level`` (as the stock pipeline feeds it)."""

    @abstractmethod
    def step(self, x: torch.Tensor, output: torch.Tensor, level_from: Level | torch.Tensor,
             level_to: Level | torch.Tensor) -> torch.Tensor:
        """One deterministic step with the network's ``output`` at ``level_from``, to any ``level_to``."""

    @abstractmethod
    def predict_x0(self, x: torch.Tensor, output: torch.Tensor, level: Level | torch.Tensor) -> torch.Tensor:
        """x̂0 from the network's output at ``level``."""

    @abstractmethod
    def step_x0(self, z_from: torch.Tensor, z_to: torch.Tensor, level_from: Level, level_to: Level) -> torch.Tensor:
        """The x̂0 a deterministic step ``z_from`` → ``z_to`` used, solved from the two positions
        (no network call): what a stored trajectory's previews show."""

    @abstractmethod
    def noise(self, x0: torch.Tensor, level: Level, noise: torch.Tensor) -> torch.Tensor:
        """The forward process from clean ``x0`` to ``level`` with ``noise``."""

    @abstractmethod
    def renoise(self, x: torch.Tensor, level_from: Level | torch.Tensor, level_to: Level | torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        """The forward process from ``level_from`` up to ``level_to`` with fresh ``noise``."""

    @abstractmethod
    def draw_level(self, low: Level, high: Level, generator: torch.Generator) -> Level:
        """One level drawn uniformly from [low, high) with ``generator`` (a discriminator's t′)."""

    @abstractmethod
    def level_above(self, level: Level, divisions: int) -> Level:
        """The level 1/``divisions`` of the whole noise range above ``level`` (PCM's t′ window)."""

    @abstractmethod
    def training_levels(self) -> Sequence[Level]:
        """The T levels the teacher was trained at, low noise first (index = training timestep)."""

    def skipping_grid(self, steps: int) -> tuple[tuple[Level, ...], tuple[Level, ...]]:
        """The consistency peers' K-step teacher grid: (t₊ of index i, t of index i), low noise first.

        As the LCM/PCM scripts' solvers (SD 1.5's DDIMSolver, SD3's EulerSolver) build it: index i is
        the training level T/K·(i+1) − 1, t that of index i − 1, and for i = 0 the lowest training level
        (VP: timestep 0; flow: σ of training timestep 1, not the clean end).
        """
        levels = self.training_levels()
        ratio = self.num_train_timesteps // steps
        indices = [int(i) for i in (np.arange(1, steps + 1) * ratio).round().astype(np.int64) - 1]
        return tuple(levels[i] for i in indices), tuple(levels[i] for i in [0] + indices[:-1])

    @abstractmethod
    def stock_sampler(self, num_steps: int) -> StockSampler:
        """The stock scheduler (+ ``set_timesteps`` arguments) that reproduces :meth:`steps`."""

    @abstractmethod
    def dpm_solver(self, num_steps: int) -> StockSampler:
        """diffusers' DPM-Solver++ (2nd order multistep) for this ODE on the same N-step grid."""
