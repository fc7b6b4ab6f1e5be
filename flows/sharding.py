"""Where a sharded stage runs: in this process, on a local Dask cluster, or on a running one.

A stage that splits by index range (trajectory generation; evaluation sampling can reuse it)
gives ``ShardRunner.run`` a Prefect task and one parameter dict per shard; inside a flow run
Prefect's ``DaskTaskRunner`` sends each task to a Dask worker, outside one (``rapm`` without a
Prefect server) a Dask client sends the task's body. The contract a shard task must keep:

- it writes only its own index range, one item per chunk of a shared store (safe for
  concurrent writers; sharded Zarr arrays are not), so shards never need to coordinate;
- it is idempotent and resumable (finished items are skipped), because Dask re-runs the task
  of a worker that died, on another worker, and a re-run flow re-runs every shard;
- its result does not depend on which shard an item fell in (per-item seeds), so any sharding
  equals the in-process run.

The config and the pure pieces (shard ranges, the per-worker model cache) are in
:mod:`rapm_core.execution`; this module is the Dask side.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

from flows.common import in_run, run_task
from rapm_core.execution import ExecutionConfig

LIBRARY_OUTPUT_PRELOAD = "flows.library_output"  # its dask_setup runs in each worker process


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
    with any other cluster on the machine). The workers' stderr is this command's terminal: they
    route the libraries' output as this process does (:mod:`flows.library_output`).
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
                                                       "local_directory": scratch, "name": f"rapm-worker-{i}",
                                                       "preload": [LIBRARY_OUTPUT_PRELOAD]}}
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
    """Runs a Prefect task once per shard on the configured backend, as task runs inside a flow
    run and as plain calls of the task's body outside one.

    In-process, shards run one after another in this process. On Dask, each is a task on some
    worker; a worker that dies mid-shard has its shard re-run by Dask elsewhere, and a shard
    that raises is retried per the task's ``retries`` (by Prefect, or by Dask outside a run)
    before the run fails.
    """

    def __init__(self, execution: ExecutionConfig):
        self.execution = execution
        self._stack = ExitStack()
        self._runner = None  # Prefect's DaskTaskRunner, inside a flow run
        self._client = None  # a plain Dask client, outside one

    def __enter__(self) -> "ShardRunner":
        if self.execution.backend == "in-process":
            return self
        with self._stack:
            address = (self._stack.enter_context(local_cluster(self.execution))
                       if self.execution.backend == "local-cluster" else self.execution.scheduler_address)
            if in_run():
                from prefect_dask import DaskTaskRunner

                self._stack.enter_context(_api_for_workers())
                self._runner = self._stack.enter_context(DaskTaskRunner(address=address))
                self._client = self._runner.client
            else:
                from distributed import Client

                self._client = self._stack.enter_context(Client(address))
            self._stack = self._stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._runner = self._client = None
        self._stack.__exit__(*exc)

    @property
    def workers(self) -> int:
        """Workers that shards spread over (1 in-process)."""
        if self._client is None:
            return 1
        return max(1, len(self._client.scheduler_info(n_workers=-1)["workers"]))

    def run(self, task, shards: list[dict[str, Any]], on_result: Callable[[Any], None] | None = None) -> list:
        """Each shard's result, in shard order; ``on_result`` sees them as they complete."""
        if self._client is None:
            results = []
            for params in shards:
                results.append(run_task(task, **params))
                if on_result is not None:
                    on_result(results[-1])
            return results
        if self._runner is not None:
            from prefect.futures import as_completed

            futures = [self._runner.submit(task, params) for params in shards]
        else:
            from distributed import as_completed

            futures = [self._client.submit(task.fn, **params, retries=task.retries, pure=False) for params in shards]
        for future in as_completed(futures):
            if on_result is not None:
                on_result(future.result())
        return [f.result() for f in futures]

