"""The vision suite end to end through the pipeline: does merging with shared parts beat
the baselines on real images?

zoo (built or reused) → ingest (one family per fine-tuning seed, backbones only; heads live
beside the zoo) → decompose on a LocalCluster (one-sided and two-sided runs) → evaluate every
merge method with coefficients chosen on validation, the shared parts read back from the
decomposition runs → edit: the chosen shared-augmented merge written as a loadable model
folder → MLflow (a parent run with one nested run per method, the results table and a bar
chart) → RESULTS.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from rich.console import Console
from tvsplit.flows.decompose import run_decompose
from tvsplit.flows.edit import edit_model
from tvsplit.flows.ingest import ingest, parse_spec
from tvsplit.flows.settings import load_settings
from tvsplit.flows.tracking import ui_hint, use_experiment
from tvsplit.tasks.decompose_job import SplitSettings, stored_shared_parts
from tvsplit.tasks.suites.vision.benchmark import BenchmarkConfig, BenchmarkResult, run_benchmark
from tvsplit.tasks.suites.vision.merging import Family
from tvsplit.tasks.suites.vision.report import bar_chart, markdown_table, verdict, write_results
from tvsplit.tasks.suites.vision.zoo import Zoo, ZooConfig, build_zoo, default_zoo_dir

EXPORTED_METHOD = "shared_ta[one-sided]"


@dataclass
class VisionRun:
    """What the vision pipeline produced."""

    zoo: Zoo
    result: BenchmarkResult
    runs: dict[tuple[int, str], str] = field(default_factory=dict)
    model_dir: Path | None = None
    model_test: dict[str, float] = field(default_factory=dict)
    results_path: Path | None = None
    mlflow_run_id: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _variant(settings: SplitSettings) -> str:
    return "two-sided" if settings.two_sided else "one-sided"


def export_recipe(
    zoo: Zoo, result: BenchmarkResult, runs: dict[tuple[int, str], str], seed: int
) -> dict[str, Any]:
    """The edit recipe of the chosen one-sided shared-augmented merge of ``seed``."""
    record = result.record(EXPORTED_METHOD, seed)
    return {
        "base": str(zoo.base_dir),
        "family": zoo.family_name(seed),
        "decomposition": runs[(seed, "one-sided")],
        "method": "shared_augmented",
        "members": [{"name": task, "weight": 1.0} for task in zoo.tasks],
        "params": dict(record.params),
    }


@flow(name="tvsplit-vision-suite", log_prints=True)
def vision_suite(
    preset: str = "full",
    data_root: str | None = None,
    catalogue_url: str | None = None,
    workers: int = 2,
    track: bool = True,
    results_path: str | None = "RESULTS.md",
    show_progress: bool = True,
) -> VisionRun:
    """Run the whole suite; ``preset`` ``full`` (the demo, 3 seeds) or ``small`` (CI)."""
    console = Console(stderr=True, quiet=not show_progress)

    def say(message: str) -> None:
        console.log(message, markup=False, highlight=False)  # "[one-sided]" is not markup

    settings = load_settings(catalogue=catalogue_url)
    data_root = str(data_root or settings.data)
    zoo_config = ZooConfig.full() if preset == "full" else ZooConfig.small()
    bench_config = BenchmarkConfig() if preset == "full" else BenchmarkConfig.small()
    timings: dict[str, float] = {}

    started = time.perf_counter()
    zoo = build_zoo(default_zoo_dir(data_root, zoo_config), zoo_config, progress=say)
    timings["zoo_s"] = time.perf_counter() - started

    started = time.perf_counter()
    ingest(parse_spec(zoo.catalogue_spec()), settings.catalogue, progress=show_progress)
    timings["ingest_s"] = time.perf_counter() - started

    started = time.perf_counter()
    runs: dict[tuple[int, str], str] = {}
    for seed in zoo.seeds:
        for variant in bench_config.variants:
            decomposed = run_decompose(
                zoo.family_name(seed), settings=bench_config.split_settings(variant),
                catalogue_url=settings.catalogue, workers=workers, track=track, show_progress=show_progress,
            )  # fmt: skip
            runs[(seed, variant)] = decomposed.run
    timings["decompose_s"] = time.perf_counter() - started

    def pipeline_split(family: Family, split: SplitSettings, seed: int):
        run = runs[(seed, _variant(split))]
        return stored_shared_parts(settings.catalogue, zoo.family_name(seed), run, family.members)

    started = time.perf_counter()
    result = run_benchmark(zoo, bench_config, split=pipeline_split, progress=say)
    timings["evaluate_s"] = time.perf_counter() - started

    outcome = VisionRun(zoo=zoo, result=result, runs=runs, timings=timings)
    started = time.perf_counter()
    seed = zoo.seeds[0]
    work = Path(data_root) / "vision"
    work.mkdir(parents=True, exist_ok=True)
    recipe_path = work / f"recipe-seed{seed}.yaml"
    recipe_path.write_text(yaml.safe_dump(export_recipe(zoo, result, runs, seed), sort_keys=False))
    edited = edit_model(
        str(recipe_path), output=str(work / f"shared-ta-seed{seed}"), catalogue_url=settings.catalogue,
        overwrite=True, track=track, show_progress=show_progress,
    )  # fmt: skip
    outcome.model_dir = edited.output
    from tvsplit.tasks.suites.vision.evaluate import Evaluator
    from tvsplit.tasks.suites.vision.model import load_backbone

    evaluator = Evaluator(zoo.load_tasks(), zoo.heads(), load_backbone(zoo.base_dir).config)
    outcome.model_test = evaluator.evaluate(edited.output, "test")
    timings["edit_s"] = time.perf_counter() - started

    context = {
        "command": "make demo"
        if preset == "full"
        else f"tvsplit evaluate vision --preset {preset}",
        "zoo": f"{zoo_config.name} preset, {len(zoo.tasks)} tasks, seeds {list(zoo.seeds)}",
        "timings": ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        "decomposition runs": ", ".join(f"seed {s} {v}: {r}" for (s, v), r in runs.items()),
    }
    if results_path:
        outcome.results_path = write_results(result, results_path, context)
    if track:
        outcome.mlflow_run_id = _track(settings, result, outcome, work)
    return outcome


def _track(settings, result: BenchmarkResult, outcome: VisionRun, work: Path) -> str:
    """A parent MLflow run with one nested run per method, the table and a bar chart."""
    import mlflow

    use_experiment("tvsplit-vision", settings)
    rows = {row["method"]: row for row in result.table()}
    with mlflow.start_run(run_name="vision-suite") as parent:
        mlflow.log_params(
            {
                "tasks": ",".join(result.tasks),
                "seeds": ",".join(map(str, result.seeds)),
                "zoo": str(outcome.zoo.root),
                "split": json.dumps(result.settings.get("benchmark", {}).get("split", {})),
            }
        )
        for method, row in rows.items():
            with mlflow.start_run(run_name=method, nested=True):
                mlflow.log_param("chosen_params", json.dumps(row.get("params", [])))
                metrics = {"average": row["average"][0], "average_std": row["average"][1]}
                metrics |= {f"acc/{task}": row[task][0] for task in result.tasks}
                if "normalized" in row:
                    metrics["normalized"] = row["normalized"][0]
                if "delta_vs_ta" in row:
                    metrics["delta_vs_ta"] = row["delta_vs_ta"][0]
                mlflow.log_metrics(metrics)
        mlflow.log_text(markdown_table(result), "results_table.md")
        mlflow.log_dict(
            {"rows": result.table(), "alignment": result.alignment, "timings": outcome.timings},
            "results.json",
        )
        chart = bar_chart(result, work / "vision_results.png")
        mlflow.log_artifact(str(chart))
        if outcome.results_path:
            mlflow.log_artifact(str(outcome.results_path))
        judged = verdict(result)
        mlflow.log_text("\n".join([f"claim: {judged.outcome}", *judged.lines]), "verdict.txt")
        return parent.info.run_id


def print_summary(outcome: VisionRun, settings_catalogue: str | None = None) -> None:
    """The results table, the verdict and where to look."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(markdown_table(outcome.result), highlight=False, markup=False)
    judged = verdict(outcome.result)
    console.print(f"[bold]the +5-point claim: {judged.outcome}[/]")
    for line in judged.lines:
        console.print(f"  {line}", highlight=False, markup=False)
    if outcome.model_dir:
        average = sum(outcome.model_test.values()) / max(1, len(outcome.model_test))
        console.print(
            f"edited model ({EXPORTED_METHOD}, seed {outcome.zoo.seeds[0]}): {outcome.model_dir}"
            f" — test average {average:.1f}%",
            markup=False,
        )
    if outcome.results_path:
        console.print(f"results: {outcome.results_path}")
    console.print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in outcome.timings.items()))
    console.print(f"MLflow: {ui_hint(load_settings(catalogue=settings_catalogue))}")
