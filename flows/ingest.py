"""Turn a prompt file into a prompt store: normalised, deduplicated, split into train and eval.

The work is :func:`rapm_core.ingest.engine.ingest_prompts`; the flow adds what a person watching
the run wants to see: a run name saying which file and which config, the counts in the log, and
artifacts with the counts and a few of the prompts as they were stored.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.common import publish, run_logger
from rapm_core.ingest.config import IngestConfig
from rapm_core.ingest.engine import IngestCounts, IngestPlan, ingest_config_hash, ingest_prompts
from storage.prompt_store import PromptStore

SAMPLE_PROMPTS = 5


def run_name(config: IngestConfig) -> str:
    return f"ingest-{Path(config.source).name}-{ingest_config_hash(config)[:8]}"


def _flow_run_name() -> str:
    return run_name(IngestConfig.model_validate(flow_run.parameters["config"]))


def _publish(plan: IngestPlan) -> None:
    key = f"rapm-ingest-{ingest_config_hash(plan.config)[:12]}"
    publish(create_table_artifact, [{"count": k, "value": v} for k, v in asdict(plan.counts).items()],
            key=key, description=f"Prompt counts of {plan.config.out}")
    samples = PromptStore(plan.config.out).records()[:SAMPLE_PROMPTS]
    rows = "\n".join(f"| `{r.id}` | {r.split} | {r.text.replace('|', '&#124;')} |" for r in samples)
    publish(create_markdown_artifact, f"| id | split | prompt |\n|---|---|---|\n{rows}\n", key=f"{key}-samples",
            description=f"First {len(samples)} prompts of {plan.config.out}")


@flow(name="ingest", flow_run_name=_flow_run_name)
def ingest_flow(config: IngestConfig) -> IngestCounts:
    plan = ingest_prompts(config)
    run_logger().info(plan.summary())
    _publish(plan)
    return plan.counts
