"""Where a sharded stage runs: in this process, on a local Dask cluster, or on a running one.

A stage that splits by index range (trajectory generation; evaluation sampling can reuse it)
gives ``ShardRunner.run`` a Prefect task and one parameter dict per shard; Prefect's
``DaskTaskRunner`` sends each task to a Dask worker. The contract a shard task must keep:

- it writes only its own index range, one item per chunk of a shared store (safe for
  concurrent writers; sharded Zarr arrays are not), so shards never need to coordinate;
- it is idempotent and resumable (finished items are skipped), because Dask re-runs the task
  of a worker that died, on another worker, and a re-run flow re-runs every shard;
- its result does not depend on which shard an item fell in (per-item seeds), so any sharding
  equals the in-process run.

Shard tasks load their model through ``worker_cached``: a worker process runs many shards and
loads the model once.
"""

from __future__ import annotations

import math
import os
import threading
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Hashable, Iterator, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

T = TypeVar("T")

# Shards per worker when no shard size is given: small enough to balance uneven workers and to
# show progress, large enough that Prefect's per-task overhead (~0.5 s) stays negligible.
SHARDS_PER_WORKER = 4


class ExecutionConfig(BaseModel):
    """Where a sharded stage runs (speed only: results are identical on every backend)."""

    model_config = ConfigDict(extra="forbid")

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


# -- Dask ----------------------------------------------------------------------------------------
def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def local_worker_envs(workers: int | None, torch_threads: int | None) -> list[dict[str, str]]:
    """One environment per local worker: its own GPU when there are GPUs, else a share of the cores.

    Dask pins OMP/MKL to one thread per worker by default (right for numpy tasks, wrong for a
    UNet on a CPU): CPU workers get ``cores / workers`` threads unless told otherwise.
    """
    gpus = _visible_gpus()
    n = workers or (len(gpus) if gpus else 2)
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(n)]
    threads = str(torch_threads or max(1, (os.cpu_count() or 1) // n))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(n)]


@contextmanager
def local_cluster(execution: ExecutionConfig) -> Iterator[str]:
    """A Dask cluster of worker processes on this machine, yielding its scheduler address.

    Everything binds to 127.0.0.1 and the dashboard to a free port (the default 8787 collides
    with any other cluster on the machine).
    """
    import dask
    from distributed import Nanny, Scheduler, SpecCluster

    scratch = execution.dask_temporary_directory or dask.config.get("temporary-directory", None)
    envs = local_worker_envs(execution.workers, execution.torch_threads)
    # Thread counts must be in the environment before a worker process starts (torch reads them
    # at import), i.e. in Dask's pre-spawn environment, which a Nanny reads when it is created.
    pre_spawn = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in envs[0].items() if k.endswith("_NUM_THREADS")}
    workers = {
        f"rapm-worker-{i}": {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1", "env": env,
                                                       "local_directory": scratch, "name": f"rapm-worker-{i}"}}
        for i, env in enumerate(envs)
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    with dask.config.set({**pre_spawn, **({"temporary-directory": scratch} if scratch else {})}):
        with SpecCluster(workers=workers, scheduler=scheduler, name="rapm") as cluster:
            yield cluster.scheduler_address


@contextmanager
def _api_for_workers() -> Iterator[None]:
    """Point Dask workers at this flow's Prefect API.

    Without ``PREFECT_API_URL`` a flow runs on a temporary server, and every worker process would
    start its own on the same database (a minute each here, then "database is locked"). The
    serialized task context carries the settings, so workers inherit the URL from it.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    url = str(get_client(sync_client=True).api_url)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


class ShardRunner:
    """Runs a Prefect task once per shard on the configured backend; use it inside a flow.

    In-process, shards run one after another in this process. On Dask, each is a task on some
    worker; a worker that dies mid-shard has its shard re-run by Dask elsewhere, and a shard
    that raises is retried per the task's ``retries`` before the run fails.
    """

    def __init__(self, execution: ExecutionConfig):
        self.execution = execution
        self._stack = ExitStack()
        self._runner = None

    def __enter__(self) -> "ShardRunner":
        if self.execution.backend == "in-process":
            return self
        from prefect_dask import DaskTaskRunner

        with self._stack:
            address = (self._stack.enter_context(local_cluster(self.execution))
                       if self.execution.backend == "local-cluster" else self.execution.scheduler_address)
            self._stack.enter_context(_api_for_workers())
            self._runner = self._stack.enter_context(DaskTaskRunner(address=address))
            self._stack = self._stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._runner = None
        self._stack.__exit__(*exc)

    @property
    def workers(self) -> int:
        """Workers that shards spread over (1 in-process)."""
        if self._runner is None:
            return 1
        return max(1, len(self._runner.client.scheduler_info(n_workers=-1)["workers"]))

    def run(self, task, shards: list[dict[str, Any]], on_result: Callable[[Any], None] | None = None) -> list:
        """Each shard's result, in shard order; ``on_result`` sees them as they complete."""
        if self._runner is None:
            results = []
            for params in shards:
                results.append(task(**params))
                if on_result is not None:
                    on_result(results[-1])
            return results
        from prefect.futures import as_completed

        futures = [self._runner.submit(task, params) for params in shards]
        for future in as_completed(futures):
            if on_result is not None:
                on_result(future.result())
        return [f.result() for f in futures]

