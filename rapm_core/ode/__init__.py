"""Teacher ODEs behind one interface (:class:`Ode`): VP-DDIM and rectified flow, the family a
scheduler config describes, and the slot grid RAPM cuts from either."""

from rapm_core.ode.base import Level, Ode, StockSampler, Step
from rapm_core.ode.family import is_flow_config, ode_for
from rapm_core.ode.flow import RectifiedFlow
from rapm_core.ode.grid import SlotGrid
from rapm_core.ode.vp import VpDdim

__all__ = ["Level", "Ode", "RectifiedFlow", "StockSampler", "SlotGrid", "Step", "VpDdim", "is_flow_config",
           "ode_for"]
