"""Where ``gpu_check.py`` runs and how long it may: the CUDA device (or the CPU for ``--smoke``),
its peak-memory probe, and the wall-clock budget items are skipped against."""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch

from planner.meta_memory import MemoryCounter


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def holds(self, seconds: float) -> bool:
        return self.left() > seconds


class Machine:
    """Where the check runs: CUDA (max_memory_allocated) or, with --smoke, the CPU (live tensors)."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")

    def sync(self) -> None:
        if not self.smoke:
            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if not self.smoke:
            torch.cuda.empty_cache()

    @contextmanager
    def peak(self, resident: Callable[[], Iterable[torch.Tensor]]) -> Iterator[dict]:
        """Peak bytes of the block, everything already on the device included."""
        box: dict = {}
        if self.smoke:
            counter = MemoryCounter("cpu")
            counter.track(resident())
            with counter:
                yield box
            box["peak_bytes"] = counter.peak
        else:
            self.sync()
            torch.cuda.reset_peak_memory_stats()
            yield box
            self.sync()
            box["peak_bytes"] = torch.cuda.max_memory_allocated()
            box["reserved_peak_bytes"] = torch.cuda.max_memory_reserved()
            free, total = torch.cuda.mem_get_info()
            box["device_used_bytes"] = total - free

    @property
    def probe(self) -> str:
        return "live-tensor peak (CPU smoke run)" if self.smoke else "torch.cuda.max_memory_allocated"
