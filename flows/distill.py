"""Stage B as a Prefect flow (``rapm distill``): the engine is :mod:`rapm_core.distill.run`; this
adds the progress artifact (with the ETA), the loss curves and the sample previews refreshed at
every checkpoint and the metrics table (its command is in :mod:`flows.stage_commands`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.common import ProgressArtifact, publish, run_logger
from rapm_core.distill.config import DistillRunConfig
from rapm_core.distill.plots import plot_loss_curves
from rapm_core.distill.previews import LATEST, PREVIEW_DIR, PROMPTS
from rapm_core.distill.run import run_config_hash, run_distillation
from rapm_core.evaluate.report import inline_images
from storage.errors import StoreError
from storage.run_dir import RunDir
from storage.trajectory_store import TrajectoryStore


def run_name(config: DistillRunConfig) -> str:
    try:
        teacher = Path(TrajectoryStore(config.trajectories).schema.teacher).name
    except StoreError:
        teacher = "unknown-teacher"
    return f"distill-{teacher}-{run_config_hash(config)[:8]}"


def summary_rows(rows: list[dict], buckets: int = 10) -> list[dict]:
    """Mean of every numeric metric over ``buckets`` equal spans of iterations (for the table artifact)."""
    rows = [r for r in rows if "nonfinite" not in r]
    if not rows:
        return []
    size = math.ceil(len(rows) / buckets)
    table = []
    for i in range(0, len(rows), size):
        chunk = rows[i:i + size]
        keys = [k for k, v in chunk[0].items()
                if isinstance(v, (int, float)) and k not in ("iteration", "epoch", "trajectory")]
        table.append({"iterations": f"{chunk[0]['iteration']}-{chunk[-1]['iteration']}",
                      **{k: round(sum(r.get(k, 0.0) for r in chunk) / len(chunk), 5) for k in keys}})
    return table


def publish_loss_curves(run: RunDir, key: str) -> None:
    """Redraw loss_curves.png from the metrics so far and show it in the UI (a new artifact version)."""
    png = plot_loss_curves(run.metrics.read(), run.path / "loss_curves.png", title=f"{run.path.name} (running)")
    publish(create_markdown_artifact, inline_images(f"![loss curves]({png.name})", png.parent), key=key,
            description=f"loss curves of {run.path}, refreshed at every checkpoint")


def publish_previews(run: RunDir, key: str) -> None:
    """Show the latest preview grid in the UI (a new artifact version), if the run draws them."""
    latest = run.path / PREVIEW_DIR / LATEST
    if latest.is_file():
        prompts = json.loads((latest.parent / PROMPTS).read_text(encoding="utf-8"))
        rows = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts))
        publish(create_markdown_artifact, inline_images(f"![previews]({LATEST})\n\nRows:\n\n{rows}\n", latest.parent),
                key=key, description=f"samples of {run.path} at its last checkpoint: a row per eval prompt, "
                                     f"the teacher's N·M-step reference then the student")


def publish_checkpoint(run: RunDir, key: str) -> None:
    publish_loss_curves(run, f"{key}-loss-curves")
    publish_previews(run, f"{key}-previews")


@flow(name="distill", flow_run_name=lambda: run_name(DistillRunConfig.model_validate(flow_run.parameters["config"])))
def distill_flow(config: DistillRunConfig) -> dict:
    """Stage B: train (or resume, or extend) a run dir, then export the student."""
    logger = run_logger()
    key = f"distill-{run_config_hash(config)[:12]}"
    progress = ProgressArtifact(f"distill → {config.out}")
    result = run_distillation(config, progress=progress, log=logger.info,
                              on_checkpoint=lambda run: publish_checkpoint(run, key))
    progress.finish()
    table = summary_rows(RunDir(config.out).metrics.read())
    if table:
        publish(create_table_artifact, table=table, key=f"{key}-metrics",
                description=f"mean metrics over iteration spans of {config.out}")
    return asdict(result)
