"""Turn a flow's pydantic config into argparse options, so the CLI, the flow signature (the
Prefect UI form) and the stores' metadata are all the same model and cannot drift apart.

Field ``foo_bar`` becomes ``--foo-bar``; a field marked ``json_schema_extra={"cli": "positional"}``
becomes a positional argument; ``Literal`` fields become choices; booleans get ``--x/--no-x``.
A field whose type is itself a pydantic model (a section: a method's training options, a
pipeline's stage) contributes its own fields as options of an argument group; they keep their
names (``--lr``) unless the section sets ``json_schema_extra={"cli_prefix": "distill-"}``, whose
prefix then applies to everything inside it (``--distill-lr``). Names must not collide
(argparse refuses a duplicate flag). Only options the user gave are passed to the model, so its
defaults stay the single source. An optional field (``float | None``) takes the word ``none``
for None, so a default that is on (``--grad-clip 1.0``) can be turned off from the command line.
"""

from __future__ import annotations

import argparse
import types
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
    if origin is typing.Union or origin is types.UnionType:
        return any(_is_list(a) for a in typing.get_args(annotation) if a is not type(None))
    return False


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _extra(field) -> dict:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


_UNSET = object()
_NONE = object()  # "none" typed for an optional field: None, unlike an option not given


def _optional(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return (origin is typing.Union or origin is types.UnionType) and type(None) in typing.get_args(annotation)


def _none_or_text(text: str):
    return _NONE if text.strip().lower() == "none" else text


def field_help(field, default: Any = _UNSET) -> str:
    """A field's option help: its description, and its default unless the description explains it."""
    text = field.description or ""
    if (field.is_required() or field.default_factory is not None) and default is _UNSET:
        return text  # before the line below turns it into PydanticUndefined
    default = field.default if default is _UNSET else default
    # A description that already explains its default says it better than the repr would.
    if "default" in text or default is None:
        return text
    return f"{text} (default: {default!r})"


def add_model_arguments(parser, model: type[BaseModel], defaults: BaseModel | None = None, _dest: str = "",
                        _flag: str = "") -> None:
    """Options for every field of ``model``; ``defaults`` (an instance) overrides the defaults the
    help shows, for a model whose validator supplies other values (``rapm demo``)."""
    for name, field in model.model_fields.items():
        default = getattr(defaults, name) if defaults is not None else _UNSET
        nested = _nested_model(field.annotation)
        if nested is not None:
            group = parser.add_argument_group(f"{_flag}{name}: {field.description or name}") \
                if isinstance(parser, argparse.ArgumentParser) else parser
            add_model_arguments(group, nested, default if defaults is not None else None, f"{_dest}{name}.",
                                _flag + _extra(field).get("cli_prefix", ""))
            continue
        dest = _dest + name
        if _extra(field).get("cli") == "positional":
            parser.add_argument(dest, metavar=name.upper(), help=field.description or "")
            continue
        flag = "--" + (_flag + name).replace("_", "-")
        text = field_help(field, default)
        if field.annotation is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif _is_list(field.annotation):
            parser.add_argument(flag, dest=dest, nargs="+", default=None, metavar=name.upper(), help=text)
        else:
            choices = _choices(field.annotation)
            optional = _optional(field.annotation) and not choices
            parser.add_argument(flag, dest=dest, default=None, choices=choices,
                                metavar=None if choices else name.upper(),
                                type=_none_or_text if optional else None,
                                required=field.is_required() and defaults is None,
                                help=f'{text} ("none": None)' if optional else text)


def _given(model: type[BaseModel], values: dict[str, Any], prefix: str) -> dict[str, Any]:
    given: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is not None:
            if sub := _given(nested, values, f"{prefix}{name}."):
                given[name] = sub
        elif values.get(prefix + name) is not None:
            given[name] = None if values[prefix + name] is _NONE else values[prefix + name]
    return given


def model_from_args(model: type[BaseModel], args: argparse.Namespace) -> BaseModel:
    return model.model_validate(_given(model, vars(args), ""))
