"""Turn a prompt file into a prompt store: normalised, deduplicated, split into train and eval.

The work is :func:`rapm_core.ingest.engine.ingest_prompts`; the flow adds what a person watching
the run wants to see: a run name saying which file and which config, the counts in the log, and
artifacts with the counts and a few of the prompts as they were stored.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.cli_model import add_model_arguments, model_from_args
from rapm_shapes.demo import demo_config
from rapm_core.ingest.config import IngestConfig
from rapm_core.ingest.engine import IngestCounts, IngestPlan, ingest_config_hash, ingest_prompts, plan_ingest
from storage.prompt_store import PromptStore

SAMPLE_PROMPTS = 5


def run_name(config: IngestConfig) -> str:
    return f"ingest-{Path(config.source).name}-{ingest_config_hash(config)[:8]}"


def _flow_run_name() -> str:
    return run_name(IngestConfig.model_validate(flow_run.parameters["config"]))


def summary(plan: IngestPlan) -> str:
    c = plan.counts
    head = "already complete: " if plan.already_complete else ""
    return (f"{head}{plan.config.out}: {c.kept} prompts ({c.train} train, {c.eval} eval at --eval-fraction "
            f"{plan.config.eval_fraction:g}) from {plan.config.source} "
            f"[{plan.format}]; read {c.read}, blank {c.blank}, duplicates {c.duplicates}")


def _publish(plan: IngestPlan) -> None:
    key = f"rapm-ingest-{ingest_config_hash(plan.config)[:12]}"
    create_table_artifact([{"count": k, "value": v} for k, v in asdict(plan.counts).items()],
                          key=key, description=f"Prompt counts of {plan.config.out}")
    samples = PromptStore(plan.config.out).records()[:SAMPLE_PROMPTS]
    rows = "\n".join(f"| `{r.id}` | {r.split} | {r.text.replace('|', '&#124;')} |" for r in samples)
    create_markdown_artifact(f"| id | split | prompt |\n|---|---|---|\n{rows}\n", key=f"{key}-samples",
                             description=f"First {len(samples)} prompts of {plan.config.out}")


@flow(name="ingest", flow_run_name=_flow_run_name)
def ingest_flow(config: IngestConfig = demo_config().ingest_config()) -> IngestCounts:
    plan = ingest_prompts(config)
    get_run_logger().info(summary(plan))
    _publish(plan)
    return plan.counts


def _run_cli(args: argparse.Namespace) -> int:
    config = model_from_args(IngestConfig, args)
    # Check the source and --out before a flow run starts, so a bad file is one line on stderr
    # (not a flow-run traceback) and a finished store costs no Prefect start-up.
    plan = plan_ingest(config)
    if not plan.already_complete:
        plan = replace(plan, counts=ingest_flow(config))
    print(summary(plan))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("ingest", help="turn a prompt file into a prompt store",
                                   description=__doc__.splitlines()[0])
    add_model_arguments(parser, IngestConfig)
    parser.set_defaults(func=_run_cli)
