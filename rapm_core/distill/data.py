"""What a run trains on, in which order: a seeded per-epoch permutation of the store's complete
trajectories addressed by a cursor, read from Zarr one example ahead on a thread."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, NamedTuple

import numpy as np
import torch

from rapm_core.conditioning import Conditioning
from rapm_core.distill.method import Example
from storage.trajectory_store import TrajectoryStore


def epoch_order(indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The trajectories of one epoch, shuffled by (seed, epoch) alone, so any cursor can be rebuilt."""
    return np.random.default_rng([seed, epoch]).permutation(indices)


class DataOrder:
    """Seeded per-epoch permutations addressed by a cursor (epoch, position): the whole data state."""

    def __init__(self, indices: np.ndarray, seed: int):
        self.indices, self.seed = indices, seed
        self._epoch, self._order = -1, indices

    def at(self, cursor: tuple[int, int]) -> int:
        epoch, position = cursor
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_order(self.indices, self.seed, epoch)
        return int(self._order[position])

    def after(self, cursor: tuple[int, int]) -> tuple[int, int]:
        epoch, position = cursor
        return (epoch + 1, 0) if position + 1 == len(self.indices) else (epoch, position + 1)


def load_example(store: TrajectoryStore, index: int, clean: dict[int, torch.Tensor] | None = None) -> Example:
    """Trajectory ``index`` as a training example; its clean latents x0 are ``clean[index]`` when
    given (real renders), else the trajectory's own end Z[N·M] (the teacher's sample)."""
    record = store.read(index)
    positions = torch.from_numpy(np.asarray(record.positions, dtype=np.float32))
    cond = Conditioning.from_arrays([record.conditioning])
    x0 = clean[index] if clean is not None else positions[-1:]
    return Example(positions=positions, cond=cond, index=int(index), x0=x0)


class Fetched(NamedTuple):
    example: Example
    epoch: int  # the data epoch the example belongs to
    next_cursor: tuple[int, int]  # where the data order stands once this example is consumed
    wait_seconds: float  # how long the training loop waited for it (0 when prefetch kept up)


def prefetched(store: TrajectoryStore, order: DataOrder, cursor: tuple[int, int], count: int,
               clean: dict[int, torch.Tensor] | None = None) -> Iterator[Fetched]:
    """``count`` examples from ``cursor`` on, each read from Zarr on a thread while the previous one trains."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        upcoming = pool.submit(load_example, store, order.at(cursor), clean) if count else None
        for i in range(count):
            t0 = time.perf_counter()
            example = upcoming.result()
            waited = time.perf_counter() - t0
            epoch, cursor = cursor[0], order.after(cursor)
            if i + 1 < count:
                upcoming = pool.submit(load_example, store, order.at(cursor), clean)
            yield Fetched(example, epoch, cursor, waited)
