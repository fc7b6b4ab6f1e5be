"""``rapm sample`` as a Prefect flow: the engine is :mod:`rapm_core.sample`; this adds the contact
sheet as an image artifact (its command is in :mod:`flows.stage_commands`, which checks the run
dir, its export and the prompts before the flow starts, so a mistake is one line at once)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.common import publish, run_logger
from rapm_core.sample import CONTACT_SHEET, SampleConfig


def run_name(config: SampleConfig) -> str:
    return f"sample-{Path(config.run).name}"


@flow(name="sample", flow_run_name=lambda: run_name(SampleConfig.model_validate(flow_run.parameters["config"])))
def sample_flow(config: SampleConfig) -> dict:
    """Sample a run's exported student and publish the contact sheet."""
    from rapm_core.evaluate.report import inline_images
    from rapm_core.sample import plan_sample, sample_student

    result = sample_student(config, plan_sample(config), log=run_logger().info)
    publish(create_markdown_artifact, inline_images(f"![contact sheet]({CONTACT_SHEET})", result.out),
            description=f"{config.run}: the student's samples (a row per prompt)")
    return {"out": result.out, "images": result.images, "contact_sheet": result.contact_sheet}
