"""The one generic suite flow: any registered suite (``tasks.suites.registry``), end to end.

build or reuse the suite's family or families (``Suite.build``) → ingest its catalogue
spec → decompose each family once per split variant its methods read → every row's
coefficients chosen on validation and the chosen candidate scored on test
(``tasks.suites.runner``) → the suite's chosen edit written with the edit flow (and
scored) → MLflow: one parent run, one nested run per row → the suite's own section of
RESULTS.md (other suites' sections are kept byte for byte).

A rerun reuses everything already done: the suite's build, complete catalogue entries and
finished decomposition runs. The flow composes; the math is in ``tasks``.
"""

# No `from __future__ import annotations`: Prefect builds the flow's parameter model from
# these annotations (see flows/schedule.py).

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from prefect import flow
from tvsplit.flows.console import Story
from tvsplit.flows.decompose import run_decompose
from tvsplit.flows.edit import edit_model
from tvsplit.flows.ingest import ingest, parse_spec
from tvsplit.flows.settings import Settings, load_settings
from tvsplit.flows.tracking import use_experiment
from tvsplit.tasks.suites.base import ModelPool, Suite, SuiteResult, mean_std
from tvsplit.tasks.suites.registry import get_suite
from tvsplit.tasks.suites.results import replace_section
from tvsplit.tasks.suites.runner import evaluate_pool, export_recipe, restrict_pool, variants_used


@dataclass
class SuiteRun:
    """What one run of a suite produced."""

    suite: Suite
    pool: ModelPool
    result: SuiteResult
    runs: dict[tuple[str, str], str] = field(default_factory=dict)
    """(family name, split variant) → decomposition run id."""
    model_dir: Path | None = None
    model_test: dict[str, float] = field(default_factory=dict)
    results_path: Path | None = None
    mlflow_run_id: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _folder_name(row: str, label: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in row).strip("-")
    return f"{safe}-{label}"


def write_section(path: str | Path, suite: str, body: str) -> Path:
    """Set ``suite``'s section of the markdown file at ``path`` (atomically: a reader sees
    the old file or the new one)."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    text = replace_section(old, suite, body)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.replace(temporary, path)
    return path


@flow(name="tvsplit-suite", log_prints=True)
def suite_flow(
    suite: str,
    preset: str = "full",
    data_root: str | None = None,
    catalogue_url: str | None = None,
    families: list[str] | None = None,
    workers: int = 2,
    scheduler: str | None = None,
    track: bool = True,
    results_path: str | None = "RESULTS.md",
    export: bool = True,
    show_progress: bool = True,
    command: str | None = None,
    verbose: bool = False,
) -> SuiteRun:
    """Run suite ``suite`` at ``preset`` (``families``: only these of its pool, by catalogue
    name or label). ``results_path`` None writes no RESULTS.md; ``export`` False writes no
    edited model. Tells its story on stderr (`flows.console.Story`): one line per stage and
    per decomposition run; with ``verbose`` every step and every per-parameter diagnostic."""
    story = Story(verbose=verbose, enabled=show_progress)
    settings = load_settings(catalogue=catalogue_url)
    instance = get_suite(suite).from_preset(preset, data_root or settings.data)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    with story.stage("build", live=True) as stage:
        pool = restrict_pool(instance.build(stage.step), families)
        members = sum(len(f.members) for f in pool.families)
        stage.done(f"{len(pool.families)} famil{'y' if len(pool.families) == 1 else 'ies'}, "
                   f"{members} fine-tuned members, in {instance.work_dir}")  # fmt: skip
    timings["build_s"] = time.perf_counter() - started

    started = time.perf_counter()
    with story.stage("ingest") as stage:
        ingest(parse_spec(pool.spec), settings.catalogue, progress=show_progress)
        stage.done(f"catalogue {settings.catalogue}")
    timings["ingest_s"] = time.perf_counter() - started

    started = time.perf_counter()
    runs: dict[tuple[str, str], str] = {}
    with story.stage("decompose") as stage:
        for variant, split in variants_used(instance, instance.methods(pool)).items():
            for family in pool.families:
                decomposed = run_decompose(
                    family.name, members=list(family.members), settings=split,
                    catalogue_url=settings.catalogue, scheduler=scheduler, workers=workers,
                    track=track, show_progress=show_progress, say=story.say,
                )  # fmt: skip
                runs[(family.name, variant)] = decomposed.run
                where = f"  {family.label} ({variant}), run {decomposed.run}"
                for line in decomposed.warnings if verbose else [decomposed.summary or "ok"]:
                    story.say(f"{where}: {line}")
        stage.done(f"{len(runs)} decomposition runs")
    timings["decompose_s"] = time.perf_counter() - started

    started = time.perf_counter()
    with story.stage("evaluate", live=True) as stage:
        evaluation = instance.evaluation(pool)
        result = evaluate_pool(instance, pool, settings.catalogue, runs, evaluation, stage.step)
        stage.done(f"{len(result.rows)} methods on {len(result.families)} families")
    timings["evaluate_s"] = time.perf_counter() - started

    outcome = SuiteRun(instance, pool, result, runs, timings=timings)
    chosen = instance.export() if export else None
    if chosen is not None:
        started = time.perf_counter()
        with story.stage("edit") as stage:
            family = pool.families[chosen.family]
            work = instance.work_dir
            work.mkdir(parents=True, exist_ok=True)
            recipe_path = work / f"recipe-{_folder_name(chosen.row, family.label)}.yaml"
            recipe = export_recipe(instance, pool, result, chosen)
            recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
            edited = edit_model(
                str(recipe_path), output=str(work / (chosen.folder or _folder_name(chosen.row, family.label))),
                catalogue_url=settings.catalogue, overwrite=True, track=track,
                show_progress=show_progress,
            )  # fmt: skip
            outcome.model_dir = Path(edited.output)
            outcome.model_test = evaluation.evaluate(outcome.model_dir, "test")
            result.exported = {
                "row": chosen.row, "family": family.label, "folder": str(outcome.model_dir),
                "test": outcome.model_test,
            }  # fmt: skip
            stage.done(f"{chosen.row} on {family.label}: {outcome.model_dir}")
        timings["edit_s"] = time.perf_counter() - started
    result.timings = dict(timings)

    context = {
        "command": command or f"tvsplit evaluate {suite} --preset {preset}",
        **{key: value for key, value in pool.notes.items() if not key.endswith("_fingerprint")},
        "timings": ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        "decomposition runs": ", ".join(f"{key}: {run}" for key, run in result.runs.items())
        or "none",
    }
    section = instance.report(result, context)
    if results_path:
        outcome.results_path = write_section(results_path, instance.name, section)
        if instance.figures_beside_results:
            instance.artifacts(result, outcome.results_path.parent)
    if track:
        outcome.mlflow_run_id = _track(settings, instance, outcome, section)
    return outcome


def _track(settings: Settings, suite: Suite, outcome: SuiteRun, section: str) -> str:
    """A parent MLflow run with one nested run per row: chosen parameters per family,
    the score (mean ± std over families), each metric's mean and the suite's extras; the
    section, the results as JSON and the suite's figures as artifacts."""
    import mlflow

    result = outcome.result
    use_experiment(f"tvsplit-{suite.name}", settings)
    with mlflow.start_run(run_name=f"{suite.name}-suite") as parent:
        mlflow.log_params(
            {
                "suite": suite.name,
                "preset": suite.preset,
                "families": ",".join(result.families),
                "settings": json.dumps(result.settings, sort_keys=True)[:6000],
            }
        )
        for row in result.rows:
            with mlflow.start_run(run_name=row, nested=True):
                records = [result.record(row, f) for f in result.families]
                mlflow.log_param("chosen_params", json.dumps([r.params for r in records]))
                mean, std = mean_std(result.scores(row))
                metrics = {"score": mean, "score_std": std}
                metrics |= {
                    f"test/{m}": result.metric_summary(row, m)[0]
                    for m in result.metrics
                    if all(m in r.test for r in records)  # `individual` may own a subset
                }
                metrics["val_score"] = mean_std(result.scores(row, "val"))[0]
                metrics |= suite.row_metrics(result, row)
                mlflow.log_metrics(metrics)
        mlflow.log_text(result.markdown_table(), "results_table.md")
        mlflow.log_text(section, "RESULTS.md")
        mlflow.log_dict(
            {
                "records": [r.__dict__ for r in result.records],
                "diagnostics": result.diagnostics,
                "runs": result.runs,
                "exported": result.exported,
                "timings": outcome.timings,
            },
            "results.json",
        )
        with tempfile.TemporaryDirectory() as folder:
            for path in suite.artifacts(result, Path(folder)):
                mlflow.log_artifact(str(path))
        return parent.info.run_id
