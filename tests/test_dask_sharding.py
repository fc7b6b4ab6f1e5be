"""Stage A fanned out over a real Dask cluster (worker processes), through Prefect's Dask runner
inside a flow run and through a plain Dask client outside one.

The sharded store must be bit-identical to the in-process one, also when the shards write to
object storage concurrently, and also when a worker is killed mid-shard (Dask re-runs its
shard elsewhere; finished batches are kept, the rest is redone, nothing is lost).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import numpy as np
import pytest
import zarr
from prefect import task

from flows.sharding import ShardRunner, local_worker_envs
from rapm_core.execution import ExecutionConfig, default_shard_size, shard_ranges, worker_cached
from flows.trajectories import trajectories_flow
from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_core.trajectories.generate import generate_trajectories
from storage.prompt_store import PromptRecord, prompt_id, write_prompt_store

NUM = 8


def _config(prompts, teacher, out, **kw) -> TrajectoriesConfig:
    base = dict(prompts=str(prompts), teacher=str(teacher), out=str(out), slots=2, steps_per_slot=4, guidance=7.5,
                seed=11, batch_size=1, device="cpu", store_dtype="float32")
    return TrajectoriesConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_sd15_dir):
    """Prompt store and the in-process store every sharded store must equal."""
    root = tmp_path_factory.mktemp("sharding")
    write_prompt_store(root / "prompts", [PromptRecord(prompt_id(f"prompt {i}"), f"prompt {i}", "train")
                                          for i in range(NUM)])
    config = _config(root / "prompts", tiny_sd15_dir, root / "reference")
    generate_trajectories(config, log=lambda _m: None)
    return config


def _assert_same_store(out: str, reference: TrajectoriesConfig) -> None:
    ours, ref = zarr.open_group(out, mode="r"), zarr.open_group(reference.out, mode="r")
    assert ours["complete"][:].all()
    assert sorted(ours.array_keys()) == sorted(ref.array_keys())
    for name in ref.array_keys():
        assert np.array_equal(ours[name][:], ref[name][:]), name


# -- plain functions ---------------------------------------------------------------------------
def test_shards_cover_the_range_on_batch_edges():
    assert shard_ranges(0, 10, 4, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(0, 10, 3, 2) == [(0, 4), (4, 8), (8, 10)]  # size rounded up to the batch
    assert shard_ranges(5, 10, 4, 2) == [(5, 8), (8, 10)]  # inner edges stay on multiples
    assert shard_ranges(3, 3, 4, 1) == []
    assert default_shard_size(100, 2, 4) == 13 and default_shard_size(3, 8, 4) == 4


def test_execution_config_and_worker_envs(monkeypatch):
    with pytest.raises(ValueError, match="scheduler-address"):
        ExecutionConfig(backend="scheduler")
    with pytest.raises(ValueError, match="only used with"):
        ExecutionConfig(scheduler_address="tcp://127.0.0.1:8786")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert local_worker_envs(None, None) == [{"CUDA_VISIBLE_DEVICES": "2"}, {"CUDA_VISIBLE_DEVICES": "5"}]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in local_worker_envs(3, None)] == ["2", "5", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local_worker_envs(2, 3) == [{"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}] * 2


def test_worker_cache_loads_once_and_keeps_one_model():
    loads = []

    def load(name):
        loads.append(name)
        return object()

    a = worker_cached(("t", "a"), lambda: load("a"))
    assert worker_cached(("t", "a"), lambda: load("a")) is a
    worker_cached(("t", "b"), lambda: load("b"))
    assert worker_cached(("t", "a"), lambda: load("a")) is not a
    assert loads == ["a", "b", "a"]


@task
def _span(a: int, b: int) -> int:
    return b - a


def test_in_process_runner_runs_shards_in_order():
    seen = []
    with ShardRunner(ExecutionConfig()) as runner:  # outside a flow run: the task's body, called directly
        assert runner.workers == 1
        assert runner.run(_span, [{"a": 0, "b": 3}, {"a": 3, "b": 4}], on_result=seen.append) == [3, 1]
    assert seen == [3, 1]


# -- real clusters -----------------------------------------------------------------------------
@pytest.mark.slow
def test_local_cluster_gives_workers_their_environment(tmp_path, monkeypatch):
    from distributed import Client

    from flows.sharding import local_cluster

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the CPU layout, also on a GPU machine
    execution = ExecutionConfig(backend="local-cluster", workers=2, torch_threads=1,
                                dask_temporary_directory=str(tmp_path / "dask"))
    with local_cluster(execution) as address, Client(address) as client:
        info = client.scheduler_info(n_workers=-1)
        assert len(info["workers"]) == 2 and address.startswith("tcp://127.0.0.1:")
        assert info["services"]["dashboard"] != 8787
        env = client.run(lambda: (os.environ["OMP_NUM_THREADS"], os.environ["MKL_NUM_THREADS"]))
        assert set(env.values()) == {("1", "1")}
        assert all(str(tmp_path / "dask") in w["local_directory"] for w in info["workers"].values())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_bucket):  # noqa: F811
    """Two worker processes, one thread each; shared by the tests below so teachers stay loaded.

    Started inside ``s3_bucket``: worker processes take the S3 endpoint and keys from the
    environment they are spawned with, as they would in production.
    """
    import dask
    from distributed import Client, LocalCluster

    scratch = tmp_path_factory.mktemp("dask")
    with dask.config.set({"temporary-directory": str(scratch)}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address="127.0.0.1:0") as local, Client(local) as client:
        yield local.scheduler_address, client


@pytest.mark.slow
def test_two_workers_write_one_s3_store_like_in_process(reference, cluster, s3_bucket):  # noqa: F811
    address, _client = cluster
    url = f"{s3_bucket}/sharded-{uuid.uuid4().hex[:8]}"
    execution = ExecutionConfig(backend="scheduler", scheduler_address=address, shard_size=2)
    # The flow's body outside any Prefect run, as `rapm` runs it without a server: the shards go to
    # the workers through a plain Dask client (the test below goes through Prefect's Dask runner).
    summary = trajectories_flow.fn(_config(reference.prompts, reference.teacher, url, execution=execution))
    assert (summary["complete"], summary["total"]) == (NUM, NUM)
    _assert_same_store(url, reference)


class _Killer(threading.Thread):
    """Kills every worker process that is running a shard, once some shard is half done."""

    def __init__(self, client, out: str, shards: list[tuple[int, int]]):
        super().__init__(daemon=True)
        self.client, self.out, self.shards = client, out, shards
        self.killed: list[int] = []
        self.mask_at_kill: np.ndarray | None = None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                mask = zarr.open_group(self.out, mode="r")["complete"][:]
            except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError):
                mask = None
            if mask is not None and any(0 < mask[a:b].sum() < b - a for a, b in self.shards):
                busy = [addr for addr, keys in self.client.processing().items() if keys]
                pids = self.client.run(os.getpid, workers=busy)
                self.mask_at_kill = mask
                for pid in pids.values():
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                return
            time.sleep(0.05)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)


@pytest.mark.slow
def test_worker_killed_mid_shard_is_rerun_and_nothing_is_lost(reference, cluster, tmp_path):
    address, client = cluster
    out = tmp_path / "killed"
    shard_size = NUM // 2
    execution = ExecutionConfig(backend="scheduler", scheduler_address=address, shard_size=shard_size)
    killer = _Killer(client, str(out), shard_ranges(0, NUM, shard_size, 1))
    killer.start()
    try:
        summary = trajectories_flow(_config(reference.prompts, reference.teacher, out, execution=execution))
    finally:
        killer.stop()
    assert killer.killed, "no worker was killed: the shards finished before the killer saw one half done"
    assert not killer.mask_at_kill.all()
    assert not set(killer.killed) & set(client.run(os.getpid).values())  # the Nanny restarted them
    assert (summary["complete"], summary["total"]) == (NUM, NUM)
    _assert_same_store(str(out), reference)


def test_cli_flags_reach_the_execution_config():
    from flows.cli import build_parser
    from flows.cli_model import model_from_args

    args = build_parser().parse_args(["trajectories", "--prompts", "p", "--teacher", "t", "--out", "s3://b/store",
                                      "--backend", "local-cluster", "--workers", "3", "--shard-size", "8"])
    config = model_from_args(TrajectoriesConfig, args)
    assert config.out == "s3://b/store"
    assert config.execution == ExecutionConfig(backend="local-cluster", workers=3, shard_size=8)
