"""Which ODE a teacher's scheduler config describes."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from rapm_core.flow_grid import is_flow_config
from rapm_core.ode.base import Ode
from rapm_core.ode.flow import RectifiedFlow
from rapm_core.ode.vp import VpDdim


def ode_for(scheduler_config: Mapping[str, Any] | Any, device: torch.device | str = "cpu") -> Ode:
    """The teacher's ODE from its scheduler config: FlowMatchEulerDiscreteScheduler → rectified
    flow; DDIM, PNDM, Euler … (betas) → VP-DDIM. An ``Ode`` passed in is returned as is."""
    if isinstance(scheduler_config, Ode):
        return scheduler_config
    cls = RectifiedFlow if is_flow_config(scheduler_config) else VpDdim
    return cls(scheduler_config, device)
