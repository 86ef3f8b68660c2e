"""The style suite's tables, verdict, sample grid and RESULTS.md section (from a
``SuiteResult``; nothing here trains or chooses).

A pair row's numbers are its test metrics at the coefficients chosen on validation: the
Fréchet distance to real digits with both styles applied (``fid/A-B``), each style's
strength as a percentage of that style's own model's test strength (the ``individual``
row), and the digit classifier's confidence. "Both present": each style at least
``min_strength_fraction`` of its single-style strength on the test batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvsplit.tasks.suites.base import SuiteResult, mean_std

METHODS = ("full", "unique", "ties", "tsv_m")


def _fmt(values: list[float], digits: int = 1) -> str:
    if not values or any(math.isnan(v) for v in values):
        return "n/a"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def pair_rows(result: SuiteResult) -> dict[str, dict[str, str]]:
    """Pair ``a+b`` → method → row name, for the pairs in the result."""
    pairs: dict[str, dict[str, str]] = {}
    for row in result.rows:
        if "[" in row:
            method, pair = row.rstrip("]").split("[", 1)
            pairs.setdefault(pair, {})[method] = row
    return pairs


@dataclass(frozen=True)
class PairOutcome:
    """One method on one pair and family, at its chosen coefficients, on test."""

    fid: float
    relative: tuple[float, float]
    confidence: float
    params: dict[str, Any]

    def present(self, fraction: float) -> bool:
        return all(r >= 100.0 * fraction for r in self.relative)


def outcome(result: SuiteResult, row: str, pair: str, family: str) -> PairOutcome:
    record = result.record(row, family)
    single = result.record("individual", family).test
    relative = tuple(
        100.0 * record.test[f"strength/{s}"] / max(single[f"strength/{s}"], 1e-9)
        for s in pair.split("+")
    )
    return PairOutcome(
        record.test[f"fid/{pair.replace('+', '-')}"],
        relative,
        record.test["confidence"],
        record.params,
    )  # type: ignore[arg-type]


def row_metrics(result: SuiteResult, row: str) -> dict[str, float]:
    if "[" not in row:
        return {}
    pair = row.rstrip("]").split("[", 1)[1]
    outcomes = [outcome(result, row, pair, f) for f in result.families]
    return {
        "pair_fid": mean_std([o.fid for o in outcomes])[0],
        "weaker_style_relative": mean_std([min(o.relative) for o in outcomes])[0],
    }


@dataclass(frozen=True)
class Verdict:
    outcome: str
    lines: list[str]


def verdict(suite: Any, result: SuiteResult) -> Verdict:
    """The issue's target: unique mixing's Fréchet distance no worse than full mixing's,
    with both styles present in the unique mix, on at least ⌈2n/3⌉ of n seeds, for most
    pairs."""
    fraction = suite.settings.min_strength_fraction
    needed = math.ceil(2 * len(result.families) / 3)
    held, lines = 0, []
    pairs = pair_rows(result)
    for pair, rows in pairs.items():
        wins = 0
        for family in result.families:
            full = outcome(result, rows["full"], pair, family)
            unique = outcome(result, rows["unique"], pair, family)
            wins += unique.present(fraction) and unique.fid <= full.fid
        held += wins >= needed
        lines.append(
            f"{pair}: unique no worse with both styles on {wins}/{len(result.families)} seeds"
        )
    most = held > len(pairs) / 2
    state = "holds" if most else "does not hold"
    return Verdict(f"{state} ({held}/{len(pairs)} pairs)", lines)


def mixing_table(suite: Any, result: SuiteResult) -> str:
    """Per pair and method, then averaged over pairs: test Fréchet distance to the pair's
    real distribution, each style's strength relative to its own model, confidence, and on
    how many seeds both styles are present; mean ± std over seeds."""
    fraction = suite.settings.min_strength_fraction
    n = len(result.families)
    header = (
        "| pair | method | FID to pair ↓ | style A (% of single) | style B (% of single) "
        "| confidence % | both present | chosen (seed order) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    averages: dict[str, list[list[float]]] = {m: [[], [], [], [], []] for m in METHODS}
    pairs = pair_rows(result)
    for pair, rows in pairs.items():
        a, b = pair.split("+")
        for method in METHODS:
            if method not in rows:
                continue
            outcomes = [outcome(result, rows[method], pair, f) for f in result.families]
            present = sum(o.present(fraction) for o in outcomes)
            chosen = "; ".join(
                ", ".join(f"{k}={v:g}" for k, v in o.params.items() if k != "density")
                for o in outcomes
            )
            lines.append(
                f"| {a} + {b} | `{method}` | {_fmt([o.fid for o in outcomes], 2)} "
                f"| {_fmt([o.relative[0] for o in outcomes], 0)} "
                f"| {_fmt([o.relative[1] for o in outcomes], 0)} "
                f"| {_fmt([o.confidence for o in outcomes])} | {present}/{n} | {chosen} |"
            )
            sums = averages[method]
            sums[0].append(mean_std([o.fid for o in outcomes])[0])
            sums[1].append(mean_std([o.relative[0] for o in outcomes])[0])
            sums[2].append(mean_std([o.relative[1] for o in outcomes])[0])
            sums[3].append(mean_std([o.confidence for o in outcomes])[0])
            sums[4].append(present / n)
    if len(pairs) > 1:
        for method in METHODS:
            fid, ra, rb, conf, present = averages[method]
            if fid:
                lines.append(
                    f"| **mean over {len(fid)} pairs** | `{method}` | {_fmt(fid, 2)} | "
                    f"{_fmt(ra, 0)} | {_fmt(rb, 0)} | {_fmt(conf)} | "
                    f"{100 * sum(present) / len(present):.0f}% | |"
                )
    return "\n".join(lines)


def reference_table(result: SuiteResult) -> str:
    """The base and each style's own model (test): the yardsticks of the table above."""
    lines = ["| model | FID to its own distribution ↓ | its style's strength % | confidence % |",
             "|---|---|---|---|"]  # fmt: skip
    base = [result.record("base", f).test for f in result.families]
    lines.append(
        f"| base | {_fmt([m['fid/plain'] for m in base], 2)} | — | "
        f"{_fmt([m['confidence'] for m in base])} |"
    )
    individual = [result.record("individual", f).test for f in result.families]
    for key in individual[0]:
        if key.startswith("strength/"):
            style = key.split("/", 1)[1]
            base_strength = _fmt([m[key] for m in base])
            lines.append(
                f"| `{style}` alone | {_fmt([m[f'fid/{style}'] for m in individual], 2)} | "
                f"{_fmt([m[key] for m in individual])} (base {base_strength}) | n/a |"
            )
    return "\n".join(lines)


def sample_grid(suite: Any, result: SuiteResult, path: str | Path) -> Path:
    """A PNG of test samples (same starting noise in every row) of the first seed: the base,
    each style alone, and the chosen full and unique mix of each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tvsplit.tasks.suites.edited import member_model
    from tvsplit.tasks.suites.style.suite import VARIANT

    family = result.families[0]
    tensors = suite._tensors[family]
    evaluation = suite._evaluation
    ref = next(f for f in suite._pool.families if f.label == family)
    models: list[tuple[str, Any]] = [("base", tensors.base)]
    models += [(f"{m} alone", member_model(tensors, src, m)) for m, src in ref.members.items()]
    methods = {m.row: m for m in suite.methods(suite._pool)}
    for pair, rows in pair_rows(result).items():
        for kind in ("full", "unique"):
            method = methods[rows[kind]]
            params = result.record(rows[kind], family).params
            run = result.runs.get(f"{family}/{VARIANT}") if method.variant else None
            state = tensors.state(method.edit, params, members=method.members, run=run)
            models.append((f"{kind} {pair}", state))
    columns = 8
    figure, axes = plt.subplots(
        len(models), columns, figsize=(columns * 0.8 + 1.6, len(models) * 0.85), squeeze=False
    )
    for r, (label, model) in enumerate(models):
        images = evaluation.samples_of(model, "test", count=columns)
        for c in range(columns):
            axis = axes[r][c]
            axis.imshow(images[c, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    figure.suptitle(
        f"{suite.name} suite, {family}: test samples (same noise per column)", fontsize=9
    )
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def samples_file(suite: Any) -> str:
    """The sample grid's file name beside RESULTS.md (one per suite: style, style-lora)."""
    return f"{suite.name}_samples.png"


def results_markdown(suite: Any, result: SuiteResult, context: Mapping[str, Any]) -> str:
    judged = verdict(suite, result)
    s = suite.settings
    lines = [
        f"## {suite.title}: mixing styles of a diffusion model by their unique parts",
        "",
        f"Preset `{result.preset}`. Coefficients chosen on {s.val_samples} validation samples "
        f"(seed {s.val_seed}) as the lowest Fréchet distance to the pair's real distribution "
        f"among candidates where both styles keep ≥ {s.min_strength_fraction:.0%} of their "
        f"single-style strength; reported on {s.test_samples} fresh test samples (seed "
        f"{s.test_seed}), {s.ddim_steps} DDIM steps, {s.reference_images} real reference "
        "images per distribution. Fréchet distance: torchmetrics' FrechetInceptionDistance "
        "on the features of a digit classifier trained here; style strength: a detector "
        "trained here on real digits with and without each style. Mean ± std over "
        f"fine-tuning seeds ({', '.join(result.families)}).",
        "",
        mixing_table(suite, result),
        "",
        reference_table(result),
        "",
        f"**Target** (unique mixing's FID no worse than full mixing's, both styles present, "
        f"on ≥ 2 of 3 seeds, for most pairs): **{judged.outcome}**.",
        "",
        *(f"- {line}" for line in judged.lines),
        "",
    ]
    noise = [v for d in result.diagnostics.values() for v in d.get("base_fid_over_seeds", [])]
    if noise:
        lines += [
            f"FID sampling noise (the base, {len(noise)} test batches of other seeds): "
            f"{_fmt(noise, 3)}.",
            "",
        ]
    lines += [
        f"![style samples]({samples_file(suite)})",
        "",
        *(f"- {key}: {value}" for key, value in context.items()),
    ]
    return "\n".join(lines)
