"""Turn a flow's pydantic config into argparse options, so the CLI, the flow signature (the
Prefect UI form) and the stores' metadata are all the same model and cannot drift apart.

Field ``foo_bar`` becomes ``--foo-bar``; a field marked ``json_schema_extra={"cli": "positional"}``
becomes a positional argument; ``Literal`` fields become choices; booleans get ``--x/--no-x``.
A field whose type is itself a pydantic model (e.g. a method's hyperparameters nested in a run
config) contributes its own fields as top-level options, without a prefix, so the nested names
must not collide with the outer ones (argparse refuses a duplicate flag).
Only options the user gave are passed to the model, so its defaults stay the single source.
"""

from __future__ import annotations

import argparse
import re
import typing
from typing import Any, Literal

from pydantic import BaseModel


def _choices(annotation: Any) -> list[Any] | None:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return None


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return True
    if origin is typing.Union or str(origin) == "types.UnionType":
        return any(_is_list(a) for a in typing.get_args(annotation) if a is not type(None))
    return False


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def add_model_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], skip: set[str] = frozenset(),
                        _prefix: str = "") -> None:
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        nested = _nested_model(field.annotation)
        if nested is not None:
            add_model_arguments(parser, nested, skip, f"{_prefix}{name}.")
            continue
        dest = _prefix + name
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        help_text = field.description or ""
        if extra.get("cli") == "positional":
            parser.add_argument(dest, metavar=name.upper(), help=help_text)
            continue
        flag = "--" + name.replace("_", "-")
        # A description that explains its default ("default: the one run.json names") already
        # says more than the field's value (usually None) would.
        explained = re.search(r"\bdefault\b", help_text, re.IGNORECASE) is not None
        default_note = "" if field.is_required() or explained else f" (default: {field.default!r})"
        if field.annotation is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text + default_note)
        elif _is_list(field.annotation):
            parser.add_argument(flag, dest=dest, nargs="+", default=None, metavar=name.upper(),
                                help=help_text + default_note)
        else:
            choices = _choices(field.annotation)
            parser.add_argument(flag, dest=dest, default=None, choices=choices,
                                metavar=None if choices else name.upper(),
                                required=field.is_required(), help=help_text + default_note)


def _given(model: type[BaseModel], values: dict[str, Any], prefix: str) -> dict[str, Any]:
    given: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is not None:
            if sub := _given(nested, values, f"{prefix}{name}."):
                given[name] = sub
        elif values.get(prefix + name) is not None:
            given[name] = values[prefix + name]
    return given


def model_from_args(model: type[BaseModel], args: argparse.Namespace) -> BaseModel:
    return model.model_validate(_given(model, vars(args), ""))
