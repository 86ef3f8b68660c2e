"""Real servers for tests: each its own process on 127.0.0.1 at a free port, stopped by pid.

`start` launches a command, waits until its health check answers (failing, never skipping,
when it does not: a server that cannot start is a broken environment, not a reason to skip)
and returns a `Server`; `Server.stop` terminates the process and its children by pid.
`listening` reads the sockets a process tree really listens on (psutil), for checks that
everything binds 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS says is free now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def executable(name: str) -> str:
    """The console script `name` of this interpreter's environment (else from PATH)."""
    candidate = BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed (make install installs it)")
    return found


def http_ok(url: str, timeout: float = 3.0) -> bool:
    """Whether GET `url` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((LOOPBACK, port)) == 0


@dataclass
class Server:
    """A started server process (and whatever it forked), with its log file."""

    name: str
    process: subprocess.Popen
    log: Path
    url: str = ""
    pids: set[int] = field(default_factory=set)  # every pid seen in its tree (for checks)

    @property
    def pid(self) -> int:
        return self.process.pid

    def tree(self) -> list[psutil.Process]:
        """The process and its live descendants (remembered in `pids`)."""
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.pids.update(p.pid for p in procs)
        return procs

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process tree by pid, SIGKILL what is left after `timeout`."""
        procs = self.tree()
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)


def start(
    name: str,
    command: Sequence[str],
    *,
    ready: Callable[[], bool],
    logs: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 300.0,
    url: str = "",
) -> Server:
    """Start `command` and wait until `ready()`; RuntimeError with the log tail otherwise."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    handle = log.open("wb")
    process = subprocess.Popen(
        list(command),
        stdout=handle,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        start_new_session=True,  # a Ctrl-C of the test run does not hit it half-way
    )
    handle.close()
    server = Server(name, process, log, url)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {process.returncode} before it was ready:\n{server.log_tail()}"
            )
        if ready():
            server.tree()
            return server
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{name} not ready after {timeout:.0f} s:\n{server.log_tail()}")
        time.sleep(0.5)


def listening(procs: Sequence[psutil.Process]) -> list[tuple[int, str, str, int]]:
    """(pid, name, ip, port) of every listening TCP/UDP socket of `procs`."""
    found = []
    for proc in procs:
        try:
            connections = proc.net_connections(kind="inet")
            name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for conn in connections:
            listens = conn.status == psutil.CONN_LISTEN or conn.type == socket.SOCK_DGRAM
            if listens and conn.laddr:
                found.append((proc.pid, name, conn.laddr.ip, conn.laddr.port))
    return found


def not_loopback(sockets: Sequence[tuple[int, str, str, int]]) -> list[tuple[int, str, str, int]]:
    """The sockets not bound to a loopback address."""
    return [s for s in sockets if s[2] not in (LOOPBACK, "::1")]


@contextlib.contextmanager
def moto_s3(logs: Path) -> Iterator[tuple[Server, dict[str, str]]]:
    """An S3 endpoint (moto_server) and the environment that points boto/s3fs at it."""
    port = free_port()
    server = start(
        "moto",
        [executable("moto_server"), "-H", LOOPBACK, "-p", str(port)],
        ready=lambda: http_ok(f"http://{LOOPBACK}:{port}/"),
        logs=logs,
        timeout=120,
        url=f"http://{LOOPBACK}:{port}",
    )
    env = {
        "AWS_ENDPOINT_URL": server.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        yield server, env
    finally:
        server.stop()
