"""The local Prefect server flow commands reach by default: started on first use under the data
folder, bound to 127.0.0.1, reused while healthy and of the same Prefect version, stopped by
pid. One real server (a process) for the module; every test stops what it started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from tvsplit.flows import prefect_server
from tvsplit.flows.prefect_server import LocalServer, check, ensure_server, read_record, stop_server
from tvsplit.storage.folders import pid_alive as _alive

TVSPLIT = str(Path(sys.executable).parent / "tvsplit")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A data folder's Prefect home with a running local server; stopped by pid at the end."""
    home = tmp_path_factory.mktemp("data") / "prefect"
    server = ensure_server(home)
    yield home
    stop_server(home)
    deadline = time.monotonic() + 15
    while _alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server.pid), f"the local server (pid {server.pid}) outlived stop_server"


def _post(url: str, body: dict) -> object:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with prefect_server._DIRECT.open(request, timeout=10) as response:
        return json.loads(response.read())


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "TVSPLIT_PREFECT": "local", "TVSPLIT_PREFECT_HOME": str(home), **extra}


def test_started_server_is_recorded_healthy_and_on_loopback_only(home):
    import psutil

    server = read_record(home)
    assert server is not None and check(server) is None
    assert server.version == prefect_server.prefect_version()
    process = psutil.Process(server.pid)
    listening = [
        c.laddr
        for p in [process, *process.children(recursive=True)]
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening, "the server listens nowhere"
    assert {address.ip for address in listening} == {"127.0.0.1"}
    assert server.port in {address.port for address in listening}


def test_a_second_command_reuses_the_server(home):
    first = read_record(home)
    again = ensure_server(home)
    assert (again.pid, again.port) == (first.pid, first.port)


def test_another_prefect_version_is_not_reused(home, monkeypatch):
    server = read_record(home)
    monkeypatch.setattr(prefect_server, "prefect_version", lambda: "0.0.0")
    reason = check(server)
    assert reason is not None and "0.0.0" in reason


def test_a_stale_record_is_not_trusted(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    stale = LocalServer(pid=int(finished.stdout), port=9, version="3.0.0", started=0.0)
    (tmp_path / prefect_server.RECORD).write_text(json.dumps(stale.__dict__))
    reason = check(read_record(tmp_path))
    assert reason is not None and "gone" in reason
    assert stop_server(tmp_path) is None  # nothing of ours to stop; the record is cleared
    assert read_record(tmp_path) is None


def test_a_flow_command_runs_on_the_local_server(home, repos, tmp_path):
    spec = tmp_path / "spec.yaml"
    members = {"ft1": str(repos.ft1)}
    spec.write_text(
        yaml.safe_dump({"families": {"f": {"base": str(repos.base), "members": members}}})
    )
    before = read_record(home)
    result = subprocess.run(
        [TVSPLIT, "ingest", str(spec), "--catalogue", str(tmp_path / "cat.zarr"), "--no-progress"],
        capture_output=True, text=True, cwd=tmp_path, env=_env(home), timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_record(home) == before  # reused, not restarted
    runs = _post(f"{before.url}/flow_runs/filter", {})
    flows = {f["id"]: f["name"] for f in _post(f"{before.url}/flows/filter", {})}
    ingests = [r for r in runs if flows.get(r["flow_id"]) == "tvsplit-ingest"]
    assert ingests and all(r["state_type"] == "COMPLETED" for r in ingests)
    assert not (tmp_path / "tvsplit-data").exists()  # the command used the given home only


def test_status_and_stop_commands(tmp_path):
    """`tvsplit server status` fails without a server; `stop` says there was none."""
    env = _env(tmp_path / "prefect")
    status = subprocess.run([TVSPLIT, "server", "status"], capture_output=True, text=True,
                            env=env, cwd=tmp_path)  # fmt: skip
    assert status.returncode == 1 and "no usable local Prefect server" in status.stdout
    stop = subprocess.run([TVSPLIT, "server", "stop"], capture_output=True, text=True,
                          env=env, cwd=tmp_path)  # fmt: skip
    assert stop.returncode == 0 and "no local Prefect server was running" in stop.stdout


def test_status_reports_the_running_server(home, tmp_path):
    server = read_record(home)
    status = subprocess.run([TVSPLIT, "server", "status"], capture_output=True, text=True,
                            env=_env(home), cwd=tmp_path)  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    assert server.url in status.stdout and str(server.pid) in status.stdout
