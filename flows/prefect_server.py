"""How a command reaches Prefect: one local Prefect server per data folder, started on first use
and reused by every later command.

Which API a flow run talks to, in order:

1. ``PREFECT_API_URL`` (environment or Prefect profile): that server, as it is.
2. ``TVSPLIT_PREFECT=ephemeral``: Prefect's own temporary server, started and stopped by every
   process that runs a flow (seconds per command; what Prefect does with no API URL).
3. Otherwise (``TVSPLIT_PREFECT=local``, the default): the server recorded under the data
   folder (``<prefect_home>/server.json``: pid, port, Prefect version). It is reused when its
   process is alive, ``/api/health`` answers and ``/api/admin/version`` reports this
   process's Prefect version; else it is stopped (by pid) and a new one is started:
   ``python -m prefect server start --host 127.0.0.1 --port <free port>`` with
   ``PREFECT_HOME=<prefect_home>`` (its database and log live there), detached from the
   command so that it outlives it. ``tvsplit server status`` and ``tvsplit server stop``
   show and stop it.

Guarantees: the server binds 127.0.0.1 only, on a port the OS reported free; one server per
``prefect_home`` (starting is serialised by a file lock, so two commands started together
share one server); a record whose process is gone, answers nothing or runs another Prefect
version is never used. This module imports neither Prefect nor httpx: checking a running
server costs two HTTP requests on the standard library.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

from tvsplit.storage.folders import pid_alive

RECORD = "server.json"
LOG = "server.log"
LOCK = "server.lock"
HOST = "127.0.0.1"


class PrefectServerError(RuntimeError):
    """The local Prefect server could not be started or stopped; the message says why."""


@dataclass(frozen=True)
class LocalServer:
    """A local Prefect server started by tvsplit: its process, port and Prefect version."""

    pid: int
    port: int
    version: str
    started: float

    @property
    def url(self) -> str:
        """The API URL (what ``PREFECT_API_URL`` would be)."""
        return f"http://{HOST}:{self.port}/api"


def prefect_version() -> str:
    """The installed Prefect's version (read from its metadata: Prefect is not imported)."""
    return version("prefect")


def read_record(home: Path) -> LocalServer | None:
    """The server recorded under ``home``, or None when there is no readable record."""
    try:
        data = json.loads((home / RECORD).read_text())
        return LocalServer(
            pid=int(data["pid"]),
            port=int(data["port"]),
            version=str(data["version"]),
            started=float(data["started"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _ours(server: LocalServer) -> bool:
    """Alive and still the process we started (a recycled pid runs something else)."""
    if not pid_alive(server.pid):
        return False
    try:
        argv = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): the health and version checks still apply
    return b"prefect" in b" ".join(argv) and str(server.port).encode() in argv


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy


def _get(url: str, timeout: float) -> object:
    with _DIRECT.open(url, timeout=timeout) as response:
        return json.loads(response.read())


def check(server: LocalServer, timeout: float = 2.0) -> str | None:
    """None when ``server`` is usable (alive, healthy, same Prefect version), else why not."""
    if not _ours(server):
        return f"its process {server.pid} is gone"
    try:
        healthy = _get(f"{server.url}/health", timeout)
        running = _get(f"{server.url}/admin/version", timeout)
    except (OSError, ValueError) as error:
        return f"it does not answer on {server.url} ({error})"
    if healthy is not True:
        return f"it reports unhealthy ({healthy!r})"
    if running != prefect_version():
        return f"it runs Prefect {running}, this process has {prefect_version()}"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _server_environment(home: Path) -> dict[str, str]:
    environment = {
        **os.environ,
        "PREFECT_HOME": str(home.resolve()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    }
    for key in ("PREFECT_API_URL", "PREFECT_PROFILE", "TVSPLIT_STAGES"):
        environment.pop(key, None)
    return environment


def _start(home: Path, timeout: float) -> LocalServer:
    port = _free_port()
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST]
    command += ["--port", str(port)]
    with open(home / LOG, "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_server_environment(home),
            cwd=home,
            start_new_session=True,  # outlives the command; Ctrl-C on the command spares it
        )
    server = LocalServer(process.pid, port, prefect_version(), time.time())
    (home / RECORD).write_text(json.dumps(asdict(server)) + "\n")
    deadline = time.monotonic() + timeout
    reason = check(server, timeout=1.0)
    while reason is not None:
        if process.poll() is not None:
            (home / RECORD).unlink(missing_ok=True)
            raise PrefectServerError(
                f"the local Prefect server exited with status {process.returncode} while "
                f"starting; see {home / LOG}"
            )
        if time.monotonic() > deadline:
            _terminate(process.pid)
            (home / RECORD).unlink(missing_ok=True)
            raise PrefectServerError(
                f"the local Prefect server did not answer within {timeout:.0f} s; see {home / LOG}"
            )
        time.sleep(0.1)
        reason = check(server, timeout=1.0)
    return server


def ensure_server(home: str | Path, timeout: float = 120.0) -> LocalServer:
    """The usable local server under ``home``: the recorded one, or a new one started now."""
    home = Path(home)
    with _locked(home):
        server = read_record(home)
        if server is not None and check(server) is None:
            return server
        if server is not None:
            if _ours(server):
                _terminate(server.pid)
            (home / RECORD).unlink(missing_ok=True)
        return _start(home, timeout)


def _terminate(pid: int, grace: float = 10.0) -> bool:
    """SIGTERM ``pid`` (and its process group), SIGKILL after ``grace`` s; True if it ran."""
    if not pid_alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return True


def stop_server(home: str | Path) -> LocalServer | None:
    """Stop the server recorded under ``home`` (by its pid); the stopped server, or None."""
    home = Path(home)
    with _locked(home):
        server = read_record(home)
        if server is None:
            return None
        ran = _ours(server) and _terminate(server.pid)
        (home / RECORD).unlink(missing_ok=True)
        return server if ran else None


def status(home: str | Path) -> tuple[LocalServer | None, str | None]:
    """The recorded server and None if it is usable, else the reason it is not."""
    server = read_record(Path(home))
    if server is None:
        return None, f"no local Prefect server recorded under {home}"
    return server, check(server)


@contextlib.contextmanager
def use_prefect(mode: str, home: str | Path) -> Iterator[str | None]:
    """Run the block's flows against the API chosen as the module docstring says; yields its
    URL (None for Prefect's temporary server).

    With tvsplit's own server or the temporary one, flow-run heartbeats are off: they let a
    server spot crashed runs of deployments, and their thread adds up to 1 s to the end of
    every flow run (it sleeps in 1 s steps and is joined on exit; PrefectHQ/prefect#19641).
    A server named by ``PREFECT_API_URL`` gets Prefect's defaults."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )
    from tvsplit.tasks.stages import stage

    configured = get_current_settings().api.url
    if configured is not None:
        yield configured
        return
    updates: dict = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    url = None
    if mode == "local":
        with stage("orchestration"):
            url = ensure_server(home).url
        updates[PREFECT_API_URL] = url
    elif mode != "ephemeral":
        raise PrefectServerError(f"TVSPLIT_PREFECT={mode!r}: use local or ephemeral")
    with temporary_settings(updates=updates):
        yield url
