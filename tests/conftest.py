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
# Flows in tests use the session's harness (or Prefect's temporary server), never a local
# server left running under the working directory; tests/test_prefect_server.py starts its own.
os.environ.setdefault("TVSPLIT_PREFECT", "ephemeral")

from pathlib import Path

import pytest

# Fake credentials set in the environment of tracked runs; none may ever reach a stored file.
FAKE_CREDENTIALS = {
    "HF_TOKEN": "hf_fakeTokenThatMustNeverBeStored1234",
    "HUGGING_FACE_HUB_TOKEN": "hf_fakeLegacyTokenNeverStored5678",
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYNEVERSTORED",
    "AWS_SECRET_ACCESS_KEY": "fakeAwsSecretThatMustNeverBeStored9012",
}


def files_holding_credentials(*roots: Path) -> list[str]:
    """Every file under ``roots`` (databases, artifacts, catalogue chunks, model folders)
    whose bytes contain one of FAKE_CREDENTIALS' values, as "path: VARIABLE"."""
    found = []
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {k}" for k, v in FAKE_CREDENTIALS.items() if v.encode() in data]
    return found


@pytest.fixture
def fake_credentials(monkeypatch):
    """FAKE_CREDENTIALS in the environment for one test; returns files_holding_credentials."""
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return files_holding_credentials


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (start-up costs seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# -- tiny model repositories (tests/fixtures_models.py), built once per session ---------------
@pytest.fixture(scope="session")
def repos(tmp_path_factory):
    """A tiny GPT-2 base, two fake fine-tunes, a sharded copy, and a classifier base."""
    from types import SimpleNamespace

    from fixtures_models import finetuned_copy, save_model, tiny_gpt2

    root = tmp_path_factory.mktemp("repos")
    base_model = tiny_gpt2(0)
    base = save_model(base_model, root / "base")
    classifier_model = tiny_gpt2(1, classifier=True)
    return SimpleNamespace(
        root=root,
        base_model=base_model,
        base=base,
        ft1=finetuned_copy(base, root / "ft1", seed=1),
        ft2=finetuned_copy(base, root / "ft2", seed=2),
        sharded=save_model(base_model, root / "sharded", max_shard_size="40KB"),
        classifier_model=classifier_model,
        classifier=save_model(classifier_model, root / "classifier"),
    )


@pytest.fixture(scope="session")
def vision_data_root(tmp_path_factory):
    """One data root for the vision tests: each preset's zoo is trained once and reused."""
    return tmp_path_factory.mktemp("vision-data")


# `make test` runs the vision tests on the tiny zoo (3 tasks, seconds of training, every row);
# the small zoo (≥ 6 tasks), whose training dominated the default run, is `slow`
# (`make test-slow`, run by .ci/run).
VISION_PRESETS = ["tiny", pytest.param("small", marks=pytest.mark.slow)]


@pytest.fixture(scope="session", params=VISION_PRESETS)
def vision_run(request, prefect_harness, vision_data_root, tmp_path_factory):
    """The vision suite at a preset through the generic suite flow, once per session and
    preset (zoo → ingest → decompose → every row → the chosen edit → MLflow → its section)."""
    from tvsplit.flows.suite import suite_flow

    out = tmp_path_factory.mktemp(f"vision-run-{request.param}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out}/mlflow.db")
        patch.setenv("TVSPLIT_ARTIFACTS", str(out / "artifacts"))
        run = suite_flow(
            "vision", preset=request.param, data_root=str(vision_data_root),
            catalogue_url=str(out / "catalogue.zarr"), results_path=str(out / "RESULTS.md"),
            show_progress=False,
        )  # fmt: skip
        yield run
