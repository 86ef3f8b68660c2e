"""The `tvsplit` command line: one typer app; each flow module adds its verbs."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="tvsplit",
    help="Split task vectors into shared and unique parts, and edit models with them.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main() -> None:
    """tvsplit: shared and unique parts of task vectors, on Prefect, Dask, Zarr and MLflow."""


@app.command()
def demo(
    size: int = typer.Option(256, help="Rows and columns of each planted parameter."),
    members: int = typer.Option(8, help="Number of task vectors in the synthetic family."),
    noise: float = typer.Option(0.1, help="Noise level σ (spectral norm of the noise ≈ 2σ)."),
    seed: int = typer.Option(0, help="Seed of the synthetic family."),
) -> None:
    """Split a synthetic family with planted shared and unique structure and show the result."""
    from flows.demo import run_demo

    run_demo(size=size, members=members, noise=noise, seed=seed)


import flows.catalogue_cli  # noqa: E402  (registers `ingest` and `catalogue ...`)
import flows.decompose_cli  # noqa: E402, F401  (registers `decompose`)
