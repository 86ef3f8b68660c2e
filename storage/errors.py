"""Errors raised by `storage`: every message names the source, file or entry concerned."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class StorageError(ValueError):
    """Bad input found while reading a source or the catalogue (retrying will not help)."""


class SourceError(StorageError):
    """A model source that cannot be used as given: bad string, unknown layout, bad tensor."""


class PickleRefusedError(SourceError):
    """A pickle checkpoint (`.bin`, `.pt`) met without `allow_pickle=True`."""


class CatalogueError(StorageError):
    """A catalogue entry that is absent, incomplete, or does not hold what was asked for."""


class SourceUnavailableError(ConnectionError):
    """A source that could not be reached (network, hub outage, offline without a cache).

    A `ConnectionError`, so retry policies can tell it apart from bad input.
    """


# --------------------------------------------------------------------------- validation errors
# The one formatter of pydantic validation errors (specs, recipes, edit parameters, CLI
# settings): every problem becomes one ``where: reason`` line.

#: Between the problems one model validator reports in a single error (each already names
#: its field): the formatter splits them back into lines of their own.
PROBLEM_SEPARATOR = "\n"


def error_location(loc: Sequence[str | int], *, flag: bool = False) -> str:
    """``('members', 1, 'weight')`` → ``members[1].weight``; with ``flag`` the command-line
    option of a settings field (``('max_rank_fraction',)`` → ``--max-rank-fraction``)."""
    if flag:
        return "--" + "-".join(str(part) for part in loc).replace("_", "-")
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def validation_problems(
    error: ValidationError, prefix: Sequence[str | int] = (), *, flag: bool = False
) -> list[str]:
    """One ``field: reason`` line per problem of a pydantic ``ValidationError``; the field
    is located under ``prefix`` (``params.density``, ``members[0].weight``, ``--threshold``).
    A problem reported by a model validator (no location) keeps the field names it gives,
    one line per part separated by ``PROBLEM_SEPARATOR``."""
    lines: list[str] = []
    for item in error.errors(include_url=False):
        message = str(item["msg"]).removeprefix("Value error, ")
        loc = [*prefix, *item["loc"]]
        if loc:
            lines.append(f"{error_location(loc, flag=flag)}: {message}")
        else:
            lines += message.split(PROBLEM_SEPARATOR)
    return lines


def format_validation_error(
    error: ValidationError,
    *,
    source: str | None = None,
    prefix: Sequence[str | int] = (),
    flag: bool = False,
    bullets: bool = False,
) -> str:
    """A pydantic error as one message naming the file (``source``) and each faulty field.

    ``bullets`` puts one problem per ``  - `` line under the source; otherwise the problems
    are joined with ``; `` after ``source: ``."""
    lines = validation_problems(error, prefix, flag=flag)
    if bullets:
        body = "\n".join(f"  - {line}" for line in lines)
        return f"{source}\n{body}" if source else body
    text = "; ".join(lines)
    return f"{source}: {text}" if source else text


# --------------------------------------------------------------------------- user messages
#: Exceptions whose text is already a message for the user (they name the file, member,
#: parameter, option or value): printed as they are, without their type.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, LookupError, ConnectionError)


def user_message(error: BaseException) -> str:
    """The one line printed for ``error`` (``tvsplit.cli.main`` prints it after ``error:``).

    A pydantic ``ValidationError`` becomes ``field: reason`` parts; a ``ValueError`` (every
    ``StorageError``, recipe, plan and settings error derives from it) is its own text; an
    ``OSError`` names its file and the reason; anything else (a bug) keeps its type name.
    Lines are joined with ``; `` (the whole message is one line)."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        text = format_validation_error(error)
    elif isinstance(error, UnicodeError):
        text = f"{type(error).__name__}: {error}"
    elif isinstance(error, OSError) and not isinstance(error, ConnectionError):
        where = error.filename if error.filename is not None else ""
        reason = error.strerror or str(error)
        text = f"{where}: {reason}" if where else reason
    elif isinstance(error, _USER_ERRORS):
        text = str(error) or type(error).__name__
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return one_line(text)


def one_line(text: str) -> str:
    """``text`` on one line: its lines stripped and joined with ``; `` (bullets dropped)."""
    parts = [line.strip().removeprefix("- ").strip() for line in text.splitlines()]
    return "; ".join(part for part in parts if part)
