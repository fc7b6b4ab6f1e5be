"""The base of every config model: what all of them refuse, said once.

Every stage config (the CLI options, the Prefect parameter form and a store's metadata are the
same model) derives from :class:`StrictModel`: unknown keys are an error rather than silently
ignored, and NaN or ±inf in a float field is refused at validation instead of crashing a stage
minutes later (``--guidance inf`` would otherwise reach the sampler).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Device = Literal["auto", "cpu", "cuda"]  # "auto": CUDA when present
Precision = Literal["fp32", "bf16", "fp16"]  # a dtype weights are held or computed in


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FrozenModel(StrictModel):
    """A config that is hashed to name what it made: immutable once built."""

    model_config = ConfigDict(frozen=True)
