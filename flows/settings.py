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
    """Where tvsplit keeps its data and tracks its runs.

    ``data`` (``TVSPLIT_DATA``) is the data folder; the catalogue, the MLflow store, its
    artifacts and edited models default to places inside it unless set on their own."""

    model_config = SettingsConfigDict(env_prefix="TVSPLIT_", extra="ignore")

    data: Path = Field(
        default=DATA_DIR, description="Data folder: default home of everything below."
    )
    catalogue: str = Field(
        default="",
        description="Catalogue location: a local path or any fsspec URL (s3://bucket/cat.zarr); "
        "default <data>/catalogue.zarr.",
    )
    tracking_uri: str = Field(
        default="",
        description="MLflow tracking URI (default sqlite:///<data>/mlflow.db); "
        "MLFLOW_TRACKING_URI, when set, wins over the default.",
    )
    artifacts: str = Field(
        default="",
        description="Where MLflow artifacts go with the default local tracking store "
        "(default <data>/mlartifacts).",
    )
    prefect: Literal["local", "ephemeral"] = Field(
        default="local",
        description=(
            "How flows reach Prefect when PREFECT_API_URL is not set: a local server started on "
            "first use and reused (local), or Prefect's temporary server per command (ephemeral)."
        ),
    )
    prefect_home: str = Field(
        default="",
        description="The local Prefect server's home: its database, log, pid and port record "
        "(default <data>/prefect).",
    )
    models: Path = Field(
        default=Path(""), description="Default folder of edited models (default <data>/models)."
    )
    spec: str | None = Field(
        default=None,
        description="Catalogue spec the deployed sync and ingest read (a path on the worker).",
    )
    scheduler: str | None = Field(
        default=None,
        description="Dask scheduler the deployed flows use (default: a local cluster).",
    )

    def model_post_init(self, context: object, /) -> None:
        if not self.catalogue:
            self.catalogue = str(self.data / "catalogue.zarr")
        if not self.tracking_uri:
            self.tracking_uri = f"sqlite:///{self.data}/mlflow.db"
        if not self.artifacts:
            self.artifacts = str(self.data / "mlartifacts")
        if not self.prefect_home:
            self.prefect_home = str(self.data / "prefect")
        if self.models == Path(""):
            self.models = self.data / "models"


def missing_local_catalogue(url: str) -> bool:
    """True for a local catalogue path with nothing there: it holds no family, and saying so
    needs no zarr (the CLI's fixed cost, issue 20). URLs (``s3://``, ``file://``) are opened."""
    return "://" not in url and not Path(url).exists()


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
