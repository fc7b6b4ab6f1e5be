"""Non-finite floats are refused by every config a ``rapm`` command validates (issue 13, item 6).

``cli_config_models`` finds every pydantic model reachable from ``flows.cli.build_parser()``:
the model each subcommand's function validates (a global it names or a closure variable, as
``add_model_arguments``/``model_from_args`` use them), and the models nested in their fields.
``nonfinite_accepted`` lists each float field (plain, optional, or inside a tuple/list) that
still accepts nan, inf or -inf. Reusable: import both from here.
"""

from __future__ import annotations

import inspect
import types
import typing

from pydantic import BaseModel, ValidationError

from flows.cli import build_parser

NONFINITE = ("nan", "inf", "-inf")


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _subcommand_functions(parser) -> list:
    funcs = []
    for action in parser._actions:
        for sub in getattr(action, "_name_parser_map", {}).values():
            if (func := sub.get_default("func")) is not None:
                funcs.append(func)
            funcs += _subcommand_functions(sub)
    return funcs


def cli_config_models(parser=None) -> list[type[BaseModel]]:
    """Every pydantic config class a subcommand of ``parser`` (default: ``rapm``'s) can validate."""
    roots: list[type[BaseModel]] = []
    for func in _subcommand_functions(parser or build_parser()):
        func = inspect.unwrap(func)
        names = func.__code__.co_names
        roots += [v for k, v in func.__globals__.items() if k in names and _models_in(v)]
        roots += [c.cell_contents for c in func.__closure__ or () if _models_in(c.cell_contents)]
    seen: dict[type[BaseModel], None] = {}
    todo = list(roots)
    while todo:
        model = todo.pop()
        if model not in seen:
            seen[model] = None
            todo += [m for f in model.model_fields.values() for m in _models_in(f.annotation)]
    return list(seen)


def _float_shape(annotation):
    """How a float sits in ``annotation``: "float", ("tuple", n), "list", or None (not a float field)."""
    if annotation is float:
        return "float"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        shapes = [s for a in args if a is not type(None) and (s := _float_shape(a))]
        return shapes[0] if shapes else None
    if origin is tuple and args and all(a is float for a in args if a is not Ellipsis):
        return ("tuple", 1 if Ellipsis in args else len(args))
    if origin is list and args == (float,):
        return "list"
    return None


def _as(shape, value):
    if shape == "float":
        return value
    if shape == "list":
        return [value]
    return [value] * shape[1]


def nonfinite_accepted(model: type[BaseModel]) -> list[str]:
    """``Model.field=value`` for each float field of ``model`` that validates a non-finite value."""
    accepted = []
    for name, field in model.model_fields.items():
        shape = _float_shape(field.annotation)
        if shape is None:
            continue
        for value in NONFINITE:
            try:
                model.model_validate({name: _as(shape, value)})
            except ValidationError as err:
                if any(e["loc"][:1] == (name,) for e in err.errors()):
                    continue  # refused (other errors are required fields left out)
            accepted.append(f"{model.__name__}.{name}={value}")
    return accepted


def test_the_walk_finds_every_command_config():
    names = {m.__name__ for m in cli_config_models()}
    assert {"IngestConfig", "TrajectoriesConfig", "ExecutionConfig", "DistillRunConfig", "TrainingConfig",
            "EvaluateConfig", "PipelineConfig", "DemoConfig"} <= names, names
    assert any(_float_shape(f.annotation) == ("tuple", 2) for m in cli_config_models()
               for f in m.model_fields.values())  # --betas: a float pair


def test_every_float_option_refuses_nonfinite_values():
    accepted = [entry for model in cli_config_models() for entry in nonfinite_accepted(model)]
    assert not accepted, "non-finite values accepted:\n" + "\n".join(accepted)
