"""The vision benchmark: every merge method on every zoo seed, coefficients chosen on the
validation split, accuracies reported on the test split.

Methods (rows of the table):

- ``base`` (θ0 with each task's head), ``individual`` (each task's own fine-tuned model);
- ``weight_average`` (θ0 + mean τ_i), ``task_arithmetic`` (θ0 + λ Σ τ_i), ``ties``;
- ``shared_ta[<split>]`` / ``shared_ties[<split>]``: the shared-augmented merges of
  ``tasks.edit`` (shared parts as T extra task vectors with weight γ) for each split
  variant (``one-sided``, ``two-sided``);
- the subspace baselines ``tsv_m``, ``iso_c``, ``iso_cts`` (registered edit methods,
  ``tasks.merges``).

Selection: for each method and seed the coefficients with the best mean validation
accuracy over tasks win (first in grid order on ties); the test split is read only for
the winner. The table gives mean ± std over seeds, normalized accuracy (merged /
individual, per seed and task) and the paired difference against task arithmetic.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from tvsplit.tasks.decompose_job import SplitSettings
from tvsplit.tasks.suites.vision.data import TaskData
from tvsplit.tasks.suites.vision.evaluate import Evaluator, average
from tvsplit.tasks.suites.vision.merging import (
    Family,
    State,
    edit_state,
    load_family,
    scaled_state,
    shared_alignment,
    split_family,
    subspace_delta,
)
from tvsplit.tasks.suites.vision.model import load_backbone
from tvsplit.tasks.suites.vision.zoo import Zoo

log = logging.getLogger(__name__)

SHARED_METHODS = ("shared_ta", "shared_ties")
REFERENCE = "task_arithmetic"
EDIT_METHODS = {  # suite method → registered ``tasks.edit`` method
    "weight_average": "task_arithmetic",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "shared_ta": "shared_augmented",
    "shared_ties": "shared_augmented",
}


class BenchmarkConfig(BaseModel):
    """Coefficient grids and the split variants the benchmark runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scales: tuple[float, ...] = Field(
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0), description="λ for task arithmetic."
    )
    ties_scales: tuple[float, ...] = (0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)
    ties_density: float = Field(0.2, gt=0, le=1)
    shared_weights: tuple[float, ...] = Field(
        (0.5, 1.0), description="γ, the weight of each member's shared part (extra vector)."
    )
    subspace_scales: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)
    split: SplitSettings = Field(
        SplitSettings(min_tasks=2),
        description="Decomposition settings; `two_sided` is set per variant.",
    )
    variants: tuple[str, ...] = ("one-sided", "two-sided")
    subspace_methods: tuple[str, ...] = ("tsv_m", "iso_c", "iso_cts")

    @classmethod
    def small(cls, **changes: Any) -> BenchmarkConfig:
        """Coarse grids for CI."""
        values: dict[str, Any] = {
            "scales": (0.2, 0.4, 0.7, 1.0),
            "ties_scales": (0.6, 1.0, 1.5),
            "shared_weights": (1.0,),
            "subspace_scales": (0.5, 1.0, 1.5),
        }
        return cls(**{**values, **changes})

    def split_settings(self, variant: str) -> SplitSettings:
        if variant not in ("one-sided", "two-sided"):
            raise ValueError(f"split variant must be 'one-sided' or 'two-sided', not {variant!r}")
        return self.split.model_copy(update={"two_sided": variant == "two-sided"})


@dataclass(frozen=True)
class MethodResult:
    """One method on one seed: the chosen coefficients and the accuracies (%)."""

    method: str
    seed: int
    params: dict[str, Any]
    val_average: float
    test: dict[str, float]
    candidates: int

    @property
    def test_average(self) -> float:
        return average(self.test)


@dataclass
class BenchmarkResult:
    """Every method's result per seed, with the split diagnostics and timings."""

    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    records: list[MethodResult]
    alignment: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.records:
            seen.setdefault(r.method, None)
        return list(seen)

    def record(self, method: str, seed: int) -> MethodResult:
        for r in self.records:
            if r.method == method and r.seed == seed:
                return r
        raise KeyError(f"no result for method {method!r}, seed {seed}")

    def normalized_average(self, method: str, seed: int) -> float:
        """Mean over tasks of 100 · accuracy / individual accuracy (same seed)."""
        individual = self.record("individual", seed).test
        merged = self.record(method, seed).test
        return sum(100.0 * merged[t] / individual[t] for t in self.tasks) / len(self.tasks)

    def paired_difference(self, method: str, reference: str = REFERENCE) -> list[float]:
        """Per seed: method's average test accuracy minus the reference's (points)."""
        return [
            self.record(method, s).test_average - self.record(reference, s).test_average
            for s in self.seeds
        ]

    def table(self) -> list[dict[str, Any]]:
        """One row per method: per-task and average accuracy (mean, std over seeds),
        normalized accuracy, and the paired difference against task arithmetic."""
        rows = []
        for method in self.methods:
            row: dict[str, Any] = {"method": method}
            for task in self.tasks:
                row[task] = _mean_std([self.record(method, s).test[task] for s in self.seeds])
            row["average"] = _mean_std([self.record(method, s).test_average for s in self.seeds])
            row["normalized"] = _mean_std([self.normalized_average(method, s) for s in self.seeds])
            diffs = self.paired_difference(method)
            row["delta_vs_ta"] = _mean_std(diffs)
            row["wins_vs_ta"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
            row["params"] = [self.record(method, s).params for s in self.seeds]
            rows.append(row)
        return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def _grid(**axes: Iterable[Any]) -> list[dict[str, Any]]:
    names = list(axes)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values())]


def _select(
    evaluator: Evaluator,
    candidates: list[dict[str, Any]],
    build: Callable[[dict[str, Any]], State],
) -> tuple[dict[str, Any], float, State]:
    """The candidate with the best mean validation accuracy (first wins ties)."""
    best: tuple[dict[str, Any], float, State] | None = None
    for params in candidates:
        state = build(params)
        score = average(evaluator.evaluate(state, "val"))
        if best is None or score > best[1] + 1e-12:
            best = (params, score, state)
    assert best is not None
    return best


def method_candidates(config: BenchmarkConfig, members: int) -> dict[str, list[dict[str, Any]]]:
    """The coefficient grid of each edit method (``tasks.edit`` parameters)."""
    ties = {"density": config.ties_density}
    return {
        "weight_average": [{"scale": 1.0 / members}],
        "task_arithmetic": _grid(scale=config.scales),
        "ties": [{**ties, **p} for p in _grid(scale=config.ties_scales)],
        "shared_ta": [
            {"merge": "task_arithmetic", "shared_as": "each", **p}
            for p in _grid(scale=config.scales, shared_weight=config.shared_weights)
        ],
        "shared_ties": [
            {"merge": "ties", "shared_as": "each", **ties, **p}
            for p in _grid(scale=config.ties_scales, shared_weight=config.shared_weights)
        ],
    }


Splitter = Callable[[Family, SplitSettings, int], Mapping[str, torch.Tensor]]


def direct_split(family: Family, settings: SplitSettings, seed: int) -> Mapping[str, torch.Tensor]:
    """Shared parts computed in memory (``split_family``); the pipeline passes its own."""
    return split_family(family, settings)


def benchmark_seed(
    family: Family,
    evaluator: Evaluator,
    config: BenchmarkConfig,
    seed: int,
    say: Callable[[str], None] = log.info,
    split: Splitter = direct_split,
) -> tuple[list[MethodResult], dict[str, dict[str, Any]]]:
    """Every method on one seed's family; returns the results and the split diagnostics
    (``shared_alignment`` per variant). ``split`` supplies each variant's shared parts
    (T, *shape) per parameter in the family's member order: computed in memory by default,
    read from a decomposition run by the pipeline."""
    tasks = list(family.members)
    records: list[MethodResult] = []

    def add(method: str, params: dict[str, Any], val: float, state: State, count: int) -> None:
        test = evaluator.evaluate(state, "test")
        records.append(MethodResult(method, seed, params, val, test, count))
        say(f"seed {seed}: {method:<24} test {average(test):6.2f}  val {val:6.2f}  {params}")

    base_val = average(evaluator.evaluate(family.base, "val"))
    add("base", {}, base_val, family.base, 1)
    individual_test, individual_val = {}, {}
    for task in tasks:
        individual_val[task] = evaluator.evaluate(family.finetuned[task], "val", [task])[task]
        individual_test[task] = evaluator.evaluate(family.finetuned[task], "test", [task])[task]
    records.append(
        MethodResult("individual", seed, {}, average(individual_val), individual_test, 1)
    )
    grids = method_candidates(config, len(tasks))
    for method in ("weight_average", "task_arithmetic", "ties"):
        edit = EDIT_METHODS[method]
        params, val, state = _select(
            evaluator, grids[method], lambda p, m=edit: edit_state(family, m, p)
        )
        add(method, params, val, state, len(grids[method]))
    alignment = {}
    for variant in config.variants:
        started = time.perf_counter()
        shared = split(family, config.split_settings(variant), seed)
        alignment[variant] = shared_alignment(family, shared)
        alignment[variant]["split_s"] = round(time.perf_counter() - started, 2)
        for method in SHARED_METHODS:
            params, val, state = _select(
                evaluator,
                grids[method],
                lambda p, s=shared: edit_state(family, "shared_augmented", p, s),
            )
            add(f"{method}[{variant}]", params, val, state, len(grids[method]))
    for method in config.subspace_methods:
        delta = subspace_delta(family, method)
        candidates = _grid(scale=config.subspace_scales)
        params, val, state = _select(
            evaluator, candidates, lambda p, d=delta: scaled_state(family, d, p["scale"])
        )
        add(method, params, val, state, len(candidates))
    return records, alignment


def run_benchmark(
    zoo: Zoo,
    config: BenchmarkConfig | None = None,
    *,
    seeds: Iterable[int] | None = None,
    tasks: Mapping[str, TaskData] | None = None,
    progress: Callable[[str], None] | None = None,
    split: Splitter = direct_split,
) -> BenchmarkResult:
    """Run every method on every seed of ``zoo`` (default: all its seeds).

    ``tasks`` may pass the zoo's already loaded data. Deterministic for a zoo and config.
    """
    config = config or BenchmarkConfig()
    say = progress or log.info
    seeds = tuple(zoo.seeds if seeds is None else seeds)
    data = dict(tasks) if tasks is not None else zoo.load_tasks()
    evaluator = Evaluator(data, zoo.heads(), load_backbone(zoo.base_dir).config)
    result = BenchmarkResult(
        tasks=zoo.tasks,
        seeds=seeds,
        records=[],
        settings={"benchmark": config.model_dump(mode="json"), "zoo": zoo.manifest["fingerprint"]},
    )
    for seed in seeds:
        started = time.perf_counter()
        family = load_family(zoo.base_dir, zoo.members(seed))
        records, alignment = benchmark_seed(family, evaluator, config, seed, say, split)
        result.records += records
        for variant, stats in alignment.items():
            result.alignment[f"seed-{seed}/{variant}"] = stats
        result.timings[f"seed-{seed}_s"] = round(time.perf_counter() - started, 2)
    return result
