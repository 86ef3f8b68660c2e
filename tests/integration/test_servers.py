"""The pipeline as its users run it, against real servers on 127.0.0.1 (`make test-integration`,
run by `.ci/run` after `make test`).

Started as processes at free ports and stopped by pid: a Prefect server (own PREFECT_HOME),
a Dask scheduler with two worker processes (one offering ``GPU=1``), an MLflow server
(SQLite backend, artifacts destination) and moto_server as the S3 endpoint of the
catalogue. The CLI runs ingest → decompose (``--scheduler``, then ``--gpu``) → edit →
a small suite evaluation, and each server is asked through its own API what happened. A
server that cannot start fails the test: nothing here skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from fixtures_models import finetuned_copy, save_model, tiny_gpt2
from servers import (
    LOOPBACK,
    Server,
    executable,
    free_port,
    http_ok,
    listening,
    moto_s3,
    not_loopback,
    port_open,
    start,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BUCKET = "tvsplit-ci"
FAMILY = "tiny"
MEMBERS = ("ft1", "ft2", "ft3")


@dataclass
class Stack:
    """The running servers and the environment every command gets."""

    root: Path
    env: dict[str, str]
    servers: dict[str, Server] = field(default_factory=dict)
    scheduler: str = ""
    prefect_api: str = ""
    mlflow_uri: str = ""
    catalogue: str = ""
    workers: dict[str, str] = field(default_factory=dict)  # name → worker address

    def cli(
        self, *args: str, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run `tvsplit ARGS` as a user would; fails with its output when it fails."""
        done = subprocess.run(
            [executable("tvsplit"), *args],
            env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(
                f"tvsplit {' '.join(args)} exited {done.returncode}\n"
                f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-6000:]}"
            )
        return done

    def run(self, *command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run(
            list(command), env=self.env, cwd=self.root, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {done.returncode}\n{done.stdout[-3000:]}\n"
                f"{done.stderr[-5000:]}"
            )
        return done


def _base_env(root: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "MLFLOW_", "TVSPLIT_", "AWS_", "DASK_"))
    }
    env.update(
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(root / "hf"),
        PYTHONUNBUFFERED="1",
        # A loaded shared CPU stretches Dask's handshakes past their 30 s defaults.
        DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="120s",
        DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP="300s",
    )
    return env


@pytest.fixture(scope="module")
def stack():
    """Every server started at once (their start-ups overlap), stopped by pid at the end."""
    # Not under pytest's basetemp: other pytest sessions on the machine rotate it away
    # (keeping the newest three), servers' databases included, while this one still runs.
    root = Path(tempfile.mkdtemp(prefix="tvsplit-integration-"))
    logs = root / "logs"
    env = _base_env(root)
    stack = Stack(root, env)
    ports = {name: free_port() for name in ("prefect", "scheduler", "mlflow")}
    prefect_env = {
        **env,
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",  # cron runs appear in seconds
    }
    pending = {
        "prefect": (
            [executable("prefect"), "server", "start", "--host", LOOPBACK,
             "--port", str(ports["prefect"]), "--no-ui"],
            prefect_env,
            lambda: http_ok(f"http://{LOOPBACK}:{ports['prefect']}/api/health"),
        ),
        "scheduler": (
            [executable("dask"), "scheduler", "--host", LOOPBACK, "--port",
             str(ports["scheduler"]), "--dashboard-address", f"{LOOPBACK}:0"],
            env,
            lambda: port_open(ports["scheduler"]),
        ),
        "mlflow": (
            [executable("mlflow"), "server", "--host", LOOPBACK, "--port", str(ports["mlflow"]),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "mlflow-artifacts")],
            env,
            lambda: http_ok(f"http://{LOOPBACK}:{ports['mlflow']}/health"),
        ),
    }  # fmt: skip
    try:
        with moto_s3(logs) as (moto, s3_env):
            stack.servers["moto"] = moto
            # Start all, then wait for each: the start-ups run side by side.
            launched = {
                name: start(name, cmd, ready=lambda: True, logs=logs, env=e)
                for name, (cmd, e, _) in pending.items()
            }
            stack.servers.update(launched)
            for name, (_, _, ready) in pending.items():
                _wait(launched[name], ready, timeout=420)
            stack.scheduler = f"tcp://{LOOPBACK}:{ports['scheduler']}"
            stack.prefect_api = f"http://{LOOPBACK}:{ports['prefect']}/api"
            stack.mlflow_uri = f"http://{LOOPBACK}:{ports['mlflow']}"
            stack.catalogue = f"s3://{BUCKET}/catalogue.zarr"
            env.update(
                s3_env,
                PREFECT_API_URL=stack.prefect_api,
                MLFLOW_TRACKING_URI=stack.mlflow_uri,
                TVSPLIT_CATALOGUE=stack.catalogue,
            )
            _make_bucket(s3_env)
            worker_env = {**env, "OMP_NUM_THREADS": "1"}  # one core each: 2 workers, 2 cores
            for name, extra in (("cpu-worker", []), ("gpu-worker", ["--resources", "GPU=1"])):
                stack.servers[name] = start(
                    name,
                    [executable("dask"), "worker", stack.scheduler, "--host", LOOPBACK,
                     "--nworkers", "1", "--nthreads", "1", "--name", name,
                     "--dashboard-address", f"{LOOPBACK}:0", *extra],
                    ready=lambda: True, logs=logs, env=worker_env, cwd=root,
                )  # fmt: skip
            stack.workers = _wait_for_workers(stack.scheduler, {"cpu-worker", "gpu-worker"})
            yield stack
    finally:
        for server in reversed(list(stack.servers.values())):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _wait(server: Server, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited {server.process.returncode}:\n{server.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{server.name} not ready after {timeout:.0f} s:\n{server.log_tail()}"
            )
        time.sleep(0.5)
    server.tree()


def _make_bucket(s3_env: dict[str, str]) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_env["AWS_ENDPOINT_URL"],
        aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"],
        region_name=s3_env["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=BUCKET)


def _wait_for_workers(scheduler: str, names: set[str], timeout: float = 300) -> dict[str, str]:
    from distributed import Client

    with Client(scheduler, timeout=60) as client:
        client.wait_for_workers(len(names), timeout=timeout)
        client.get_task_stream()  # installs the scheduler's task-stream record from now on
        workers = client.scheduler_info(n_workers=-1)["workers"]
        return {info["name"]: address for address, info in workers.items()}


# -- the family --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spec(stack) -> Path:
    models = stack.root / "models"
    base = save_model(tiny_gpt2(0, n_layer=1), models / "base")  # few parameters: fewer requests
    members = {
        name: finetuned_copy(base, models / name, seed=i + 1) for i, name in enumerate(MEMBERS)
    }
    path = stack.root / "spec.yaml"
    family = {"base": str(base), "members": {m: str(p) for m, p in members.items()}}
    path.write_text(yaml.safe_dump({"families": {FAMILY: family}}))
    return path


@pytest.fixture(scope="module")
def pipeline(stack, spec):
    """ingest → decompose on the cluster → decompose on the GPU worker → edit, via the CLI."""
    from distributed import Client

    out: dict[str, object] = {}
    stack.cli("ingest", str(spec), "--no-progress")
    with Client(stack.scheduler, timeout=60) as client:
        # The scheduler's task stream is append-only: each command's jobs are the records
        # added while it ran (positions, not clocks).
        before = len(client.get_task_stream())
        stack.cli("decompose", FAMILY, "--scheduler", stack.scheduler, "--min-tasks", "2")
        between = len(client.get_task_stream())
        stack.cli("decompose", FAMILY, "--scheduler", stack.scheduler, "--gpu", "--seed", "1")
        stream = client.get_task_stream()
    out["cluster_tasks"] = _jobs(stream[before:between])
    out["gpu_tasks"] = _jobs(stream[between:])
    recipe = stack.root / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"base": str(stack.root / "models" / "base"), "family": FAMILY,
             "method": "task_arithmetic", "members": [{"name": "ft1"}, {"name": "ft2"}]}
        )
    )  # fmt: skip
    out["edited"] = stack.root / "edited"
    stack.cli("edit", str(recipe), "--out", str(out["edited"]))
    # A small suite evaluation: the vision suite's tiny preset (zoo → ingest into the bucket
    # → decompose on the cluster → every row → the chosen edit → MLflow → its section).
    out["results"] = stack.root / "RESULTS.md"
    out["suite"] = stack.cli(
        "evaluate", "vision", "--preset", "tiny", "--scheduler", stack.scheduler,
        "--results", str(out["results"]), timeout=900,
    )  # fmt: skip
    return out


def _jobs(stream: list[dict]) -> list[tuple[str, str]]:
    """(key, worker) of the decomposition jobs among task-stream records."""
    return [(str(r["key"]), r["worker"]) for r in stream if "decompose" in str(r["key"])]


def test_decomposition_jobs_ran_on_both_workers_and_gpu_jobs_only_on_the_gpu_worker(
    stack, pipeline
):
    cpu, gpu = stack.workers["cpu-worker"], stack.workers["gpu-worker"]
    cluster = {worker for _, worker in pipeline["cluster_tasks"]}
    assert cluster == {cpu, gpu}, pipeline["cluster_tasks"]
    assert pipeline["gpu_tasks"], "no --gpu jobs were recorded"
    assert {worker for _, worker in pipeline["gpu_tasks"]} == {gpu}


def test_prefect_server_holds_completed_flow_and_task_runs(stack, pipeline):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: stack.prefect_api}),
        get_client(sync_client=True) as client,
    ):
        flow_runs = client.read_flow_runs()
        task_runs = client.read_task_runs()
        flows = {f.id: f.name for f in client.read_flows()}
    names = {flows[r.flow_id] for r in flow_runs}
    assert {"tvsplit-ingest", "tvsplit-decompose", "tvsplit-edit"} <= names, names
    assert all(r.state_type.value == "COMPLETED" for r in flow_runs), [
        (flows[r.flow_id], r.state_name) for r in flow_runs
    ]
    assert "tvsplit-suite" in names, names
    decompose_runs = [
        r
        for r in flow_runs
        if flows[r.flow_id] == "tvsplit-decompose" and r.parameters.get("family") == FAMILY
    ]
    assert len(decompose_runs) == 2
    batches = [t for t in task_runs if t.name.startswith("split ")]
    assert batches and all(t.state_type.value == "COMPLETED" for t in task_runs), [
        (t.name, t.state_name) for t in task_runs if t.state_type.value != "COMPLETED"
    ]


def test_mlflow_server_holds_runs_metrics_and_artifacts(stack, pipeline):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    experiment = client.get_experiment_by_name("tvsplit-decompose")
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"params.family = '{FAMILY}'"
    )
    assert len(runs) == 2
    for run in runs:
        assert run.data.params["family"] == FAMILY
        assert run.data.metrics["parameters"] > 0
        assert any(key.startswith("shared_energy/") for key in run.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"shared_energy_heatmap.png", "eigenvalue_spectra.png"} <= artifacts, artifacts
    local = client.download_artifacts(
        runs[0].info.run_id, "shared_energy_heatmap.png", str(stack.root)
    )
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    edits = client.get_experiment_by_name("tvsplit-edit")
    assert edits is not None and client.search_runs([edits.experiment_id])


def test_suite_evaluation_is_a_parent_run_with_nested_runs_and_metrics(stack, pipeline):
    """`tvsplit evaluate vision --preset tiny` against the servers: one parent run in the
    MLflow server with a nested run per row, each with its metrics, and its section."""
    import math

    from mlflow.tracking import MlflowClient
    from tvsplit.tasks.suites.results import read_section

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    experiment = client.get_experiment_by_name("tvsplit-vision")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"
    assert (parent.data.params["suite"], parent.data.params["preset"]) == ("vision", "tiny")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    rows = {r.info.run_name for r in children}
    variants = ("one-sided", "two-sided")
    split_rows = {f"{m}[{v}]" for m in ("shared_ta", "shared_ties") for v in variants}
    assert {"base", "individual", "weight_average", "task_arithmetic", "ties", *split_rows,
            "tsv_m", "iso_c", "iso_cts"} == rows  # fmt: skip
    for child in children:
        assert child.info.status == "FINISHED"
        metrics = child.data.metrics
        assert {"score", "normalized", "test/mnist", "test/digits"} <= set(metrics), metrics
        assert all(math.isfinite(v) for v in metrics.values())
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"RESULTS.md", "results_table.md", "results.json", "vision_results.png"} <= artifacts
    section = read_section(pipeline["results"].read_text(), "vision")
    assert section.startswith("## Vision suite") and "`tsv_m`" in section


def test_a_plain_zarr_reader_reads_the_bucket(stack, pipeline):
    """No tvsplit: s3fs + zarr find a task vector and a basis where the layout says."""
    import numpy as np
    import s3fs
    import zarr

    fs = s3fs.S3FileSystem(
        endpoint_url=stack.env["AWS_ENDPOINT_URL"], key=stack.env["AWS_ACCESS_KEY_ID"],
        secret=stack.env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True,
    )  # fmt: skip
    store = zarr.storage.FsspecStore(fs=s3fs.S3FileSystem(
        endpoint_url=stack.env["AWS_ENDPOINT_URL"], key=stack.env["AWS_ACCESS_KEY_ID"],
        secret=stack.env["AWS_SECRET_ACCESS_KEY"], asynchronous=True, skip_instance_cache=True,
    ), path=f"{BUCKET}/catalogue.zarr", read_only=True)  # fmt: skip
    root = zarr.open_group(store, mode="r", zarr_format=3)
    family = root[f"families/{FAMILY}"]
    assert sorted(family["vectors"].group_keys()) == list(MEMBERS)
    vector = family["vectors/ft1"]
    assert vector.attrs["tvsplit"]["status"] == "complete"
    key = next(iter(vector.array_keys()))
    data = vector[key][...]
    assert data.dtype == np.float32 and np.isfinite(data).all() and np.abs(data).max() > 0
    runs = family["decompositions"]
    run = next(
        runs[name]
        for name in runs.group_keys()
        if runs[name].attrs["tvsplit"]["status"] == "complete"
    )
    bases = [run[p]["basis"] for p in run.group_keys() if "basis" in run[p].array_keys()]
    assert bases
    basis = bases[0][...]
    assert basis.ndim == 2 and np.isfinite(basis).all()
    # The columns of a basis are orthonormal.
    gram = basis.T @ basis
    assert np.allclose(gram, np.eye(gram.shape[0]), atol=1e-4)
    assert fs.exists(f"{BUCKET}/catalogue.zarr/zarr.json")


def test_edited_model_loads_with_transformers(pipeline):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pipeline["edited"])
    logits = model(torch.arange(8)[None]).logits
    assert bool(torch.isfinite(logits).all())


def test_every_server_listens_on_loopback_only(stack, pipeline):
    sockets = [s for server in stack.servers.values() for s in listening(server.tree())]
    assert sockets  # the check reads something
    assert not not_loopback(sockets), not_loopback(sockets)


# -- deployments on a process worker, and a served schedule ------------------------------------
def _prefect_client(stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = temporary_settings(updates={PREFECT_API_URL: stack.prefect_api})
    settings.__enter__()
    return get_client(sync_client=True), settings


def _wait_for_run(
    stack, client, run_id, watch: list[Server], timeout: float = 600
) -> tuple[str, list]:
    """Poll a flow run to a final state; meanwhile read the sockets of `watch` (a flow run
    on a worker is a child process: it and any cluster it starts are seen while it runs)."""
    deadline = time.monotonic() + timeout
    seen: list = []
    while True:
        run = client.read_flow_run(run_id)
        for server in watch:
            seen += listening(server.tree())
        if run.state is not None and run.state.is_final():
            return run.state.type.value, seen
        if time.monotonic() > deadline:
            return f"timeout in {run.state_name}", seen
        time.sleep(1.0)


def test_deployments_run_on_a_process_worker(stack, spec, pipeline):
    """`prefect deploy --all` registers deployments/prefect.yaml; a process worker set up as
    its header says (environment only, no checkout) runs every deployment to COMPLETED."""
    env = {**stack.env, "TVSPLIT_SPEC": str(spec), "TVSPLIT_SCHEDULER": stack.scheduler}
    prefect = executable("prefect")
    stack.run(prefect, "work-pool", "create", "tvsplit", "--type", "process")
    done = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all", "--prefect-file",
         str(REPO / "deployments" / "prefect.yaml")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    workdir = stack.root / "worker"
    workdir.mkdir()
    worker = start(
        "prefect-worker",
        [prefect, "worker", "start", "--pool", "tvsplit", "--type", "process"],
        ready=lambda: True, logs=stack.root / "logs", env=env, cwd=workdir,
    )  # fmt: skip
    stack.servers["prefect-worker"] = worker
    client, settings = _prefect_client(stack)
    outcomes, sockets = {}, []
    try:
        with client:
            names = {
                "tvsplit-decompose-on-cluster/decompose-family": {"family": FAMILY},
                "tvsplit-ingest-spec/ingest-catalogue": {},
                "tvsplit-sync/nightly-sync": {},
            }
            for name, parameters in names.items():
                deployment = client.read_deployment_by_name(name)
                if name.endswith("nightly-sync"):
                    assert deployment.schedules, "the nightly deployment has its cron schedule"
                run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
                outcomes[name], seen = _wait_for_run(stack, client, run.id, [worker])
                sockets += seen
    finally:
        settings.__exit__(None, None, None)
    assert outcomes == dict.fromkeys(outcomes, "COMPLETED"), (outcomes, worker.log_tail(60))
    assert not not_loopback(sockets), not_loopback(sockets)


def test_serve_registers_its_schedule_and_runs(stack, spec, pipeline):
    """`tvsplit serve SPEC --cron` registers a scheduled deployment with the server, runs a
    triggered run to COMPLETED, and the server's scheduler creates the scheduled runs."""
    serve = start(
        "tvsplit-serve",
        [executable("tvsplit"), "serve", str(spec), "--cron", "*/5 * * * *",
         "--name", "ci-sync", "--scheduler", stack.scheduler],
        ready=lambda: True, logs=stack.root / "logs", env=stack.env, cwd=stack.root,
    )  # fmt: skip
    stack.servers["tvsplit-serve"] = serve
    client, settings = _prefect_client(stack)
    try:
        with client:
            deployment = None
            deadline = time.monotonic() + 240
            while deployment is None:
                try:
                    deployment = client.read_deployment_by_name("tvsplit-sync/ci-sync")
                except Exception:
                    if time.monotonic() > deadline or serve.process.poll() is not None:
                        raise AssertionError(serve.log_tail(60)) from None
                    time.sleep(1.0)
            assert [s.schedule.cron for s in deployment.schedules] == ["*/5 * * * *"]
            run = client.create_flow_run_from_deployment(deployment.id)
            state, sockets = _wait_for_run(stack, client, run.id, [serve])
            assert state == "COMPLETED", serve.log_tail(60)
            assert not not_loopback(sockets), not_loopback(sockets)
            from prefect.client.schemas.filters import (
                DeploymentFilter,
                DeploymentFilterId,
                FlowRunFilter,
                FlowRunFilterState,
                FlowRunFilterStateType,
            )
            from prefect.client.schemas.objects import StateType

            scheduled = []
            deadline = time.monotonic() + 120
            while not scheduled and time.monotonic() < deadline:
                scheduled = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(
                            type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
                        )
                    ),
                )
                time.sleep(2.0)
            assert scheduled, "the server's scheduler created no run of the cron schedule"
    finally:
        settings.__exit__(None, None, None)
        serve.stop()


# -- a scheduler lost mid-run ------------------------------------------------------------------
def _own_cluster(stack, tag: str) -> str:
    """A Dask scheduler and one worker of this test's own (the stack's stay untouched);
    they join ``stack.servers``, so they are stopped by pid with the rest."""
    port = free_port()
    logs = stack.root / "logs"
    stack.servers[f"scheduler-{tag}"] = start(
        f"scheduler-{tag}",
        [executable("dask"), "scheduler", "--host", LOOPBACK, "--port", str(port),
         "--dashboard-address", f"{LOOPBACK}:0"],
        ready=lambda: port_open(port), logs=logs, env=stack.env,
    )  # fmt: skip
    address = f"tcp://{LOOPBACK}:{port}"
    stack.servers[f"worker-{tag}"] = start(
        f"worker-{tag}",
        [executable("dask"), "worker", address, "--host", LOOPBACK, "--nworkers", "1",
         "--nthreads", "1", "--name", f"worker-{tag}", "--dashboard-address", f"{LOOPBACK}:0"],
        ready=lambda: True, logs=logs, env={**stack.env, "OMP_NUM_THREADS": "1"}, cwd=stack.root,
    )  # fmt: skip
    _wait_for_workers(address, {f"worker-{tag}"})
    return address


def _stored_run(catalogue: Path, family: str) -> dict[str, bytes]:
    """Every array of the family's decomposition run, as bytes, by path."""
    import numpy as np
    import zarr

    runs = zarr.open_group(str(catalogue / "families" / family / "decompositions"), mode="r")
    (name, run), *others = list(runs.groups())
    assert not others, [n for n, _ in runs.groups()]
    return {
        f"{name}/{key}/{array_name}": np.ascontiguousarray(array[...]).tobytes()
        for key, group in run.groups()
        for array_name, array in group.arrays()
    }


def test_a_scheduler_lost_mid_run_ends_cleanly_and_a_rerun_finishes_it(stack):
    """SIGKILL of the scheduler while `tvsplit decompose --scheduler` runs: the command ends
    with one error line saying so (exit 1, no traceback), the flow run is FAILED in the
    Prefect server with that message, what was saved is intact and the run not complete;
    on a new scheduler the same command finishes it, keeping the saved parameters, and the
    result is bitwise the one of an uninterrupted run."""
    import signal

    from tvsplit.storage.catalogue import Catalogue
    from tvsplit.storage.decompositions import DecompositionRun, list_runs
    from tvsplit.storage.verify import verify_catalogue

    family = "lost"
    models = stack.root / "lost-models"
    base = save_model(tiny_gpt2(0, n_layer=4), models / "base")  # 52 parameters
    members = {f"ft{i}": finetuned_copy(base, models / f"ft{i}", seed=10 + i) for i in (1, 2, 3)}
    spec = stack.root / "lost.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"families": {family: {"base": str(base), "members": {m: str(p) for m, p in members.items()}}}}
        )
    )  # fmt: skip
    catalogue, clean = stack.root / "lost.zarr", stack.root / "lost-clean.zarr"
    # A client that lost its scheduler tries to reconnect for this long before it gives up.
    env = {**stack.env, "TVSPLIT_CATALOGUE": str(catalogue),
           "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "20s"}  # fmt: skip
    done = subprocess.run(
        [executable("tvsplit"), "ingest", str(spec), "--no-progress"],
        env=env, cwd=stack.root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(catalogue, clean)

    address = _own_cluster(stack, "doomed")
    command = [executable("tvsplit"), "decompose", family, "--no-track", "--scheduler"]
    split = subprocess.Popen(
        [*command, address], env=env, cwd=stack.root, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    cat = Catalogue(str(catalogue))
    deadline = time.monotonic() + 300
    while True:  # until a few parameters are saved, not all
        runs = [name for name, _ in list_runs(cat, family)] if split.poll() is None else []
        saved = DecompositionRun(cat, family, runs[0]).completed() if runs else set()
        if len(saved) >= 4 or split.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert split.poll() is None and 4 <= len(saved) < 52, (len(saved), split.poll())
    doomed = stack.servers["scheduler-doomed"]
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.process.wait(timeout=30)
    out, err = split.communicate(timeout=300)
    stack.servers["worker-doomed"].stop()  # it would keep trying to reach the dead scheduler

    assert split.returncode == 1, (out[-2000:], err[-3000:])
    assert "Traceback" not in err and "Traceback" not in out, err[-4000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: run ") and "the Dask scheduler was lost" in lines[-1], err
    assert [line for line in lines if "error" in line.lower()] == [lines[-1]], err
    (run_name, attrs), *_ = list_runs(cat, family)
    assert attrs.get("status") != "complete"
    kept = DecompositionRun(cat, family, run_name).completed()
    assert len(saved) <= len(kept) < 52  # the worker may finish its job after the loss
    assert all(row.status != "damaged" for row in verify_catalogue(cat))
    client, settings = _prefect_client(stack)
    try:
        with client:
            ended = [
                r
                for r in client.read_flow_runs()
                if r.state and "scheduler was lost" in (r.state.message or "")
            ]
    finally:
        settings.__exit__(None, None, None)
    assert [r.state_type.value for r in ended] == ["FAILED"], ended

    again = subprocess.run(
        [*command, _own_cluster(stack, "again")], env=env, cwd=stack.root,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{52 - len(kept)} parameter(s) split, {len(kept)} already done" in " ".join(
        again.stdout.split()
    ), again.stdout[-2000:]
    uninterrupted = subprocess.run(
        [executable("tvsplit"), "decompose", family, "--no-track", "--catalogue", str(clean)],
        env=env, cwd=stack.root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    resumed, reference = _stored_run(catalogue, family), _stored_run(clean, family)
    assert resumed.keys() == reference.keys() and len(resumed) > 52
    assert [k for k in resumed if resumed[k] != reference[k]] == []
