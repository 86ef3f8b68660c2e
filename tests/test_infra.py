"""infra/ (Docker can not run here): the compose file and deployments/prefect.yaml name only
commands, flags, images, ports and variables that exist, and they match the settings the
real-server integration test runs with (tests/integration/test_servers.py)."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from servers import executable

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PREFECT_YAML = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
INTEGRATION = (ROOT / "tests" / "integration" / "test_servers.py").read_text()
SERVERS = (ROOT / "tests" / "servers.py").read_text()
CLIS = {"prefect", "dask", "mlflow", "tvsplit"}


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _commands() -> list[tuple[str, list[str]]]:
    """(service, argv) of every service running one of our CLIs directly."""
    found = []
    for name, service in SERVICES.items():
        command = service.get("command")
        if isinstance(command, list) and command and command[0] in CLIS:
            found.append((name, [str(part) for part in command]))
    return found


@cache
def _help(cli: str, subcommand: tuple[str, ...]) -> str:
    done = subprocess.run(
        [executable(cli), *subcommand, "--help"], capture_output=True, text=True, timeout=180,
        env={"PATH": str(Path(executable(cli)).parent), "NO_COLOR": "1", "COLUMNS": "200",
             "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def _split(argv: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """The subcommand words and the --flags of an argv."""
    words = []
    for part in argv[1:]:
        if part.startswith("-") or ":" in part or "/" in part:
            break
        words.append(part)
    return tuple(words), [p.split("=")[0] for p in argv if p.startswith("--")]


def _env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_images_are_pinned_and_match_the_stack():
    for name, service in SERVICES.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)
    assert str(PREFECT_YAML["prefect-version"]) == _pins()["prefect"]
    dockerfile = (INFRA / "Dockerfile").read_text()
    for copied in re.findall(r"^COPY (\S+) ", dockerfile, re.M):
        for path in copied.split():
            assert (ROOT / path).exists(), path
    assert "torch==" + _pins()["torch"] in dockerfile and ".[s3]" in dockerfile


@pytest.mark.parametrize("service,argv", _commands(), ids=[s for s, _ in _commands()])
def test_every_command_and_flag_exists(service, argv):
    words, flags = _split(argv)
    text = _help(argv[0], words)
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (service, flag)


def test_commands_match_the_integration_test():
    """The servers run with the flags the integration test starts them with."""
    commands = dict(_commands())
    for service, flags in {
        "dask-worker-cpu": ["--nworkers", "--nthreads"],
        "dask-worker-gpu": ["--nworkers", "--nthreads", "--resources"],
        "mlflow": ["--backend-store-uri", "--artifacts-destination"],
        "prefect-worker": ["--pool", "--type"],
    }.items():
        for flag in flags:
            assert flag in commands[service] and f'"{flag}"' in INTEGRATION, (service, flag)
    gpu = commands["dask-worker-gpu"]
    assert gpu[gpu.index("--resources") + 1] == "GPU=1" and '"GPU=1"' in INTEGRATION
    assert SERVICES["dask-worker-gpu"]["runtime"] == "nvidia"
    pools = {d["work_pool"]["name"] for d in PREFECT_YAML["deployments"]}
    worker = commands["prefect-worker"]
    assert pools == {worker[worker.index("--pool") + 1]} == {"tvsplit"}
    assert (
        '"--pool", "tvsplit"' in INTEGRATION and '"work-pool", "create", "tvsplit"' in INTEGRATION
    )


def test_ports_are_published_on_loopback_and_match_the_urls():
    env = _env(SERVICES["prefect-worker"]) or {}
    anchor = COMPOSE["x-tvsplit"]["environment"]
    env = {**anchor, **env}
    published = {}
    for name, service in SERVICES.items():
        for mapping in service.get("ports", []):
            host, _, container_port = str(mapping).split(":")
            assert host == "127.0.0.1", (name, mapping)
            published.setdefault(name, set()).add(int(container_port))
    for variable, service in {
        "PREFECT_API_URL": "prefect-server",
        "MLFLOW_TRACKING_URI": "mlflow",
        "TVSPLIT_SCHEDULER": "dask-scheduler",
        "AWS_ENDPOINT_URL": "object-store",
    }.items():
        url = urlparse(env[variable])
        assert url.hostname == service and url.port in published[service], variable
        command = SERVICES[service]["command"]
        assert str(url.port) in " ".join(map(str, command)), (service, url.port)


def test_environment_variables_exist_in_the_code_and_the_integration_test():
    from tvsplit.flows.settings import Settings
    from tvsplit.storage.object_store import ENV

    text = (INFRA / "docker-compose.yml").read_text() + (INFRA / "README.md").read_text()
    known = {f"TVSPLIT_{name.upper()}" for name in Settings.model_fields} | {ENV}
    credentials = {"TVSPLIT_S3_KEY", "TVSPLIT_S3_SECRET"}  # compose's own substitutions
    named = set(re.findall(r"\bTVSPLIT_[A-Z_]+\b", text)) - credentials
    assert named <= known, named - known
    worker_env = COMPOSE["x-tvsplit"]["environment"]
    # Every variable the integration test gives its commands and workers is set here too.
    for variable in (
        "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "TVSPLIT_CATALOGUE", "TVSPLIT_SPEC",
        "TVSPLIT_SCHEDULER", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
    ):  # fmt: skip
        assert variable in worker_env, variable
        assert variable in INTEGRATION + SERVERS, variable
    assert urlparse(worker_env["TVSPLIT_CATALOGUE"]).scheme == "s3"


def test_the_spec_the_sync_reads_is_valid():
    from tvsplit.flows.ingest import load_spec

    target = COMPOSE["x-tvsplit"]["environment"]["TVSPLIT_SPEC"]
    mount = next(v for v in COMPOSE["x-tvsplit"]["volumes"] if v.split(":")[1] == "/specs")
    local = INFRA / mount.split(":")[0] / Path(target).relative_to("/specs")
    assert load_spec(local).families
