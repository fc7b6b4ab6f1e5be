"""The interface every distillation method implements: its loss, EDM-style.

A method is one small class. Given the student (the teacher UNet with a LoRA), one training
example and the run's generator, :meth:`Method.losses` yields its loss terms, once per backward
pass it wants: RAPM one per slot (each slot's graph is freed by its own backward, so memory is
that of one student call), a consistency method once per iteration. The shared
:class:`rapm_core.distill.trainer.Trainer` does everything else for every method alike:
backward (G terms into the LoRA only, D terms into the heads only), the non-finite guard,
clipping, optimizer steps, exact-resume state and export.

All randomness of an iteration must come from the caller's CPU ``generator``, so a run resumed
from a checkpoint continues bit-identically.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator

import torch

from rapm_core.conditioning import Conditioning
from rapm_core.distill.config import MethodConfig
from rapm_core.distill.student import Student
from rapm_core.ode import StockSampler, SlotGrid
from rapm_core.sampler import sample_stock


@dataclass
class Example:
    positions: torch.Tensor  # (K+1, C, H, W): the stored teacher trajectory Z, K = N·M
    cond: Conditioning  # batch 1
    index: int  # trajectory index in the store, for error reports
    x0: torch.Tensor | None = None  # (1, C, H, W) clean latents, for the methods that noise them


@dataclass(frozen=True)
class GuidedTeacher:
    """How the store's teacher was guided: its unconditional row and CFG scale, for methods that
    call the guided teacher themselves (the consistency peers)."""

    uncond: Conditioning  # batch 1
    guidance: float


@dataclass
class LossTerms:
    """One backward pass's worth of loss."""

    generator: dict[str, torch.Tensor]  # weighted; their sum trains the LoRA
    discriminator: dict[str, torch.Tensor] = field(default_factory=dict)  # their sum trains the heads
    stats: dict[str, float] = field(default_factory=dict)  # unweighted terms, D accuracies, for the log
    slot: int | None = None  # where in the iteration (error reports)


class Method(ABC):
    """A distillation method's loss and what it needs besides the LoRA."""

    name: str

    # What the exported model card calls the method.
    title: str

    def __init__(self, student: Student, grid: SlotGrid, config: MethodConfig, teacher: GuidedTeacher | None = None):
        self.student, self.grid, self.config, self.teacher = student, grid, config, teacher
        # Trainable modules besides the LoRA (discriminator heads), keyed by a short name that
        # prefixes their checkpoint keys; empty means no discriminator optimizer.
        self.heads = torch.nn.ModuleDict()

    @abstractmethod
    def losses(self, example: Example, generator: torch.Generator) -> Iterator[LossTerms]:
        """The iteration's loss terms, one ``LossTerms`` per backward pass."""

    def student_passes(self) -> int:
        """Student forward+backward passes one iteration makes (the peers' equal-budget unit)."""
        return 1

    def stock_sampler(self) -> StockSampler:
        """What the distilled student samples with, exported beside the LoRA: the stock scheduler
        of the teacher's ODE on the student's N-step grid (trailing DDIM, or flow Euler with
        ``sigmas=``), guidance 1."""
        return self.student.ode.stock_sampler(self.grid.num_slots)

    @torch.no_grad()
    def sample(self, latents: torch.Tensor, cond: Conditioning,
               generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """The distilled student through the one path evaluation and the export use
        (:func:`rapm_core.sampler.sample_stock`); ``generator`` feeds stochastic samplers."""
        return sample_stock(self.student.unet, self.stock_sampler(), latents, cond, generator=generator)
