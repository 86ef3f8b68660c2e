"""One settings object, read in one place: CLI flags override the environment
(`TVSPLIT_*`), which overrides these defaults."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DATA_DIR = Path("tvsplit-data")


class Settings(BaseSettings):
    """Where tvsplit keeps its data and tracks its runs."""

    model_config = SettingsConfigDict(env_prefix="TVSPLIT_", extra="ignore")

    catalogue: str = Field(
        default=str(DATA_DIR / "catalogue.zarr"),
        description="Catalogue location: a local path or any fsspec URL (s3://bucket/cat.zarr).",
    )
    tracking_uri: str = Field(
        default=f"sqlite:///{DATA_DIR}/mlflow.db",
        description="MLflow tracking URI; MLFLOW_TRACKING_URI, when set, wins over the default.",
    )
    artifacts: str = Field(
        default=str(DATA_DIR / "mlartifacts"),
        description="Where MLflow artifacts go with the default local tracking store.",
    )


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with non-None keyword overrides (CLI flags) on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@contextmanager
def prefect_run_settings() -> Iterator[None]:
    """Prefect settings for flows run from this process.

    With the ephemeral API (no ``PREFECT_API_URL``) flow-run heartbeats are switched off:
    they let a server spot crashed runs of deployments, no server outlives this process to
    do that, and their thread adds up to 1 s to the end of every flow run (it sleeps in 1 s
    steps and is joined on exit; PrefectHQ/prefect#19641). Against a real server nothing
    changes."""
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    if get_current_settings().api.url is not None:
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
