"""Every distillation method by name: the one place a new method is listed."""

from __future__ import annotations

from rapm_core.distill.config import MethodConfig
from rapm_core.distill.lcm import Lcm
from rapm_core.distill.method import GuidedTeacher, Method
from rapm_core.distill.pcm import Pcm
from rapm_core.distill.rapm import Rapm
from rapm_core.distill.student import Student
from rapm_core.ode import SlotGrid

METHODS: dict[str, type[Method]] = {"rapm": Rapm, "pcm": Pcm, "lcm": Lcm}


def build_method(student: Student, grid: SlotGrid, config: MethodConfig,
                 teacher: GuidedTeacher | None = None) -> Method:
    """The method ``config.method`` names (``teacher``: the store's guidance, for the peers)."""
    return METHODS[config.method](student, grid, config, teacher)
