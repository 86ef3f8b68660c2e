"""The vision suite's report: its table, a verdict on the paper's first claim (+5 points of
multi-task accuracy from adding the shared parts as extra task vectors), the shared-part
agreement table, a bar chart, and its section of RESULTS.md.

Everything reads a ``SuiteResult`` (families = fine-tuning seeds, labelled ``seed-<s>``);
metrics are accuracies (%) per task and a row's score is their mean. Light: no torch here
(matplotlib is imported by ``bar_chart`` only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvsplit.tasks.suites.base import SuiteResult, mean_std

CLAIM_POINTS = 5.0
SHARED_METHODS = ("shared_ta", "shared_ties")
REFERENCE = "task_arithmetic"
BASE_MERGE = {"shared_ta": "task_arithmetic", "shared_ties": "ties"}


@dataclass(frozen=True)
class Verdict:
    """Whether the claim holds: ``holds`` (some shared-augmented merge gains ≥ 5 points over
    its base merge on average and in every seed), ``partly`` (gains in every seed, < 5 on
    average), or ``does not hold``. ``lines`` explain each variant's paired difference."""

    outcome: str
    lines: list[str]


def _fmt(value: tuple[float, float]) -> str:
    return f"{value[0]:.1f} ± {value[1]:.1f}"


def _signed(value: tuple[float, float]) -> str:
    return f"{value[0]:+.2f} ± {value[1]:.2f}"


def normalized_average(result: SuiteResult, row: str, family: str) -> float:
    """Mean over tasks of 100 · accuracy / individual accuracy (same seed)."""
    individual = result.record("individual", family).test
    merged = result.record(row, family).test
    return sum(100.0 * merged[t] / individual[t] for t in result.metrics) / len(result.metrics)


def table(result: SuiteResult) -> list[dict[str, Any]]:
    """One row per method: per-task and average accuracy (mean, std over seeds), normalized
    accuracy, and the paired difference against task arithmetic."""
    rows = []
    for method in result.rows:
        row: dict[str, Any] = {"method": method}
        for task in result.metrics:
            row[task] = result.metric_summary(method, task)
        row["average"] = mean_std(result.scores(method))
        row["normalized"] = mean_std(
            [normalized_average(result, method, f) for f in result.families]
        )
        diffs = result.paired_difference(method, REFERENCE)
        row["delta_vs_ta"] = mean_std(diffs)
        row["wins_vs_ta"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
        row["params"] = [result.record(method, f).params for f in result.families]
        rows.append(row)
    return rows


def row_metrics(result: SuiteResult, row: str) -> dict[str, float]:
    """What MLflow gets for one row (normalized accuracy and Δ vs task arithmetic)."""
    (found,) = [r for r in table(result) if r["method"] == row]
    return {"normalized": found["normalized"][0], "delta_vs_ta": found["delta_vs_ta"][0]}


def verdict(result: SuiteResult) -> Verdict:
    """Judge the claim from the paired differences of each shared-augmented variant."""
    lines, outcomes = [], []
    for method in result.rows:
        family = method.split("[")[0]
        if family not in SHARED_METHODS:
            continue
        reference = BASE_MERGE[family]
        diffs = result.paired_difference(method, reference)
        mean = sum(diffs) / len(diffs)
        wins = sum(d > 0 for d in diffs)
        if mean >= CLAIM_POINTS and wins == len(diffs):
            outcomes.append("holds")
        elif wins == len(diffs):
            outcomes.append("partly")
        else:
            outcomes.append("does not hold")
        per_seed = ", ".join(f"{d:+.2f}" for d in diffs)
        lines.append(
            f"`{method}` − `{reference}`: {mean:+.2f} points on average "
            f"({wins}/{len(diffs)} seeds better; per seed {per_seed})"
        )
    if "holds" in outcomes:
        outcome = "holds"
    elif "partly" in outcomes:
        outcome = "partly"
    else:
        outcome = "does not hold"
    return Verdict(outcome, lines)


def markdown_table(result: SuiteResult) -> str:
    """Test accuracy (%) per task, average, normalized, Δ vs task arithmetic: mean ± std."""
    header = ["method", *result.metrics, "average", "normalized", "Δ vs TA", "wins"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table(result):
        cells = [f"`{row['method']}`"]
        cells += [_fmt(row[t]) for t in result.metrics]
        cells += [
            f"**{_fmt(row['average'])}**",
            _fmt(row["normalized"]),
            _signed(row["delta_vs_ta"]),
            row["wins_vs_ta"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def alignment_table(result: SuiteResult) -> str:
    """Per seed and split variant: agreement of the members' shared parts."""
    header = ["seed/variant", "cos(shared) mean", "min", "max", "cos(τ) mean", "shared energy"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, stats in result.diagnostics.items():
        lines.append(
            f"| {key} | {stats['cosine_mean']:.3f} | {stats['cosine_min']:.3f} | "
            f"{stats['cosine_max']:.3f} | {stats['task_vector_cosine_mean']:.3f} | "
            f"{100 * stats['shared_energy_mean']:.1f}% |"
        )
    return "\n".join(lines)


def results_markdown(result: SuiteResult, context: Mapping[str, Any] | None = None) -> str:
    """The vision suite's section of RESULTS.md. ``context`` adds lines to the set-up
    (zoo, timings, decomposition runs, the command that produced it)."""
    judged = verdict(result)
    statement = {
        "holds": f"**The claim holds here**: adding the shared parts gains at least "
        f"{CLAIM_POINTS:g} points in every seed.",
        "partly": f"**The claim holds only in direction**: the shared parts help in every "
        f"seed, but by less than {CLAIM_POINTS:g} points.",
        "does not hold": f"**The claim does not hold here**: adding the shared parts does "
        f"not give the +{CLAIM_POINTS:g} points (nor a gain in every seed).",
    }[judged.outcome]
    rows = table(result)
    best = max(rows, key=lambda r: r["average"][0] if r["method"] != "individual" else -1)
    split = result.settings.get("split", {})
    setup = [
        f"- tasks ({len(result.metrics)}): {', '.join(result.metrics)}",
        f"- seeds (fine-tuning): {', '.join(f.removeprefix('seed-') for f in result.families)}",
        f"- split: {split.get('method')} with min_tasks={split.get('min_tasks')} "
        f"(threshold {split.get('threshold')}), ranks {split.get('rank')}, one-sided and "
        "two-sided; 1-D parameters kept whole in the unique part",
        "- coefficients chosen on the validation split (mean accuracy over tasks), "
        "accuracies on the test split, mean ± std over seeds",
    ]
    setup += [f"- {key}: {value}" for key, value in (context or {}).items()]
    return "\n".join(
        [
            "## Vision suite",
            "",
            f"Preset `{result.preset}`. Paper (Damirchi et al. 2025): adding the shared "
            "components as extra task vectors improves multi-task merging by about 5 points.",
            "",
            "### The claim",
            "",
            statement,
            "",
            *[f"- {line}" for line in judged.lines],
            f"- best merge on average: `{best['method']}` ({_fmt(best['average'])}%)",
            "",
            "### Set-up",
            "",
            *setup,
            "",
            "### Test accuracy (%)",
            "",
            "Normalized = merged / individual per task; Δ vs TA = paired difference of the "
            "average against task arithmetic (points); wins = seeds where it is higher.",
            "",
            markdown_table(result),
            "",
            "### Do the members' shared parts agree?",
            "",
            "Pairwise cosine between members' whole-model shared parts; cos(τ) is the same "
            "for the task vectors; shared energy = ‖s_i‖² / ‖τ_i‖², mean over members.",
            "",
            alignment_table(result),
            "",
        ]
    )


def bar_chart(result: SuiteResult, path: str | Path) -> Path:
    """A bar chart of the average test accuracy per method (mean ± std over seeds) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table(result)
    names = [r["method"] for r in rows]
    means = [r["average"][0] for r in rows]
    stds = [r["average"][1] for r in rows]
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    colors = ["tab:orange" if n.split("[")[0] in SHARED_METHODS else "tab:blue" for n in names]
    axis.bar(range(len(rows)), means, yerr=stds, color=colors, capsize=3)
    axis.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=8)
    axis.set_ylabel("average test accuracy (%)")
    axis.set_title(f"vision suite: {len(result.metrics)} tasks, {len(result.families)} seed(s)")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
