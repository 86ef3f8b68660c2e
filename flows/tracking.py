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

_prepared: dict[tuple[str, str, str], Future[str]] = {}
_lock = threading.Lock()


def tracking_uri(settings: Settings) -> str:
    """The tracking URI in force: the environment's MLFLOW_TRACKING_URI, else the settings'."""
    return os.environ.get("MLFLOW_TRACKING_URI") or settings.tracking_uri


def _key(name: str, settings: Settings) -> tuple[str, str, str]:
    return name, tracking_uri(settings), str(Path(settings.artifacts).resolve())


def prepare_experiment(name: str, settings: Settings) -> None:
    """Start ``use_experiment(name, settings)`` on a background thread: importing MLflow
    and opening its store take seconds, which then overlap the command's own work (reading,
    computing and writing release the GIL). The next ``use_experiment`` with the same name,
    store and artifacts takes it over. A daemon thread: a command that fails meanwhile exits
    without waiting for it."""
    key = _key(name, settings)
    with _lock:
        if key in _prepared:
            return
        future: Future[str] = Future()
        _prepared[key] = future

    def run() -> None:
        try:
            future.set_result(_use_experiment(name, settings))
        except BaseException as error:  # use_experiment redoes the set-up in its own thread
            future.set_exception(error)

    threading.Thread(target=run, name=f"mlflow-{name}", daemon=True).start()


def use_experiment(name: str, settings: Settings) -> str:
    """Point MLflow at the tracking store and experiment ``name`` (created on first use with
    its artifacts beside a local sqlite store); returns the experiment id. A prepared set-up
    is waited for, then its store and experiment are made current again in this thread
    (another experiment may have been set meanwhile); one that failed, or was prepared by an
    earlier command, is redone here so the error raised is this command's."""
    with _lock:
        future = _prepared.pop(_key(name, settings), None)
    if future is not None:
        try:
            experiment_id = future.result()
        except Exception:
            return _use_experiment(name, settings)
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(settings))
        mlflow.set_experiment(experiment_id=experiment_id)
        return experiment_id
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
