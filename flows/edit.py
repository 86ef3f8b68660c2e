"""The edit flow: a recipe (YAML) → an edited model folder, streamed tensor by tensor.

Load and check the recipe against the catalogue → open the base (and, for excluded
parameters, a member's own weights) → stream every tensor through the recipe into a sharded
safetensors folder with the base's config, tokenizer files and a model card → optionally
export the edit as a PEFT LoRA adapter → record recipe and lineage in MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from tvsplit.flows.checks import check_base, check_output, lora_folder, output_target
from tvsplit.flows.console import err, progress_bars
from tvsplit.flows.recipe import Recipe, load_recipe
from tvsplit.flows.settings import load_settings
from tvsplit.flows.tracking import prepare_experiment, use_experiment
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.lease import Holder, Lease, folder_lease
from tvsplit.storage.model_folder import (
    FolderReplacement,
    ModelFolderWriter,
)
from tvsplit.storage.sources import open_source
from tvsplit.tasks.edit_job import (
    EditPlanError,
    edited_tensors,
    lineage,
    member_source,
    plan_edit,
    written_layout,
)
from tvsplit.tasks.lora_export import LoraExport
from tvsplit.tasks.lora_targets import LoraTargetError, LoraTargets, lora_targets
from tvsplit.tasks.stages import stage, timed


@dataclass
class EditResult:
    """What the edit flow wrote."""

    output: Path
    edited: list[str] = field(default_factory=list)
    copied: dict[str, str] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    lora: Path | None = None
    lora_max_error: float | None = None
    lora_targets: LoraTargets | None = None  # the export plan and the rule it used
    lora_skipped: dict[str, str] = field(default_factory=dict)  # edited, not exported: why
    adapter: Any = None  # tasks.adapter_edit_job.AdapterEditReport with --as-adapter
    sources: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None


def model_card(
    recipe: Recipe, sources: dict[str, Any], catalogue: str, lora: LoraTargets | None = None
) -> str:
    """README.md for the output: the recipe, the sources with commits, the decomposition
    run, and with a LoRA export the rule that chose its targets."""
    recipe_yaml = yaml.safe_dump(recipe.model_dump(exclude_none=True), sort_keys=False)
    lines = [
        "---",
        "library_name: transformers",
        "tags: [tvsplit, model-editing, task-arithmetic]",
        "---",
        f"# {recipe.family}: {recipe.method}",
        "",
        f"Made by tvsplit with method `{recipe.method}` on family `{recipe.family}` "
        f"(catalogue `{catalogue}`)"
        + (f", decomposition run `{recipe.decomposition}`." if recipe.decomposition else "."),
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
        "## Sources",
        "",
        "| role | source | commit |",
        "| --- | --- | --- |",
    ]
    for role, info in sources.items():
        lines.append(f"| {role} | {info.get('source') or ''} | {info.get('commit') or ''} |")
    if lora is not None:
        lines += ["", "## LoRA export", "", lora.describe() + "."]
    return "\n".join(lines) + "\n"


@task(name="write-edited-model")
def write_edited_model(
    recipe: Recipe,
    catalogue_url: str,
    output: Path,
    lora_rank: int | None,
    show_progress: bool,
    overwrite: bool = False,
) -> EditResult:
    """Stream the edited model into ``output``, and its LoRA export into ``<output>-lora``.

    Both folders are built beside their targets and put in place together by one
    ``FolderReplacement`` only when both are complete; an existing ``<output>-lora`` that
    this edit does not replace is removed in the same step (an old adapter never sits beside
    a new model). A failed or killed edit leaves the previous folders as they were."""
    catalogue = Catalogue(catalogue_url)
    edit = recipe.edit_method
    plan = plan_edit(
        catalogue, recipe.family, recipe.method, recipe.member_names, recipe.method_params,
        recipe.member_params, recipe.decomposition, edit.needs_split,
    )  # fmt: skip
    base = open_source(recipe.base)
    if base.checkpoint is None:
        raise EditPlanError(f"base: {recipe.base!r} is not a full model (a {base.kind})")
    fallback = None
    if recipe.excluded_from != "base":
        fallback = open_source(
            member_source(catalogue, recipe.family, recipe.excluded_from)
        ).checkpoint
    result = EditResult(output=output, sources=lineage(catalogue, plan))
    if lora_rank:
        result.lora_targets = _lora_plan(recipe, base, plan.family_parameters)
    card = model_card(recipe, result.sources, catalogue_url, result.lora_targets)
    export = LoraExport(lora_rank) if lora_rank else None
    adapter = lora_folder(output)
    replacement = FolderReplacement(overwrite=overwrite)
    with (
        replacement,
        progress_bars(show_progress) as progress,
        ModelFolderWriter(
            output, copy_from=base.location if base.location.is_dir() else None, model_card=card,
            replacement=replacement, plan=written_layout(plan, base.checkpoint, fallback),
        ) as writer,
    ):  # fmt: skip
        job = progress.add_task(f"editing {recipe.family}", total=len(base.checkpoint))
        targets = result.lora_targets.targets if result.lora_targets else {}
        for name, tensor, how in edited_tensors(plan, base.checkpoint, fallback):
            writer.add(name, tensor)
            if how == "edited":
                result.edited.append(name)
                if export is not None and name in targets:
                    module, kind = targets[name]
                    export.add_edit(module, tensor, base.checkpoint[name], kind)
                elif result.lora_targets is not None:
                    result.lora_skipped[name] = result.lora_targets.skipped.get(name, "")
            else:
                result.copied[name] = how
            progress.advance(job)
        with stage("writing"):
            writer.close()
        if export is not None and export.ranks:
            report = export.write(
                adapter, base_model_name_or_path=recipe.base, replacement=replacement
            )
            result.lora, result.lora_max_error = adapter, report.max_relative_error
        elif adapter.exists():
            replacement.remove(adapter)
    assert writer.summary is not None
    result.files = writer.summary.files
    return result


@task(name="write-edit-adapter")
def write_edit_adapter_task(
    recipe: Recipe, catalogue_url: str, output: Path, rank: int | None, overwrite: bool = False
) -> EditResult:
    """The edit as one PEFT LoRA adapter at ``output`` (no dense model is written; an
    existing folder is replaced only once the new one is complete)."""
    from tvsplit.tasks.adapter_edit_job import write_edit_adapter

    catalogue = Catalogue(catalogue_url)
    plan = plan_edit(
        catalogue, recipe.family, recipe.method, recipe.member_names, recipe.method_params,
        recipe.member_params, recipe.decomposition, recipe.edit_method.needs_split,
    )  # fmt: skip
    local = Path(recipe.base)
    report = write_edit_adapter(
        plan, output, rank=rank, base_model_name_or_path=recipe.base, overwrite=overwrite,
        base_folder=local if local.is_dir() else None,
    )  # fmt: skip
    result = EditResult(output=output, sources=lineage(catalogue, plan), adapter=report)
    result.edited = list(report.modules)
    result.files = ("adapter_config.json", "adapter_model.safetensors")
    result.lora, result.lora_max_error = output, report.max_relative_error
    return result


def _lora_plan(recipe: Recipe, base: Any, edited: frozenset[str]) -> LoraTargets:
    """The LoRA export plan over the base's edited weights (tasks.lora_targets decides)."""
    weights = [
        (name, base.checkpoint.header(name)[0]) for name in base.checkpoint if name in edited
    ]
    try:
        return lora_targets(
            base.location, weights, patterns=recipe.lora_targets,
            fan_in_fan_out=recipe.fan_in_fan_out,
        )  # fmt: skip
    except LoraTargetError as error:
        raise EditPlanError(f"recipe {error}") from None


def claim_output(target: Path) -> Lease:
    """Take the lease of an edit's output folder (`storage.lease.folder_lease`): while
    another live process writes it, wait, saying once who that is."""
    lease = folder_lease(target)

    def waiting(holder: Holder | None) -> None:
        err.print(
            f"[yellow]waiting:[/] {lease.busy_message(holder)}; waiting for it to finish",
            highlight=False,
            soft_wrap=True,
        )

    return lease.acquire(on_wait=waiting)


@flow(name="tvsplit-edit", log_prints=True)
@timed("flow body")
def edit_model(
    recipe_path: str,
    output: str | None = None,
    catalogue_url: str | None = None,
    lora_rank: int | None = None,
    overwrite: bool = False,
    track: bool = True,
    show_progress: bool = True,
    as_adapter: bool = False,
    rank: int | None = None,
    allow_other_base: bool = False,
) -> EditResult:
    """Apply the recipe at ``recipe_path`` and write the edited model folder, or with
    ``as_adapter`` one PEFT LoRA adapter (exact; ``rank`` truncates, error reported).
    A ``base`` other than the family's is refused unless ``allow_other_base``."""
    recipe = load_recipe(recipe_path)
    settings = load_settings(catalogue=catalogue_url)
    target = output_target(recipe, output, settings)
    check_output(target, overwrite=overwrite)
    check_base(
        Catalogue(settings.catalogue), recipe, allow_other_base=allow_other_base,
        source=str(recipe_path),
    )  # fmt: skip
    if track:
        prepare_experiment("tvsplit-edit", settings)  # MLflow's start-up beside the edit
    lease = claim_output(target)  # one writer per output folder at a time
    try:
        check_output(target, overwrite=overwrite)  # again: it may have appeared meanwhile
        if as_adapter:
            result = write_edit_adapter_task(recipe, settings.catalogue, target, rank, overwrite)
        else:
            result = write_edited_model(
                recipe, settings.catalogue, target, lora_rank, show_progress, overwrite
            )
    finally:
        lease.release()
    if track:
        with stage("tracking"):
            _track_edit(recipe, settings, target, result)
    return result


def _track_edit(recipe: Recipe, settings: Any, target: Path, result: EditResult) -> None:
    """Record the recipe, its lineage and what was written in one MLflow run."""
    import mlflow

    use_experiment("tvsplit-edit", settings)
    with mlflow.start_run(run_name=f"{recipe.family}/{recipe.method}") as active:
        mlflow.log_params(
            {
                "method": recipe.method,
                "family": recipe.family,
                "decomposition": recipe.decomposition or "",
                "members": ",".join(recipe.member_names),
                "base": recipe.base,
                "output": str(target.resolve()),
                **{f"params.{k}": v for k, v in recipe.params.items()},
            }
        )
        mlflow.log_dict(recipe.model_dump(exclude_none=True), "recipe.json")
        mlflow.log_dict(
            {
                "sources": result.sources,
                "catalogue": settings.catalogue,
                "output": str(target.resolve()),
            },
            "lineage.json",
        )
        mlflow.log_metrics(
            {"edited_parameters": len(result.edited), "copied_tensors": len(result.copied)}
        )
        if result.lora_max_error is not None:
            mlflow.log_metric("lora_max_relative_error", result.lora_max_error)
        if (target / "README.md").is_file():
            mlflow.log_artifact(str(target / "README.md"))
        result.mlflow_run_id = active.info.run_id
