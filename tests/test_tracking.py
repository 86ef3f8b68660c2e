"""MLflow set-up (flows/tracking.py): prepared on a thread, used once, errors handed over."""

from __future__ import annotations

import threading

import pytest
from tvsplit.flows import tracking
from tvsplit.flows.settings import load_settings


def test_a_prepared_experiment_is_set_up_on_a_thread_and_handed_to_its_user(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = load_settings(data=tmp_path)
    threads: list[str] = []
    original = tracking._use_experiment

    def recording(name, settings):
        threads.append(threading.current_thread().name)
        return original(name, settings)

    monkeypatch.setattr(tracking, "_use_experiment", recording)
    tracking.prepare_experiment("tvsplit-test", settings)
    tracking.prepare_experiment("tvsplit-test", settings)  # once per name and store
    experiment = tracking.use_experiment("tvsplit-test", settings)
    assert threads == ["mlflow-tvsplit-test"]
    assert mlflow.get_experiment(experiment).name == "tvsplit-test"
    assert (tmp_path / "mlflow.db").is_file()
    assert tracking.use_experiment("tvsplit-test", settings) == experiment  # set up in place
    assert threads[-1] == threading.current_thread().name


def test_a_prepared_set_up_that_failed_is_redone_by_its_user(tmp_path, monkeypatch):
    """The error a command reports is its own: a set-up that failed on the thread (or in an
    earlier command) is redone in the caller's thread."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = load_settings(data=tmp_path)
    calls: list[str] = []

    def flaky(name, settings):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise RuntimeError("the tracking store is unreachable")
        raise ValueError("still unreachable, seen by the caller")

    monkeypatch.setattr(tracking, "_use_experiment", flaky)
    tracking.prepare_experiment("tvsplit-test", settings)
    with pytest.raises(ValueError, match="seen by the caller"):
        tracking.use_experiment("tvsplit-test", settings)
    assert calls == ["mlflow-tvsplit-test", threading.current_thread().name]
