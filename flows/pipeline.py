"""The pipeline as a Prefect flow (``rapm pipeline``, ``rapm demo``): each stage a subflow, the
stages' completeness checks deciding what runs (:mod:`rapm_core.pipeline`), a table of what ran.

``rapm demo`` is the pipeline on the embedded default (``rapm_shapes.demo.DemoConfig``, the one
place its values live); it is also this flow's default parameter, so the ``embedded-demo``
deployment needs none.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.cli_model import add_model_arguments, model_from_args
from flows.distill import distill_flow
from flows.evaluate import evaluate_flow, print_summary
from flows.ingest import ingest_flow
from flows.trajectories import trajectories_flow
from rapm_core.evaluate.eval_dir import finished
from rapm_core.pipeline import STAGES, PipelineConfig, all_complete, preflight, run_pipeline
from rapm_core.teacher import resolve_device
from rapm_shapes.demo import DemoConfig, demo_config, write_builtin_prompts
from storage.hashing import config_hash

RUNNERS = {"ingest": ingest_flow, "trajectories": trajectories_flow, "distill": distill_flow,
           "evaluate": evaluate_flow}


def prepare(config: PipelineConfig) -> None:
    """The work dir, and the built-in shapes captions as its prompt file when none is given."""
    Path(config.work).mkdir(parents=True, exist_ok=True)
    if config.prompts is None:
        write_builtin_prompts(config.paths()["source"])


def run_name(config: PipelineConfig) -> str:
    digest = config_hash(config.model_dump(mode="json", exclude={"work"}))[:8]
    return f"pipeline-{Path(config.teacher).name}-{Path(config.work).name}-{digest}"


@flow(name="pipeline", flow_run_name=lambda: run_name(PipelineConfig.model_validate(flow_run.parameters["config"])))
def pipeline_flow(config: PipelineConfig = demo_config()) -> dict:
    """ingest → trajectories → distill → evaluate in one work dir, each stage a subflow."""
    logger = get_run_logger()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    prepare(config)
    outcomes = run_pipeline(config, RUNNERS, log=logger.info)
    eval_dir = config.paths()["eval"]
    lines = ["| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {o.stage} | {'skipped (complete)' if o.skipped else 'ran'} | {o.seconds:.1f} |" for o in outcomes]
    create_markdown_artifact("\n".join(lines) + f"\n\nReport: `{eval_dir / 'report.md'}`\n",
                             key="rapm-pipeline", description=f"pipeline stages in {config.work}")
    return {"stages": [asdict(o) for o in outcomes], "eval_dir": str(eval_dir)}


def _cli(model: type[PipelineConfig]) -> Callable:
    def run(args) -> int:
        config = model_from_args(model, args)
        resolve_device(config.device)
        t0 = time.perf_counter()
        prepare(config)
        preflight(config)  # before any stage, and before a flow run starts
        if all_complete(config):
            # Nothing to do: no flow run, no Prefect start-up.
            stages = [{"stage": s, "skipped": True} for s in STAGES]
        else:
            # The ephemeral server's telemetry heartbeat races the flow's writes on a fresh SQLite
            # database and logs a traceback; it is of no use to a local run.
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            stages = pipeline_flow(config)["stages"]
        for stage in stages:
            status = "skipped (already complete)" if stage["skipped"] else f"ran in {stage['seconds']:.1f} s"
            print(f"{stage['stage']}: {status}")
        print_summary(config.paths()["eval"], finished(config.evaluate_config())["methods"])
        print(f"total wall time {time.perf_counter() - t0:.0f} s")
        return 0

    return run


def register(subparsers) -> None:
    for name, model, text in (("pipeline", PipelineConfig, "ingest → trajectories → distill → evaluate in one work dir"),
                              ("demo", DemoConfig, "the whole pipeline on the embedded shapes teacher, sized for a CPU")):
        parser = subparsers.add_parser(name, help=text, description=model.__doc__)
        add_model_arguments(parser, model, demo_config() if model is DemoConfig else None)
        parser.set_defaults(func=_cli(model))
