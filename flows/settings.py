"""One settings object, read in one place: CLI flags override the environment
(`TVSPLIT_*`), which overrides these defaults."""

from __future__ import annotations

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
