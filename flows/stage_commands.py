"""The commands of the stage flows: ``rapm ingest|trajectories|distill|evaluate|sample|pipeline|demo|demo-flow``.

Each command's options are the fields of its flow's pydantic config (:mod:`flows.cli_model`);
the configs import cheaply, and the flow module, with Prefect, torch and the engines, is imported
only when the command runs, so ``--help`` answers at once. A command first does the cheap checks
and the "already complete" answer itself, then runs its flow through :func:`flows.common.run_flow`
(a Prefect flow run when a server is configured, the flow's body directly otherwise).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import get_args

from flows.cli_model import add_model_arguments, field_help, model_from_args
from rapm_core.config import Device, Precision
from rapm_core.distill.config import DistillRunConfig
from rapm_core.evaluate.config import EvaluateConfig
from rapm_core.ingest.config import IngestConfig
from rapm_core.pipeline import PipelineConfig
from rapm_core.trajectories.config import TrajectoriesConfig
from rapm_shapes.demo import DemoConfig, FlowDemoConfig, demo_config, flow_demo_config


def _configure(parser: argparse.ArgumentParser, model, run, description: str | None = None, defaults=None) -> None:
    parser.description = description or model.__doc__
    add_model_arguments(parser, model, defaults)
    parser.set_defaults(func=run)


# -- ingest -------------------------------------------------------------------------------------
def ingest(parser: argparse.ArgumentParser) -> None:
    _configure(parser, IngestConfig, _ingest,
               "Turn a prompt file into a prompt store: normalised, deduplicated, split into train and eval.")


def _ingest(args: argparse.Namespace) -> int:
    from rapm_core.ingest.engine import plan_ingest

    config = model_from_args(IngestConfig, args)
    # Check the source and --out before the flow runs, so a bad file is one line on stderr (not a
    # flow-run traceback) and a finished store costs no Prefect start-up.
    plan = plan_ingest(config)
    if not plan.already_complete:
        from flows.common import run_flow
        from flows.ingest import ingest_flow

        plan = replace(plan, counts=run_flow(ingest_flow, config))
    print(plan.summary())
    return 0


# -- trajectories -------------------------------------------------------------------------------
def trajectories(parser: argparse.ArgumentParser) -> None:
    _configure(parser, TrajectoriesConfig, _trajectories)


def _trajectories(args: argparse.Namespace) -> int:
    from flows.common import run_flow
    from flows.trajectories import trajectories_flow
    from rapm_core.trajectories.generate import preflight

    config = model_from_args(TrajectoriesConfig, args)
    s = run_flow(trajectories_flow, config, found=preflight(config))  # the store it opened, passed on
    print(f"{s['path']}: {s['complete']}/{s['total']} trajectories complete ({s['kind']}, N={s['num_slots']}, "
          f"M={s['steps_per_slot']}, w={s['guidance']}, {s['bytes_on_disk'] / 2**20:.1f} MiB)")
    return 0


# -- distill ------------------------------------------------------------------------------------
def distill(parser: argparse.ArgumentParser) -> None:
    _configure(parser, DistillRunConfig, _distill)


def _distill(args: argparse.Namespace) -> int:
    from rapm_core.distill.run import already_done
    from rapm_core.teacher import resolve_device

    config = model_from_args(DistillRunConfig, args)
    done = already_done(config)
    if done is not None:
        print(f"{config.out}: already trained to {done['step']} iterations; nothing to do")
        return 0
    resolve_device(config.device)
    from flows.common import run_flow
    from flows.distill import distill_flow

    result = run_flow(distill_flow, config)
    print(f"{result['run_dir']}: {result['step']} iterations, student in {result['export_dir']}"
          + (f" ({result['seconds_per_iteration']:.3f} s/iter)" if result["seconds_per_iteration"] else ""))
    return 0


# -- evaluate -----------------------------------------------------------------------------------
def evaluate(parser: argparse.ArgumentParser) -> None:
    _configure(parser, EvaluateConfig, _evaluate)


def print_summary(eval_dir: str | Path, rows: list[dict]) -> None:
    from rapm_core.evaluate.report import metrics_table_markdown

    print(metrics_table_markdown(rows))
    print(f"report: {Path(eval_dir) / 'report.md'}")


def _evaluate(args: argparse.Namespace) -> int:
    from rapm_core.evaluate import scale
    from rapm_core.evaluate.eval_dir import EVAL_DIR, finished, prepare, publish_report, writing_eval_dir
    from rapm_core.teacher import resolve_device

    config = model_from_args(EvaluateConfig, args)
    existing = finished(config)
    if existing is not None:
        print(f"{config.run}/{EVAL_DIR}: already evaluated with this config; nothing to do")
        publish_report(config, Path(config.run) / EVAL_DIR, print)
        print_summary(Path(config.run) / EVAL_DIR, existing["samplers"])
        return 0
    resolve_device(config.device)
    from flows.common import run_flow
    from flows.evaluate import evaluate_flow

    with writing_eval_dir(config):  # a second evaluation of this run is refused before the flow starts
        if config.feature_store is not None:  # the cheap checks before the flow: files, store identity
            scale.preflight(config, prepare(config))
        result = run_flow(evaluate_flow, config)
    print_summary(result["eval_dir"], result["rows"])
    return 0


# -- sample ---------------------------------------------------------------------------------------
def _sample_help(name: str) -> str:
    from rapm_core.sample import SampleConfig

    return field_help(SampleConfig.model_fields[name])


def sample(parser: argparse.ArgumentParser) -> None:
    from rapm_core.sample import SampleConfig

    parser.description = SampleConfig.__doc__
    parser.add_argument("--run", required=True, metavar="RUN", help=_sample_help("run"))
    parser.add_argument("--prompt", action="append", metavar="TEXT", help=_sample_help("prompt"))
    parser.add_argument("--prompts", metavar="FILE", help=_sample_help("prompts"))
    parser.add_argument("--num-images", type=int, metavar="K", help=_sample_help("num_images"))
    parser.add_argument("--seed", type=int, metavar="S", help=_sample_help("seed"))
    parser.add_argument("--steps", type=int, metavar="N", help=_sample_help("steps"))
    parser.add_argument("--out", required=True, metavar="DIR", help=_sample_help("out"))
    parser.add_argument("--batch-size", type=int, metavar="B", help=_sample_help("batch_size"))
    parser.add_argument("--dtype", choices=get_args(Precision), help=_sample_help("dtype"))
    parser.add_argument("--device", choices=get_args(Device), help=_sample_help("device"))
    parser.set_defaults(func=_sample)


def sample_config_from_args(args: argparse.Namespace):
    from rapm_core.sample import SampleConfig

    # Only what was given, so the model's defaults stay the single source (as flows.cli_model does).
    return SampleConfig.model_validate({k: v for k in SampleConfig.model_fields
                                        if (v := getattr(args, k, None)) is not None})


def _sample(args: argparse.Namespace) -> int:
    from flows.common import run_flow
    from flows.sample import sample_flow
    from rapm_core.sample import plan_sample
    from rapm_core.teacher import check_dtype_on_device, resolve_device

    config = sample_config_from_args(args)
    plan = plan_sample(config)
    check_dtype_on_device(config.dtype, resolve_device(config.device))
    result = run_flow(sample_flow, config)
    print(f"{result['out']}: {len(result['images'])} images of {len(plan.prompts)} prompts "
          f"({plan.steps} steps), contact sheet {result['contact_sheet']}")
    return 0


# -- pipeline, demo -----------------------------------------------------------------------------
def pipeline(parser: argparse.ArgumentParser) -> None:
    _configure(parser, PipelineConfig, _pipeline)


def demo(parser: argparse.ArgumentParser) -> None:
    _configure(parser, DemoConfig, _demo, defaults=demo_config())


# A command of its own rather than an option of ``demo``: its --help shows its own values (argparse
# builds the help before it knows the options), and its config stays a plain PipelineConfig, which
# the pipeline flow's parameters on a Prefect server must validate as (no extra field).
def demo_flow(parser: argparse.ArgumentParser) -> None:
    _configure(parser, FlowDemoConfig, _demo_flow, defaults=flow_demo_config())


def _pipeline(args: argparse.Namespace) -> int:
    return _run_pipeline(model_from_args(PipelineConfig, args))


def _demo(args: argparse.Namespace) -> int:
    return _run_pipeline(model_from_args(DemoConfig, args))


def _demo_flow(args: argparse.Namespace) -> int:
    return _run_pipeline(model_from_args(FlowDemoConfig, args))


def _run_pipeline(config: PipelineConfig) -> int:
    from flows.common import run_flow
    from flows.pipeline import pipeline_flow, prepare
    from rapm_core.evaluate.eval_dir import finished
    from rapm_core.pipeline import STAGES, all_complete, preflight
    from rapm_core.teacher import resolve_device

    resolve_device(config.device)
    t0 = time.perf_counter()
    prepare(config)
    preflight(config)  # before any stage, and before a flow run starts
    if all_complete(config):  # nothing to do: no flow run
        stages = [{"stage": s, "skipped": True} for s in STAGES]
    else:
        stages = run_flow(pipeline_flow, config)["stages"]
    for stage in stages:
        status = "skipped (already complete)" if stage["skipped"] else f"ran in {stage['seconds']:.1f} s"
        print(f"{stage['stage']}: {status}")
    print_summary(config.paths()["eval"], finished(config.evaluate_config())["samplers"])
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    return 0
