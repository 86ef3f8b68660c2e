"""Shared test set-up: everything offline, telemetry off, no writes outside tmp dirs."""

from __future__ import annotations

import os

# Read at import time by huggingface_hub, prefect and mlflow: set before anything imports them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (start-up costs seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
