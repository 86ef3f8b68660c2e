"""CLI verbs `tvsplit server status|start|stop`: the local Prefect server of the data folder.

Flow commands start it on first use (`flows.prefect_server`); these verbs show it, start it
ahead of time and stop it. None of them imports Prefect.
"""

from __future__ import annotations

import os

import typer
from rich.console import Console
from tvsplit.flows.settings import load_settings

server_app = typer.Typer(
    help="The local Prefect server flow commands start on first use.", no_args_is_help=True
)
_out = Console()
_err = Console(stderr=True)


def _note_configured() -> None:
    url = os.environ.get("PREFECT_API_URL")
    if url:
        _out.print(f"note: PREFECT_API_URL={url} is set: flow commands use it, not this server")


@server_app.command("status")
def status_command() -> None:
    """Show the local server (URL, pid, Prefect version); exit status 1 when none is usable."""
    from tvsplit.flows.prefect_server import status

    home = load_settings().prefect_home
    _note_configured()
    server, problem = status(home)
    if server is None or problem is not None:
        _out.print(
            f"no usable local Prefect server under {home}" + (f": {problem}" if server else "")
        )
        raise typer.Exit(1)
    _out.print(
        f"local Prefect server at {server.url} (pid {server.pid}, Prefect {server.version}); "
        f"UI at http://127.0.0.1:{server.port}"
    )


@server_app.command("start")
def start_command() -> None:
    """Start the local server now (or report the one running)."""
    from tvsplit.flows.prefect_server import PrefectServerError, ensure_server

    home = load_settings().prefect_home
    try:
        server = ensure_server(home)
    except PrefectServerError as error:
        _err.print(f"[bold red]error:[/] {error}", highlight=False)
        raise typer.Exit(1) from None
    _out.print(f"local Prefect server at {server.url} (pid {server.pid})")


@server_app.command("stop")
def stop_command() -> None:
    """Stop the local server (by the pid recorded under the data folder)."""
    from tvsplit.flows.prefect_server import stop_server

    home = load_settings().prefect_home
    server = stop_server(home)
    if server is None:
        _out.print(f"no local Prefect server was running under {home}")
        return
    _out.print(f"stopped the local Prefect server (pid {server.pid}, port {server.port})")
