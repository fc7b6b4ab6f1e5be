"""Stage C as a Prefect flow (``rapm evaluate``): the engine is :mod:`rapm_core.evaluate.run`; this
adds the progress artifact, the metrics table and the report as artifacts, and the CLI."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.cli_model import add_model_arguments, model_from_args
from flows.common import ProgressArtifact
from rapm_core.evaluate import report
from rapm_core.evaluate.config import EvaluateConfig
from rapm_core.evaluate.run import EVAL_DIR, eval_config_hash, evaluate_run, finished, publish_report
from rapm_core.teacher import resolve_device
from rapm_shapes.demo import demo_config


def run_name(config: EvaluateConfig) -> str:
    return f"evaluate-{Path(config.run).name}-{eval_config_hash(config)[:8]}"


@flow(name="evaluate", flow_run_name=lambda: run_name(EvaluateConfig.model_validate(flow_run.parameters["config"])))
def evaluate_flow(config: EvaluateConfig = demo_config().evaluate_config()) -> dict:
    """Stage C: sample every method, measure, write the eval dir and publish it as artifacts."""
    logger = get_run_logger()
    progress = ProgressArtifact(f"evaluate {config.run}: images sampled")
    result = evaluate_run(config, progress=progress, log=logger.info)
    progress.finish()
    key = f"rapm-eval-{eval_config_hash(config)[:12]}"
    create_table_artifact(report.table_artifact_rows(result.rows), key=key, description=f"metrics of {config.run}")
    report_md = Path(result.eval_dir) / "report.md"
    create_markdown_artifact(report.inline_images(report_md.read_text(encoding="utf-8"), report_md.parent),
                             key=f"{key}-report", description=f"evaluation report ({report_md})")
    return {"eval_dir": result.eval_dir, "rows": result.rows, "skipped": result.skipped}


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="Stage C: benchmark a distilled run against the teacher",
                                   description=EvaluateConfig.__doc__)
    add_model_arguments(parser, EvaluateConfig)
    parser.set_defaults(func=_cli)


def print_summary(eval_dir: str | Path, rows: list[dict]) -> None:
    print(report.metrics_table_markdown(rows))
    print(f"report: {Path(eval_dir) / 'report.md'}")


def _cli(args) -> int:
    config = model_from_args(EvaluateConfig, args)
    existing = finished(config)
    if existing is not None:
        print(f"{config.run}/{EVAL_DIR}: already evaluated with this config; nothing to do")
        publish_report(config, Path(config.run) / EVAL_DIR, print)
        print_summary(Path(config.run) / EVAL_DIR, existing["methods"])
        return 0
    resolve_device(config.device)
    result = evaluate_flow(config)
    print_summary(result["eval_dir"], result["rows"])
    return 0
