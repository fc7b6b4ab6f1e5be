"""Stage A as a Prefect flow (``rapm trajectories``): the engine is
:mod:`rapm_core.trajectories.generate`; this adds the Dask fan-out and the artifacts (its
command is in :mod:`flows.stage_commands`)."""

from __future__ import annotations

import time
from typing import Callable

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from flows.common import ProgressArtifact, found_before, publish, run_logger
from flows.sharding import ShardRunner
from rapm_core.execution import default_shard_size, shard_ranges, worker_cached
from rapm_core.progress import Progress
from rapm_core.teacher import Teacher, load_teacher, resolve_device, resolve_dtype, teacher_identifier
from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_core.trajectories.generate import (
    GenerationReport, Opened, generate_trajectories, open_existing, store_lock,
)
from storage.hashing import config_hash
from storage.trajectory_inspect import inspect_store
from storage.trajectory_store import TrajectoryStore

SUMMARY_FIELDS = ("teacher", "kind", "num_slots", "steps_per_slot", "guidance", "seed", "compute_dtype", "store_dtype",
                  "complete", "total", "bytes_on_disk", "compression_ratio", "config_hash")


@task(name="trajectory-shard", retries=1)
def trajectory_shard(config: TrajectoriesConfig, start: int, stop: int) -> GenerationReport:
    """Trajectories [start, stop) on whichever process runs this; the teacher stays loaded there."""
    def teacher() -> Teacher:
        key = ("teacher", teacher_identifier(config.teacher), config.revision, config.dtype, config.device)
        return worker_cached(key, lambda: load_teacher(config.teacher, config.revision, resolve_dtype(config.dtype),
                                                       resolve_device(config.device)))

    return generate_trajectories(config, start, stop, teacher=teacher, log=run_logger().info, lock=False)


def generate_sharded(config: TrajectoriesConfig, opened: Opened, progress: Callable[[Progress], None],
                     log: Callable[[str], None]) -> list[GenerationReport]:
    """Stage A fanned out over ``config.execution``'s Dask cluster (inside a flow); ``opened`` is
    what :func:`~rapm_core.trajectories.generate.open_existing` found at ``config.out``.

    One task creates the store (on a worker, whose cached teacher the shards then reuse), then
    every batch-aligned index range is a task writing its own chunks. Per-trajectory seeds and
    aligned batches make the store bit-identical to the in-process one.
    """
    with store_lock(config.out):
        return _fan_out(config, opened, progress, log)


def _fan_out(config: TrajectoriesConfig, opened: Opened, progress: Callable[[Progress], None],
             log: Callable[[str], None]) -> list[GenerationReport]:
    num = len(opened.records)
    pending = opened.store.pending_batches(0, num, config.batch_size) if opened.store else [(0, num)]
    if not pending:
        log(f"{config.out}: all {num} trajectories already complete; nothing to do")
        return []
    with ShardRunner(config.execution) as runner:
        runner.run(trajectory_shard, [{"config": config, "start": 0, "stop": 0}])
        total = num - len((opened.store or TrajectoryStore(config.out)).complete_indices())
        size = config.execution.shard_size or default_shard_size(total, runner.workers, config.batch_size)
        shards = shard_ranges(0, num, size, config.batch_size)
        log(f"{total} trajectories to generate in {len(shards)} shards on {runner.workers} workers")
        t0, done = time.perf_counter(), 0

        def shard_done(report: GenerationReport) -> None:
            nonlocal done
            done += report.generated
            progress(Progress(done, total, done / (time.perf_counter() - t0), "trajectories"))

        return runner.run(trajectory_shard, [{"config": config, "start": a, "stop": b} for a, b in shards],
                          on_result=shard_done)


def _run_name() -> str:
    config = TrajectoriesConfig.model_validate(flow_run.parameters["config"])
    teacher = teacher_identifier(config.teacher).rstrip("/").split("/")[-1]
    return f"trajectories-{teacher}-{config_hash(config.model_dump(mode='json'))[:8]}"


@flow(name="trajectories", flow_run_name=_run_name)
def trajectories_flow(config: TrajectoriesConfig) -> dict:
    """Stage A: progress artifact while generating, summary table artifact at the end."""
    logger = run_logger()
    progress = ProgressArtifact(f"trajectories → {config.out}", log=logger.info)
    opened = found_before(trajectories_flow, config) or open_existing(config)
    if config.execution.backend == "in-process":
        result = generate_trajectories(config, progress=progress, log=logger.info, opened=opened)
        logger.info(f"generated {result.generated} trajectories in {result.seconds:.1f} s "
                    f"(writer busy {result.write_seconds:.2f} s, generation waited {result.wait_seconds:.2f} s)")
    else:
        shards = generate_sharded(config, opened, progress, logger.info)
        logger.info(f"generated {sum(r.generated for r in shards)} trajectories in {len(shards)} shards")
    progress.finish()
    summary = inspect_store(opened.store or config.out)  # a store made by this run is opened here, once
    rows = [{"field": k, "value": str(summary[k])} for k in SUMMARY_FIELDS]
    rows.append({"field": "positions shape", "value": str(summary["shapes"]["positions"])})
    publish(create_table_artifact, table=rows, key="trajectory-store", description=f"trajectory store {config.out}")
    return summary
