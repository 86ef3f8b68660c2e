"""CLI verbs `tvsplit decompose FAMILY`, `tvsplit edit RECIPE`: split a family on a Dask
cluster, write an edited model (`tvsplit serve` is in `sync_cli`).

This module builds its own typer app; `tvsplit.flows.cli` attaches it (no import of cli here).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from tvsplit.flows.console import err as _err
from tvsplit.flows.console import fail as _fail
from tvsplit.flows.console import out as _out
from tvsplit.flows.settings import load_settings, prefect_run_settings
from tvsplit.flows.settings_cli import settings_flags

app = typer.Typer()  # attached at the top level by tvsplit.flows.cli


def _split_flags() -> dict:
    """The flags of `tvsplit decompose`: SplitSettings' fields, then every registered
    estimator's parameters (declared once, in the models)."""
    from tvsplit.tasks.estimators import available_estimators, estimator_fields
    from tvsplit.tasks.split_settings import SplitSettings

    fields = {**SplitSettings.model_fields, **estimator_fields()}
    return {
        "fields": fields,
        "choices": {"method": available_estimators()},
    }


@app.command("decompose")
@settings_flags(**_split_flags())
def decompose_command(
    family: Annotated[str, typer.Argument(help="Family in the catalogue.")],
    members: Annotated[
        list[str] | None, typer.Option("--member", "-m", help="Members to split (default: all).")
    ] = None,
    scheduler: str | None = typer.Option(
        None, help="Dask scheduler address (default: a LocalCluster)."
    ),
    workers: int = typer.Option(2, help="LocalCluster workers (ignored with --scheduler)."),
    gpu: bool = typer.Option(False, help="Run jobs on workers offering a GPU resource."),
    catalogue: str | None = typer.Option(None, "--catalogue", help="Catalogue path or URL."),
    track: bool = typer.Option(True, help="Log the run to MLflow."),
    no_wait: bool = typer.Option(
        False,
        "--no-wait",
        help="When another process is splitting the same run, exit at once naming it "
        "(default: wait for it, then finish; its work is reused).",
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Print every parameter's diagnostic, not their summary."
    ),
    **split: Any,
) -> None:
    """Split every parameter of FAMILY into shared and unique parts (resumable). The split
    flags are SplitSettings' fields and the registered estimators' parameters."""
    from tvsplit.flows.checks import InputError, check_decompose

    try:  # before any engine starts: nothing is written on a bad input
        settings = check_decompose(
            family, members=members, split=split, workers=workers, scheduler=scheduler,
            catalogue_url=catalogue,
        )  # fmt: skip
    except InputError as error:
        _fail(str(error))
    from rich.markup import escape
    from tvsplit.flows.decompose import DecomposeError, run_decompose
    from tvsplit.flows.tracking import ui_hint
    from tvsplit.storage.errors import StorageError

    app_settings = load_settings(catalogue=catalogue)
    try:
        result = run_decompose(
            family, members=members, settings=settings, catalogue_url=app_settings.catalogue,
            scheduler=scheduler, workers=workers, gpu=gpu, track=track, wait=not no_wait,
            say=lambda message: _err.print(
                f"[yellow]waiting:[/] {message}", highlight=False, soft_wrap=True
            ),
        )  # fmt: skip
    except (DecomposeError, StorageError) as error:
        _fail(str(error))
    table = Table(title=f"{family}: run {result.run}")
    for column in ("parameter", "shape", "ranks", "k", "gap", "chance"):
        table.add_column(column, justify="left" if column == "parameter" else "right")
    table.add_column("shared energy per member (%)")
    for d in result.diagnostics:
        energy = " ".join(f"{100 * e:3.0f}" for e in d["shared_energy"])
        k = d["k"] if not isinstance(d["k"], list) else ",".join(map(str, d["k"]))
        gap = d["gap"] if not isinstance(d["gap"], list) else max(d["gap"])
        chance = d["chance"] if not isinstance(d["chance"], list) else max(d["chance"])
        table.add_row(
            d["name"], "×".join(map(str, d["param_shape"])), ",".join(map(str, d["ranks"])),
            str(k), f"{gap:.2f}", f"{chance:.2f}", energy,
        )  # fmt: skip
    _out.print(table)
    _out.print(
        f"{len(result.computed)} parameter(s) split, {len(result.skipped)} already done, "
        f"{result.bases_computed} member basis(es) computed; members: {', '.join(result.members)}"
    )
    for warning in result.warnings if verbose else [result.summary] if result.summary else []:
        _out.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if result.mlflow_run_id:
        _out.print(f"MLflow run {result.mlflow_run_id}: {ui_hint(app_settings)}")


def _list_methods(value: bool) -> None:
    """`tvsplit edit --methods`: every registered edit method with its parameters (imports
    the registry, and so torch, only when asked: `--help` stays light)."""
    if not value:
        return
    from tvsplit.tasks.edit import available_methods, get_method

    table = Table("method", "needs split", "params", "member params", "what it does")
    for name in available_methods():
        method = get_method(name)
        table.add_row(
            name,
            "yes" if method.needs_split else "no",
            ", ".join(method.params.model_fields) or "-",
            ", ".join(method.member_params.model_fields),
            method.summary,
        )
    _out.print(table)
    raise typer.Exit()


@app.command("edit")
def edit_command(
    recipe: Annotated[
        str,
        typer.Argument(
            help="Edit recipe YAML (base, family, method, members, ...); `--methods` lists "
            "the methods (task_arithmetic, ties, tsv_m, iso_c, iso_cts, ...)."
        ),
    ],
    methods: bool = typer.Option(
        False,
        "--methods",
        is_eager=True,
        callback=_list_methods,
        help="List the registered edit methods with their parameters, and exit.",
    ),
    out: str | None = typer.Option(
        None, "--out", help="Output model folder (default: the recipe's)."
    ),
    lora_rank: int | None = typer.Option(
        None, help="Also export the edit as a LoRA adapter of this rank."
    ),
    as_adapter: bool = typer.Option(
        False,
        "--as-adapter",
        help="Write the edit as one exact PEFT LoRA adapter instead of a model folder "
        "(LoRA families; rank ≤ Σ member ranks + k).",
    ),
    rank: int | None = typer.Option(
        None, "--rank", min=1, help="With --as-adapter: truncate each module to this rank."
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    allow_other_base: bool = typer.Option(
        False, "--allow-other-base", help="Edit a base other than the family's own."
    ),
    catalogue: str | None = typer.Option(None, "--catalogue", help="Catalogue path or URL."),
    track: bool = typer.Option(True, help="Log the recipe and lineage to MLflow."),
) -> None:
    """Build an edited model from RECIPE, tensor by tensor, into a loadable folder."""
    from tvsplit.flows.checks import InputError, check_edit

    try:  # before any engine starts: nothing is written on a bad input
        check_edit(
            recipe, output=out, overwrite=overwrite, catalogue_url=catalogue,
            allow_other_base=allow_other_base,
        )  # fmt: skip
    except InputError as error:
        _fail(str(error))
    from tvsplit.flows.edit import edit_model
    from tvsplit.flows.recipe import RecipeError
    from tvsplit.flows.tracking import ui_hint
    from tvsplit.storage.errors import StorageError
    from tvsplit.tasks.adapter_edit import AdapterEditError
    from tvsplit.tasks.edit import EditError
    from tvsplit.tasks.edit_job import EditPlanError
    from tvsplit.tasks.stages import stage

    try:
        with prefect_run_settings(), stage("flow"):
            result = edit_model(
                recipe,
                output=out,
                catalogue_url=catalogue,
                lora_rank=lora_rank,
                overwrite=overwrite,
                track=track,
                as_adapter=as_adapter,
                rank=rank,
                allow_other_base=allow_other_base,
            )
    except (
        RecipeError, EditPlanError, EditError, StorageError, AdapterEditError, InputError,
    ) as error:  # fmt: skip
        _fail(str(error))
    if result.adapter is not None:
        report = result.adapter
        routes = ", ".join(f"{n} {route}" for route, n in sorted(report.routes().items()))
        _out.print(
            f"wrote LoRA adapter {result.output}: {len(report.modules)} module(s) ({routes}), "
            f"total rank {report.total_rank}, max relative error {report.max_relative_error:.2e}"
        )
        return
    _out.print(
        f"wrote {result.output} ({len(result.files)} file(s)): {len(result.edited)} parameter(s) edited, "
        f"{len(result.copied)} tensor(s) copied"
    )
    if result.lora_targets is not None:
        _out.print(result.lora_targets.describe())
    if result.lora is not None:
        _out.print(f"LoRA adapter: {result.lora} (max relative error {result.lora_max_error:.2e})")
    if result.mlflow_run_id:
        _out.print(
            f"MLflow run {result.mlflow_run_id}: {ui_hint(load_settings(catalogue=catalogue))}"
        )
