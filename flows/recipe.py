"""``rapm recipe``: train and measure the embedded default's assets (``rapm_shapes.recipe``)."""

from __future__ import annotations

import argparse
import json

from flows.cli_model import add_model_arguments, model_from_args
from rapm_shapes.recipe import (
    EvaluatorRecipe, FlowMeasureRecipe, FlowTeacherRecipe, MeasureRecipe, TeacherRecipe, run_evaluator_recipe,
    run_flow_measure, run_flow_teacher_recipe, run_measure, run_teacher_recipe,
)


def _teacher_cmd(args: argparse.Namespace) -> int:
    print(run_teacher_recipe(model_from_args(TeacherRecipe, args)))
    return 0


def _flow_teacher_cmd(args: argparse.Namespace) -> int:
    print(run_flow_teacher_recipe(model_from_args(FlowTeacherRecipe, args)))
    return 0


def _measure_cmd(args: argparse.Namespace) -> int:
    print(json.dumps(run_measure(model_from_args(MeasureRecipe, args))))
    return 0


def _flow_measure_cmd(args: argparse.Namespace) -> int:
    print(json.dumps(run_flow_measure(model_from_args(FlowMeasureRecipe, args))))
    return 0


def _evaluator_cmd(args: argparse.Namespace) -> int:
    metrics = run_evaluator_recipe(model_from_args(EvaluatorRecipe, args))
    print(json.dumps(metrics))
    return 0


def configure(parser) -> None:
    sub = parser.add_subparsers(dest="recipe", required=True)
    p = sub.add_parser("evaluator", help="train the shapes evaluator (attribute classifier)")
    add_model_arguments(p, EvaluatorRecipe)
    p.set_defaults(func=_evaluator_cmd)
    p = sub.add_parser("teacher", help="train the shapes teacher (a StableDiffusionPipeline) and measure it")
    add_model_arguments(p, TeacherRecipe)
    p.set_defaults(func=_teacher_cmd)
    p = sub.add_parser("flow-teacher", help="train the shapes flow teacher (a StableDiffusion3Pipeline, rectified "
                                            "flow) and measure it")
    add_model_arguments(p, FlowTeacherRecipe)
    p.set_defaults(func=_flow_teacher_cmd)
    p = sub.add_parser("measure", help="measure a shapes teacher's adherence and domain FID, update its card")
    add_model_arguments(p, MeasureRecipe)
    p.set_defaults(func=_measure_cmd)
    p = sub.add_parser("measure-flow", help="measure a shapes flow teacher with the stock StableDiffusion3Pipeline, "
                                            "save the best shift, update its card")
    add_model_arguments(p, FlowMeasureRecipe)
    p.set_defaults(func=_flow_measure_cmd)
