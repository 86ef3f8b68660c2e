"""The vision suite: ≥ 6 real image classification tasks, a model zoo built here, merge
methods and baselines, metrics and the RESULTS.md report (plain functions; flows wire them).

Entry points::

    from tvsplit.tasks.suites.vision import ZooConfig, build_zoo, run_benchmark, write_results

    zoo = build_zoo(folder, ZooConfig.full())          # reuses a finished zoo
    spec = zoo.catalogue_spec()                         # ingest: one family per seed
    result = run_benchmark(zoo, BenchmarkConfig())      # every method, every seed
    write_results(result, "RESULTS.md"); bar_chart(result, "vision.png")

Modules: ``data`` (tasks and splits), ``model`` (ConvNeXt backbone, heads), ``training``,
``zoo``, ``evaluate`` (accuracy with each task's head), ``merging`` (merged state dicts
through the edit registry, TSV-M, Iso-C and Iso-CTS included; splits, shared-part alignment),
``benchmark``, ``report``.
"""

from tvsplit.tasks.suites.vision.benchmark import (
    BenchmarkConfig,
    BenchmarkResult,
    MethodResult,
    benchmark_seed,
    run_benchmark,
)
from tvsplit.tasks.suites.vision.data import SplitSizes, TaskData, load_suite, load_task, task_names
from tvsplit.tasks.suites.vision.evaluate import Evaluator, accuracy, average, normalized
from tvsplit.tasks.suites.vision.merging import (
    Family,
    edit_state,
    load_family,
    scaled_state,
    shared_alignment,
    split_family,
    subspace_delta,
)
from tvsplit.tasks.suites.vision.report import bar_chart, results_markdown, verdict, write_results
from tvsplit.tasks.suites.vision.zoo import Zoo, ZooConfig, ZooError, build_zoo, default_zoo_dir

__all__ = [
    "BenchmarkConfig",
    "BenchmarkResult",
    "Evaluator",
    "Family",
    "MethodResult",
    "SplitSizes",
    "TaskData",
    "Zoo",
    "ZooConfig",
    "ZooError",
    "accuracy",
    "average",
    "bar_chart",
    "benchmark_seed",
    "build_zoo",
    "default_zoo_dir",
    "edit_state",
    "load_family",
    "load_suite",
    "load_task",
    "normalized",
    "results_markdown",
    "run_benchmark",
    "scaled_state",
    "shared_alignment",
    "split_family",
    "subspace_delta",
    "task_names",
    "verdict",
    "write_results",
]
