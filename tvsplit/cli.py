"""Console entry point `tvsplit` (`main`; the typer app itself lives in `tvsplit.flows.cli`).

`main` runs the app and turns any exception that escapes a command into one ``error: ...``
line on stderr and exit status 1 (`storage.errors.user_message`, `flows.console.fail`); the
traceback is shown only with the global ``--debug`` option or ``TVSPLIT_DEBUG=1``.

Quiet, offline-friendly defaults for the engines, set before they are imported; a user's
own environment always wins.
"""

import time

_ENTERED = time.time()  # first: benchmarks/cli_bench.py measures the interpreter's start-up

import logging  # noqa: E402
import os  # noqa: E402

for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}.items():
    os.environ.setdefault(_key, _value)
logging.getLogger("distributed").setLevel(logging.WARNING)

from tvsplit.tasks import stages  # noqa: E402

stages.mark_entered(_ENTERED)

__all__ = ["app", "main"]  # noqa: F822 (app: the module __getattr__)


def __getattr__(name: str):
    """``app`` (the typer app) is imported on first use: ``--version`` never needs it."""
    if name == "app":
        return _app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _app():
    """The app, imported once and kept as this module's ``app`` (which tests may replace)."""
    if "app" not in globals():
        with stages.stage("imports"):
            from tvsplit.flows.cli import app

        globals()["app"] = app
    return globals()["app"]


def main(args: list[str] | None = None) -> None:
    """Run `tvsplit` with ``args`` (default: the command line): one line per error."""
    import sys

    from tvsplit.flows.console import DEBUG_VARIABLE, debug_enabled, print_error

    argv = list(sys.argv[1:] if args is None else args)
    global_options = argv[: _first_command(argv)]
    if "--debug" in global_options:
        os.environ[DEBUG_VARIABLE] = "1"
    if "--version" in global_options and "--help" not in global_options:
        # as the app's eager --version does, without importing the app (issue 20: ≤ 1.5 s)
        from tvsplit import __version__

        print(f"tvsplit {__version__}")
        sys.exit(0)
    try:
        _app()(args=argv, prog_name="tvsplit")
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print_error("interrupted")
        sys.exit(130)
    except Exception as error:
        if debug_enabled():
            raise
        from tvsplit.storage.errors import user_message

        print_error(user_message(error) + " (--debug shows the traceback)")
        sys.exit(1)


def _first_command(argv: list[str]) -> int:
    """Index of the first argument that is not a global option (the command's name)."""
    for index, arg in enumerate(argv):
        if not arg.startswith("-"):
            return index
    return len(argv)


if __name__ == "__main__":
    main()
