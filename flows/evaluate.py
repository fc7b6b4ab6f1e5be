"""Stage C as a Prefect flow (``rapm evaluate``): the engine is :mod:`rapm_core.evaluate.run` (and,
with ``--feature-store``, :mod:`rapm_core.evaluate.scale`); this adds the Dask fan-out, the
progress artifact, and the metrics table and the report as artifacts (its command is in
:mod:`flows.stage_commands`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.common import ProgressArtifact, publish, run_logger
from flows.sharding import ShardRunner
from rapm_core.evaluate import report, scale
from rapm_core.evaluate.config import EvaluateConfig
from rapm_core.evaluate.eval_dir import EvalResult, already_evaluated, eval_config_hash, prepare, writing_eval_dir
from rapm_core.evaluate.run import evaluate_run
from rapm_core.execution import default_shard_size, shard_ranges
from rapm_core.progress import Progress


def run_name(config: EvaluateConfig) -> str:
    return f"evaluate-{Path(config.run).name}-{eval_config_hash(config)[:8]}"


@task(name="evaluate-store", retries=1)
def evaluate_store(config: EvaluateConfig) -> int:
    """Open or create the feature store (on a worker, whose cached teacher the shards then reuse);
    returns the images still to sample."""
    p = prepare(config)
    return scale.pending_images(config, p, scale.open_feature_store(config, p))


@task(name="evaluate-shard", retries=1)
def evaluate_shard(config: EvaluateConfig, method: str, start: int, stop: int) -> int:
    """Images [start, stop) of one method on whichever process runs this; its sampler stays loaded there."""
    return scale.evaluate_range(config, prepare(config), method, start, stop)


@task(name="evaluate-figure", retries=1)
def evaluate_figure(config: EvaluateConfig) -> bytes:
    return scale.figure_png(config, prepare(config))


def evaluate_sharded(config: EvaluateConfig, progress: Callable[[Progress], None],
                     log: Callable[[str], None]) -> EvalResult:
    """The feature-store evaluation fanned out over ``config.execution``'s Dask cluster (inside a flow).

    Every method's batch-aligned index ranges are tasks writing their own chunks; the teacher
    samplers' shards run before the student's, so a worker swaps its cached model once. The
    coordinator holds the store's lock and measures from the store at the end."""
    t_start = time.perf_counter()
    if (existing := already_evaluated(config, log, t_start)) is not None:
        return existing
    p = prepare(config)
    with scale.store_lock(config.feature_store):
        scale.preflight(config, p)  # before a cluster starts
        with ShardRunner(config.execution) as runner:
            total = runner.run(evaluate_store, [{"config": config}])[0]
            size = config.execution.shard_size or default_shard_size(config.num_images, runner.workers,
                                                                     config.batch_size)
            ranges = shard_ranges(0, config.num_images, size, config.batch_size)
            log(f"{total} images to sample in {len(ranges)} shards per method on {runner.workers} workers")
            t0, done = time.perf_counter(), 0

            def shard_done(made: int) -> None:
                nonlocal done
                done += made
                if total:
                    progress(Progress(done, total, done / max(time.perf_counter() - t0, 1e-9), "images"))

            for group in ([s for s in p.specs if not s.uses_student], [s for s in p.specs if s.uses_student]):
                shards = [{"config": config, "method": s.name, "start": a, "stop": b} for s in group for a, b in ranges]
                if shards:
                    runner.run(evaluate_shard, shards, on_result=shard_done)
            figure = runner.run(evaluate_figure, [{"config": config}])[0]
        return scale.finish(config, p, figure, log, t_start)


@flow(name="evaluate", flow_run_name=lambda: run_name(EvaluateConfig.model_validate(flow_run.parameters["config"])))
def evaluate_flow(config: EvaluateConfig) -> dict:
    """Stage C: sample every sampler, measure, write the eval dir and publish it as artifacts."""
    logger = run_logger()
    progress = ProgressArtifact(f"evaluate {config.run}: images sampled")
    with writing_eval_dir(config):
        if config.execution.backend == "in-process":
            result = evaluate_run(config, progress=progress, log=logger.info)
        else:
            result = evaluate_sharded(config, progress, logger.info)
    progress.finish()
    key = f"rapm-eval-{eval_config_hash(config)[:12]}"
    publish(create_table_artifact, report.table_artifact_rows(result.rows), key=key,
            description=f"metrics of {config.run}")
    report_md = Path(result.eval_dir) / "report.md"
    publish(create_markdown_artifact, report.inline_images(report_md.read_text(encoding="utf-8"), report_md.parent),
            key=f"{key}-report", description=f"evaluation report ({report_md})")
    return {"eval_dir": result.eval_dir, "rows": result.rows, "skipped": result.skipped}
