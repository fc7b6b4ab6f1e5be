"""The rectified-flow facts a command reads without torch: whether a scheduler config is a flow
one, and the ``sigmas=`` a stock pipeline call takes for RAPM's grids. ``rapm store inspect``
reports them, and it must answer without loading torch (the ODE itself is :mod:`rapm_core.ode`)."""

from __future__ import annotations

from typing import Any, Mapping


def is_flow_config(scheduler_config: Mapping[str, Any] | Any) -> bool:
    """A FlowMatch* scheduler config: named so, or (a pipeline's ``scheduler.config`` carries no class
    name) one with a ``shift`` and no betas."""
    cfg = dict(getattr(scheduler_config, "config", scheduler_config))
    name = str(cfg.get("_class_name", ""))
    if name:
        return name.startswith("FlowMatch")
    return "shift" in cfg and "beta_start" not in cfg and "trained_betas" not in cfg


def pre_shift_sigmas(num_steps: int) -> list[float]:
    """The ``sigmas=`` a stock call takes for RAPM's ``num_steps``-step grid: (K − k)/K, k < K
    (the scheduler shifts them and appends the terminal 0)."""
    return [(num_steps - k) / num_steps for k in range(num_steps)]


def stock_sigmas(num_slots: int, steps_per_slot: int) -> list[float]:
    """The ``sigmas=`` with which ``StableDiffusion3Pipeline(..., sigmas=…)`` reproduces the stored
    N·M-step trajectory (pre-shift values, as the pipeline takes them)."""
    return pre_shift_sigmas(num_slots * steps_per_slot)
