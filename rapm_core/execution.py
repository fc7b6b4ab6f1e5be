"""Where a sharded stage runs, as config, and the pure pieces of sharding (no Dask, no Prefect).

A stage that splits by index range (trajectory generation; evaluation sampling) cuts its range
with :func:`shard_ranges`, and each shard loads its model through :func:`worker_cached`, so a
worker process that runs many shards loads it once. ``flows.sharding.ShardRunner`` sends the shards
to the backend :class:`ExecutionConfig` names.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Hashable, Literal, TypeVar

from pydantic import Field, model_validator

from rapm_core.config import StrictModel

T = TypeVar("T")

# Shards per worker when no shard size is given: small enough to balance uneven workers and to
# show progress, large enough that Prefect's per-task overhead stays negligible.
SHARDS_PER_WORKER = 4


class ExecutionConfig(StrictModel):
    """Where a sharded stage runs (speed only: results are identical on every backend)."""

    backend: Literal["in-process", "local-cluster", "scheduler"] = Field(
        "in-process", description="in-process; a Dask cluster of --workers processes started here; "
        "or the running Dask scheduler at --scheduler-address")
    workers: int | None = Field(
        None, ge=1, description="local-cluster workers (default: one per visible GPU, else 2); each GPU worker "
        "sees only its own GPU through CUDA_VISIBLE_DEVICES")
    scheduler_address: str | None = Field(None, description="scheduler backend: e.g. tcp://10.0.0.5:8786")
    shard_size: int | None = Field(
        None, ge=1, description=f"items per shard, rounded up to a multiple of the batch size "
        f"(default: about {SHARDS_PER_WORKER} shards per worker)")
    torch_threads: int | None = Field(
        None, ge=1, description="local-cluster CPU workers: torch threads each (default: cores / workers)")
    dask_temporary_directory: str | None = Field(
        None, description="Dask workers' scratch directory (default: $DASK_TEMPORARY_DIRECTORY, else Dask's)")

    @model_validator(mode="after")
    def _check(self) -> "ExecutionConfig":
        if self.backend == "scheduler" and not self.scheduler_address:
            raise ValueError("backend 'scheduler' needs --scheduler-address")
        if self.backend != "scheduler" and self.scheduler_address:
            raise ValueError("--scheduler-address is only used with --backend scheduler")
        return self


def shard_ranges(start: int, stop: int, shard_size: int, align: int) -> list[tuple[int, int]]:
    """[start, stop) cut into ranges whose inner edges sit on multiples of ``align``.

    Stages batch at multiples of their batch size (``align``); edges there make every shard
    batch exactly as one uninterrupted run does, hence bit-identical results.
    """
    if align < 1 or shard_size < 1:
        raise ValueError(f"shard size and alignment must be >= 1, got {shard_size}, {align}")
    size = math.ceil(shard_size / align) * align
    first = start - start % size
    return [(max(e, start), min(e + size, stop)) for e in range(first, stop, size) if min(e + size, stop) > start]


def default_shard_size(count: int, workers: int, align: int) -> int:
    return max(align, math.ceil(count / (SHARDS_PER_WORKER * max(workers, 1))))


# -- per-process model cache -----------------------------------------------------------------------
_cache: dict[Hashable, Any] = {}
_cache_lock = threading.Lock()


def worker_cached(key: Hashable, load: Callable[[], T]) -> T:
    """``load()`` once per process and key, then the same object for every later shard.

    Only the latest key is kept: a worker serves one model at a time, and holding a previous
    one would double its memory (a teacher can be GBs).
    """
    with _cache_lock:
        if key not in _cache:
            _cache.clear()
            _cache[key] = load()
        return _cache[key]
