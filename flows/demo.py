"""``rapm demo``: the pipeline flow on the embedded default (:mod:`rapm_shapes.demo`, the one
place its values live); options given refine the demo's values section by section."""

from __future__ import annotations

from flows.cli_model import add_model_arguments
from flows.pipeline import pipeline_command
from rapm_shapes.demo import DemoConfig, demo_config


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="the whole pipeline on the embedded shapes teacher, sized for a CPU",
                                   description=DemoConfig.__doc__)
    add_model_arguments(parser, DemoConfig, demo_config())
    parser.set_defaults(func=pipeline_command(DemoConfig))
