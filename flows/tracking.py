"""MLflow tracking set-up shared by the flows: one place decides where runs and artifacts go.

Default: ``sqlite:///tvsplit-data/mlflow.db`` with artifacts in ``tvsplit-data/mlartifacts``
(MLflow would otherwise scatter ``./mlruns`` in the working directory). ``MLFLOW_TRACKING_URI``
or ``--tracking-uri`` point at a server instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from tvsplit.flows.settings import Settings


def tracking_uri(settings: Settings) -> str:
    """The tracking URI in force: the environment's MLFLOW_TRACKING_URI, else the settings'."""
    return os.environ.get("MLFLOW_TRACKING_URI") or settings.tracking_uri


def use_experiment(name: str, settings: Settings) -> str:
    """Point MLflow at the tracking store and experiment ``name`` (created on first use with
    its artifacts beside a local sqlite store); returns the experiment id."""
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
