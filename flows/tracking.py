"""MLflow tracking set-up shared by the flows: one place decides where runs and artifacts go.

Default: ``sqlite:///tvsplit-data/mlflow.db`` with artifacts in ``tvsplit-data/mlartifacts``
(MLflow would otherwise scatter ``./mlruns`` in the working directory). ``MLFLOW_TRACKING_URI``
or ``--tracking-uri`` point at a server instead.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from pathlib import Path

from tvsplit.flows.settings import Settings

_prepared: dict[tuple[str, str], Future[str]] = {}


def tracking_uri(settings: Settings) -> str:
    """The tracking URI in force: the environment's MLFLOW_TRACKING_URI, else the settings'."""
    return os.environ.get("MLFLOW_TRACKING_URI") or settings.tracking_uri


def prepare_experiment(name: str, settings: Settings) -> None:
    """Start ``use_experiment(name, settings)`` on a background thread: importing MLflow
    and opening its store take seconds, which then overlap the command's own work (reading,
    computing and writing release the GIL). The next ``use_experiment`` with the same name
    and store waits for it and raises what it raised. Call it once the inputs are checked:
    a command that fails later waits for the thread before it exits."""
    key = (name, tracking_uri(settings))
    if key in _prepared:
        return
    future: Future[str] = Future()

    def run() -> None:
        try:
            future.set_result(_use_experiment(name, settings))
        except BaseException as error:  # handed to the caller of use_experiment
            future.set_exception(error)

    _prepared[key] = future
    threading.Thread(target=run, name=f"mlflow-{name}").start()


def use_experiment(name: str, settings: Settings) -> str:
    """Point MLflow at the tracking store and experiment ``name`` (created on first use with
    its artifacts beside a local sqlite store); returns the experiment id."""
    future = _prepared.pop((name, tracking_uri(settings)), None)
    if future is not None:
        return future.result()
    return _use_experiment(name, settings)


def _use_experiment(name: str, settings: Settings) -> str:
    import mlflow

    uri = tracking_uri(settings)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        mlflow.set_experiment(name)
        return experiment.experiment_id
    location = None
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        location = Path(settings.artifacts).resolve().as_uri()
    experiment_id = mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def ui_hint(settings: Settings) -> str:
    """The command that shows the tracked runs."""
    return f"mlflow ui --backend-store-uri {tracking_uri(settings)}"
