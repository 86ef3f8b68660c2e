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


#: Where the project shows its own progress, these libraries' bars and chatter are noise
#: between its lines (`quiet_third_party`); a user's own setting of any of them wins.
_QUIET_ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub, and transformers reads it too
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables..."
}


def quiet_third_party() -> None:
    """Silence third-party progress bars and INFO chatter: transformers' "Loading weights" /
    "Writing model shards", huggingface_hub's downloads, diffusers' denoising steps, MLflow's
    database set-up. Environment defaults for libraries not imported yet (read at their
    import), their own switches for those already imported."""
    import importlib
    import logging
    import os
    import sys

    for key, value in _QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] not in ("1", "true", "True", "TRUE"):
        return  # the user asked for the bars
    switches = {
        "huggingface_hub": ("huggingface_hub.utils", "disable_progress_bars"),
        "transformers": ("transformers.utils.logging", "disable_progress_bar"),
        "diffusers": ("diffusers.utils.logging", "disable_progress_bar"),
    }
    for package, (module, switch) in switches.items():
        if package in sys.modules:  # imported already: its environment default is read
            getattr(importlib.import_module(module), switch)()
    if "mlflow" in sys.modules and os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING":
        logging.getLogger("mlflow").setLevel(logging.WARNING)


class Story:
    """The main job told as a short story on stderr: one line per stage when it ends
    (``zoo: 21 models ready (339 s)``). While a stage runs, its step messages show on one
    line that is redrawn in place when stderr is a terminal (`live` stages: those that draw
    no bars of their own); with ``verbose`` every message is printed as its own line."""

    def __init__(self, *, verbose: bool = False, enabled: bool = True) -> None:
        self.verbose, self.enabled = verbose, enabled
        self.console = Console(stderr=True)

    def say(self, message: str) -> None:
        """A line of the story, always printed (a result, a warning, where things are)."""
        if self.enabled:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def stage(self, name: str, *, live: bool = False) -> Stage:
        return Stage(self, name, live=live)


class Stage:
    """One stage of a `Story`: a context manager; ``step`` reports progress inside it,
    ``done`` sets the line printed at its end."""

    def __init__(self, story: Story, name: str, *, live: bool) -> None:
        self.story, self.name = story, name
        self.steps, self.result = 0, ""
        self._status = None
        self._live = live and story.enabled and story.console.is_terminal and not story.verbose

    def __enter__(self) -> Stage:
        import time

        self._started = time.perf_counter()
        if self._live:
            self._status = self.story.console.status(f"{self.name}…".replace("[", "\\["))
            self._status.start()
        return self

    def step(self, message: str) -> None:
        """Progress inside the stage: redrawn in place (terminal), printed with verbose."""
        self.steps += 1
        if self.story.verbose:
            self.story.say(f"  {message}")
        elif self._status is not None:
            from rich.markup import escape

            self._status.update(escape(f"{self.name}: {message}"))

    def done(self, result: str) -> None:
        self.result = result

    def __exit__(self, kind: object, *exc: object) -> None:
        import time

        if self._status is not None:
            self._status.stop()
        if kind is not None:
            return
        elapsed = time.perf_counter() - self._started
        result = f" {self.result}" if self.result else ""
        self.story.say(f"{self.name}:{result} ({elapsed:.0f} s)")
