"""The pipeline as a Prefect flow (``rapm pipeline``): each stage a subflow, the stages'
completeness checks deciding what runs (:mod:`rapm_core.pipeline`), a table of what ran (the
commands are in :mod:`flows.stage_commands`; ``rapm demo`` runs this flow on the demo's config).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.common import publish, run_flow, run_logger
from flows.distill import distill_flow
from flows.evaluate import evaluate_flow
from flows.ingest import ingest_flow
from flows.trajectories import trajectories_flow
from rapm_core.pipeline import PipelineConfig, run_pipeline
from rapm_shapes.shapes import write_builtin_prompts
from storage.hashing import config_hash

# Each stage a subflow inside a Prefect flow run; outside one its body, called directly (flows.common).
RUNNERS = {name: (lambda config, stage=stage: run_flow(stage, config))
           for name, stage in (("ingest", ingest_flow), ("trajectories", trajectories_flow),
                               ("distill", distill_flow), ("evaluate", evaluate_flow))}


def prepare(config: PipelineConfig) -> None:
    """The work dir, and the built-in shapes captions as its prompt file when none is given."""
    Path(config.work).mkdir(parents=True, exist_ok=True)
    if config.prompts is None:
        write_builtin_prompts(config.paths()["source"])


def run_name(config: PipelineConfig) -> str:
    digest = config_hash(config.model_dump(mode="json", exclude={"work"}))[:8]
    return f"pipeline-{Path(config.teacher).name}-{Path(config.work).name}-{digest}"


@flow(name="pipeline", flow_run_name=lambda: run_name(PipelineConfig.model_validate(flow_run.parameters["config"])))
def pipeline_flow(config: PipelineConfig) -> dict:
    """ingest → trajectories → distill → evaluate in one work dir, each stage a subflow."""
    logger = run_logger()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    prepare(config)
    outcomes = run_pipeline(config, RUNNERS, log=logger.info)
    eval_dir = config.paths()["eval"]
    lines = ["| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {o.stage} | {'skipped (complete)' if o.skipped else 'ran'} | {o.seconds:.1f} |" for o in outcomes]
    publish(create_markdown_artifact, "\n".join(lines) + f"\n\nReport: `{eval_dir / 'report.md'}`\n",
            key="rapm-pipeline", description=f"pipeline stages in {config.work}")
    return {"stages": [asdict(o) for o in outcomes], "eval_dir": str(eval_dir)}
