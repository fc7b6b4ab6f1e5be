"""How far a long stage has got: one record for every stage, so every flow reports it alike."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` items (trajectories, iterations, images); ``rate`` is items per second
    over the items this call made (a resumed run's earlier items don't count towards it)."""

    done: int
    total: int
    rate: float
    unit: str

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    @property
    def eta_s(self) -> float:
        return (self.total - self.done) / self.rate if self.rate > 0 else math.inf

    def line(self) -> str:
        eta = f"{self.eta_s:.0f} s" if math.isfinite(self.eta_s) else "unknown"
        return f"{self.done}/{self.total} {self.unit}, {self.rate:.3g} {self.unit}/s, ETA {eta}"
