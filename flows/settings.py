"""One settings object, read in one place: CLI flags override the environment
(`TVSPLIT_*`), which overrides these defaults."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

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
    prefect: Literal["local", "ephemeral"] = Field(
        default="local",
        description=(
            "How flows reach Prefect when PREFECT_API_URL is not set: a local server started on "
            "first use and reused (local), or Prefect's temporary server per command (ephemeral)."
        ),
    )
    prefect_home: str = Field(
        default=str(DATA_DIR / "prefect"),
        description="The local Prefect server's home: its database, log, pid and port record.",
    )


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with non-None keyword overrides (CLI flags) on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@contextmanager
def prefect_run_settings() -> Iterator[str | None]:
    """Run the block's flows against the Prefect API chosen in `flows.prefect_server`
    (``PREFECT_API_URL``, else the data folder's local server started on first use, else with
    ``TVSPLIT_PREFECT=ephemeral`` Prefect's temporary server); yields the API URL."""
    from tvsplit.flows.prefect_server import use_prefect

    settings = load_settings()
    with use_prefect(settings.prefect, settings.prefect_home) as url:
        yield url
