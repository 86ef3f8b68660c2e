"""Terminal output of the flows and the CLI: the one progress-bar set-up and the one way a
command reports a user error (a red ``error:`` line on stderr, exit status 1, no traceback
unless ``--debug`` or ``TVSPLIT_DEBUG=1``).

Imports only rich and typer, so a CLI leaf can import it while building ``--help``.
"""

from __future__ import annotations

from typing import NoReturn

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

out = Console()
err = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr, on one line (`storage.errors.one_line`), and exit
    with status 1 (no traceback)."""
    import typer

    print_error(message)
    raise typer.Exit(1)


def print_error(message: str) -> None:
    """Print ``error: message`` on stderr, on one line (what `fail` prints)."""
    from rich.markup import escape
    from tvsplit.storage.errors import one_line

    err.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)


def debug_enabled() -> bool:
    """Whether tracebacks are wanted: the global ``--debug`` option or ``TVSPLIT_DEBUG=1``."""
    import os

    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


#: Set to 1 by ``--debug``; read by `debug_enabled`.
DEBUG_VARIABLE = "TVSPLIT_DEBUG"


def progress_bars(
    enabled: bool = True, *, unit: str | None = None, terminal_only: bool = False
) -> Progress:
    """The rich progress display every flow uses: description, bar, done/total, elapsed.

    ``unit`` labels the count (``"parameters"``); ``enabled=False`` draws nothing; with
    ``terminal_only`` it draws only when stderr is a terminal (not in logs or CI output).
    Bars go to stderr, so a command's stdout stays its result."""
    console = Console(stderr=True)
    columns: list[ProgressColumn] = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
    ]
    if unit:
        columns.append(TextColumn(unit))
    columns.append(TimeElapsedColumn())
    show = enabled and (console.is_terminal or not terminal_only)
    return Progress(*columns, console=console, disable=not show)
