"""The vision benchmark's report: a markdown table, a verdict on the paper's first claim
(+5 points of multi-task accuracy from adding the shared parts as extra task vectors), a
bar chart, and ``RESULTS.md``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvsplit.tasks.suites.vision.benchmark import SHARED_METHODS, BenchmarkResult

CLAIM_POINTS = 5.0
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


def verdict(result: BenchmarkResult) -> Verdict:
    """Judge the claim from the paired differences of each shared-augmented variant."""
    lines, outcomes = [], []
    for method in result.methods:
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


def markdown_table(result: BenchmarkResult) -> str:
    """Test accuracy (%) per task, average, normalized, Δ vs task arithmetic: mean ± std."""
    header = ["method", *result.tasks, "average", "normalized", "Δ vs TA", "wins"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result.table():
        cells = [f"`{row['method']}`"]
        cells += [_fmt(row[t]) for t in result.tasks]
        cells += [
            f"**{_fmt(row['average'])}**",
            _fmt(row["normalized"]),
            _signed(row["delta_vs_ta"]),
            row["wins_vs_ta"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def alignment_table(result: BenchmarkResult) -> str:
    """Per seed and split variant: agreement of the members' shared parts."""
    header = [
        "seed/variant",
        "cos(shared) mean",
        "min",
        "max",
        "cos(τ) mean",
        "shared energy",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, stats in result.alignment.items():
        lines.append(
            f"| {key} | {stats['cosine_mean']:.3f} | {stats['cosine_min']:.3f} | "
            f"{stats['cosine_max']:.3f} | {stats['task_vector_cosine_mean']:.3f} | "
            f"{100 * stats['shared_energy_mean']:.1f}% |"
        )
    return "\n".join(lines)


def results_markdown(result: BenchmarkResult, context: dict[str, Any] | None = None) -> str:
    """The whole RESULTS.md text. ``context`` adds lines to the set-up section (zoo config,
    timings, the command that produced it)."""
    judged = verdict(result)
    statement = {
        "holds": f"**The claim holds here**: adding the shared parts gains at least "
        f"{CLAIM_POINTS:g} points in every seed.",
        "partly": f"**The claim holds only in direction**: the shared parts help in every "
        f"seed, but by less than {CLAIM_POINTS:g} points.",
        "does not hold": f"**The claim does not hold here**: adding the shared parts does "
        f"not give the +{CLAIM_POINTS:g} points (nor a gain in every seed).",
    }[judged.outcome]
    best = max(result.table(), key=lambda r: r["average"][0] if r["method"] != "individual" else -1)
    split = result.settings.get("benchmark", {}).get("split", {})
    setup = [
        f"- tasks ({len(result.tasks)}): {', '.join(result.tasks)}",
        f"- seeds (fine-tuning): {', '.join(map(str, result.seeds))}",
        f"- split: {split.get('method')} with min_tasks={split.get('min_tasks')} "
        f"(threshold {split.get('threshold')}), ranks {split.get('rank')}, one-sided and "
        "two-sided; 1-D parameters kept whole in the unique part",
        "- coefficients chosen on the validation split (mean accuracy over tasks), "
        "accuracies on the test split, mean ± std over seeds",
    ]
    for key, value in (context or {}).items():
        setup.append(f"- {key}: {value}")
    return "\n".join(
        [
            "# Vision suite results",
            "",
            "Written by `tasks.suites.vision.report.write_results`; regenerate, do not edit.",
            "",
            "## The claim",
            "",
            "Paper (Damirchi et al. 2025): adding the shared components as extra task vectors "
            "improves multi-task merging by about 5 points.",
            "",
            statement,
            "",
            *[f"- {line}" for line in judged.lines],
            f"- best merge on average: `{best['method']}` ({_fmt(best['average'])}%)",
            "",
            "## Set-up",
            "",
            *setup,
            "",
            "## Test accuracy (%)",
            "",
            "Normalized = merged / individual per task; Δ vs TA = paired difference of the "
            "average against task arithmetic (points); wins = seeds where it is higher.",
            "",
            markdown_table(result),
            "",
            "## Do the members' shared parts agree?",
            "",
            "Pairwise cosine between members' whole-model shared parts; cos(τ) is the same "
            "for the task vectors; shared energy = ‖s_i‖² / ‖τ_i‖², mean over members.",
            "",
            alignment_table(result),
            "",
        ]
    )


def write_results(
    result: BenchmarkResult, path: str | Path, context: dict[str, Any] | None = None
) -> Path:
    """Write ``results_markdown`` to ``path`` (e.g. ``RESULTS.md``); returns the path."""
    path = Path(path)
    path.write_text(results_markdown(result, context), encoding="utf-8")
    return path


def bar_chart(result: BenchmarkResult, path: str | Path) -> Path:
    """A bar chart of the average test accuracy per method (mean ± std over seeds) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.table()
    names = [r["method"] for r in rows]
    means = [r["average"][0] for r in rows]
    stds = [r["average"][1] for r in rows]
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    colors = ["tab:orange" if n.split("[")[0] in SHARED_METHODS else "tab:blue" for n in names]
    axis.bar(range(len(rows)), means, yerr=stds, color=colors, capsize=3)
    axis.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=8)
    axis.set_ylabel("average test accuracy (%)")
    axis.set_title(f"vision suite: {len(result.tasks)} tasks, {len(result.seeds)} seed(s)")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
