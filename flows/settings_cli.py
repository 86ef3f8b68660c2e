"""Command-line flags generated from a pydantic settings model (the way mergekit generates
its flags from its options model), so a setting is declared once: in the model.

``settings_flags(fields, choices)`` decorates a typer command whose signature ends in
``**settings``: one ``--flag`` per field (help from the field's description, its default,
its choices), and the command receives only the flags the user gave, for the settings
model to validate (so an unset flag keeps the model's default).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import typer
from pydantic.fields import FieldInfo


def _base_type(annotation: Any) -> tuple[type, tuple[str, ...]]:
    """The flag's scalar type and, for a Literal, its choices (``X | None`` → X)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in args if a is not type(None))
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return str, tuple(str(a) for a in args)
    return annotation, ()


def _help(info: FieldInfo, default: str | None) -> str:
    text = (info.description or "").rstrip(".")
    if default is not None:
        text += f" (default: {default})"
    return text + "."


def settings_flags(
    fields: Mapping[str, FieldInfo],
    *,
    choices: Mapping[str, Sequence[str]] | None = None,
    defaults: Mapping[str, str] | None = None,
    panel: str = "Split settings",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add one ``--flag`` per settings field to a typer command ending in ``**settings``.

    ``choices`` overrides a field's choices (a registry's names); ``defaults`` overrides
    the default shown in the help (a value that depends on another setting)."""
    choices = dict(choices or {})
    defaults = dict(defaults or {})

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        fixed = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        names = {p.name for p in fixed}
        generated = []
        for name, info in fields.items():
            if name in names:
                continue
            kind, own_choices = _base_type(info.annotation)
            options = tuple(choices.get(name, own_choices))
            shown = defaults.get(name)
            if shown is None and not info.is_required():
                shown = "none" if info.default is None else str(info.default).lower()
            flag = "--" + name.replace("_", "-")
            declarations = (f"{flag}/--no-{flag[2:]}",) if kind is bool else (flag,)
            option = typer.Option(
                None,
                *declarations,
                help=_help(info, shown),
                show_default=False,
                rich_help_panel=panel,
            )
            annotation = typing.Literal[options] if options else kind
            generated.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=option,
                    annotation=annotation | None,
                )
            )
        settings_names = [p.name for p in generated]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given = {k: kwargs.pop(k) for k in settings_names if kwargs.get(k) is not None}
            for k in settings_names:
                kwargs.pop(k, None)
            return command(**kwargs, **given)

        keyword = [p.replace(kind=p.KEYWORD_ONLY) for p in fixed]
        wrapper.__signature__ = signature.replace(parameters=[*keyword, *generated])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {}
        return wrapper

    return decorate
