"""``rapm sample`` as a Prefect flow: the engine is :mod:`rapm_core.sample`; this adds the contact
sheet as an image artifact and the CLI. The run dir, its export and the prompts are checked
before Prefect starts, so a mistake is one line at once."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from rapm_core.sample import CONTACT_SHEET, SampleConfig

def _help(name: str) -> str:
    field = SampleConfig.model_fields[name]
    text = field.description or ""
    if field.default_factory is not None or field.is_required() or field.default is None or "default" in text:
        return text
    return f"{text} (default: {field.default!r})"


def register(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="sample a finished run's student (its export) from prompts",
                                   description=SampleConfig.__doc__)
    parser.add_argument("--run", required=True, metavar="RUN", help=_help("run"))
    parser.add_argument("--prompt", action="append", metavar="TEXT", help=_help("prompt"))
    parser.add_argument("--prompts", metavar="FILE", help=_help("prompts"))
    parser.add_argument("--num-images", type=int, metavar="K", help=_help("num_images"))
    parser.add_argument("--seed", type=int, metavar="S", help=_help("seed"))
    parser.add_argument("--steps", type=int, metavar="N", help=_help("steps"))
    parser.add_argument("--out", required=True, metavar="DIR", help=_help("out"))
    parser.add_argument("--batch-size", type=int, metavar="B", help=_help("batch_size"))
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help=_help("dtype"))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help=_help("device"))
    parser.set_defaults(func=_cli)


def config_from_args(args: argparse.Namespace) -> SampleConfig:
    # Only what was given, so the model's defaults stay the single source (as flows.cli_model does).
    return SampleConfig.model_validate({k: v for k in SampleConfig.model_fields
                                        if (v := getattr(args, k, None)) is not None})


def run_name(config: SampleConfig) -> str:
    return f"sample-{Path(config.run).name}"


@flow(name="sample", flow_run_name=lambda: run_name(SampleConfig.model_validate(flow_run.parameters["config"])))
def sample_flow(config: SampleConfig) -> dict:
    """Sample a run's exported student and publish the contact sheet."""
    from rapm_core.evaluate.report import inline_images
    from rapm_core.sample import plan_sample, sample_student

    result = sample_student(config, plan_sample(config), log=get_run_logger().info)
    create_markdown_artifact(inline_images(f"![contact sheet]({CONTACT_SHEET})", result.out),
                             description=f"{config.run}: the student's samples (a row per prompt)")
    return {"out": result.out, "images": result.images, "contact_sheet": result.contact_sheet}


def _cli(args) -> int:
    from rapm_core.sample import plan_sample
    from rapm_core.teacher import resolve_device

    config = config_from_args(args)
    plan = plan_sample(config)
    resolve_device(config.device)
    result = sample_flow(config)
    print(f"{result['out']}: {len(result['images'])} images of {len(plan.prompts)} prompts "
          f"({plan.steps} steps), contact sheet {result['contact_sheet']}")
    return 0
