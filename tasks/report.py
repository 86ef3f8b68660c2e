"""Summaries and plots of a decomposition run, from its per-parameter diagnostics (no I/O).

The figures are what a person looks at: which parameters share how much with the family
(a heatmap, parameters × members), and whether a parameter's eigenvalues stand clear of
what random subspaces of the same ranks would give (its spectrum against the chance level
and the threshold used).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on workers and CI

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

Diagnostics = Mapping[str, Any]


def _scalar(value: Any) -> float:
    """A per-member value (pairwise) summarised by its maximum; scalars pass through."""
    if isinstance(value, list | tuple):
        return float(max(value)) if value else 0.0
    return float(value)


def summary_rows(diagnostics: Sequence[Diagnostics]) -> list[dict[str, Any]]:
    """One flat row per parameter: name, shape, k, ranks, gap, chance, top eigenvalue,
    threshold and each member's shared energy (``shared_energy/<member>``)."""
    rows = []
    for d in diagnostics:
        eig = d.get("eigenvalues") or []
        top = (
            _scalar([e[0] if e else 0.0 for e in eig])
            if eig and isinstance(eig[0], list)
            else (eig[0] if eig else 0.0)
        )
        row = {
            "parameter": d["name"],
            "shape": "×".join(str(s) for s in d["param_shape"]),
            "k": _scalar(d["k"]),
            "ranks": ",".join(str(r) for r in d["ranks"]),
            "top_eigenvalue": float(top),
            "gap": _scalar(d["gap"]),
            "chance": _scalar(d["chance"]),
            "threshold": float(d["threshold_used"]),
        }
        for member, energy in zip(d["members"], d["shared_energy"], strict=True):
            row[f"shared_energy/{member}"] = float(energy)
        rows.append(row)
    return rows


CHANCE_MARGIN = 0.1
#: The MLflow artifact of a decomposition run holding `chance_rows`.
CHANCE_TABLE = "chance.json"


def chance_rows(diagnostics: Sequence[Diagnostics], margin: float = CHANCE_MARGIN) -> list[dict]:
    """One row per parameter with a chance level (not pairwise): its threshold, the chance
    level, their difference and whether the threshold sits within ``margin`` of chance."""
    rows = []
    for d in diagnostics:
        chance, tau = _scalar(d["chance"]), float(d["threshold_used"])
        if d["method"] != "pairwise" and chance > 0:
            rows.append(
                {
                    "parameter": d["name"],
                    "threshold": tau,
                    "chance": chance,
                    "threshold_minus_chance": tau - chance,
                    "near_chance": tau - chance < margin,
                }
            )
    return rows


def chance_warnings(diagnostics: Sequence[Diagnostics], margin: float = CHANCE_MARGIN) -> list[str]:
    """Parameters whose threshold sits within ``margin`` of the chance level, one line each."""
    return [
        f"{row['parameter']}: threshold {row['threshold']:.2f} is within {margin} of the chance "
        f"level {row['chance']:.2f}; random subspaces of these ranks could pass it"
        for row in chance_rows(diagnostics, margin)
        if row["near_chance"]
    ]


def chance_summary(
    diagnostics: Sequence[Diagnostics], margin: float = CHANCE_MARGIN, *, tracked: bool = False
) -> str | None:
    """The per-parameter chance warnings of a run summed up in one line (None when there
    are none): ``37 of 59 parameters: threshold within 0.1 of chance; see ...``."""
    near = len(chance_warnings(diagnostics, margin))
    if not near:
        return None
    where = (
        f"see the MLflow run's chance table ({CHANCE_TABLE}) or --verbose"
        if tracked
        else "--verbose lists them"
    )
    return f"{near} of {len(diagnostics)} parameters: threshold within {margin} of chance; {where}"


def shared_energy_heatmap(diagnostics: Sequence[Diagnostics], max_rows: int = 80) -> Figure:
    """Heatmap of ‖shared_i‖²/‖Δ_i‖², parameters (rows) × members (columns)."""
    shown = list(diagnostics)[:max_rows]
    members = list(shown[0]["members"]) if shown else []
    values = np.array([d["shared_energy"] for d in shown], dtype=float).reshape(
        len(shown), len(members)
    )
    height = max(3.0, 0.22 * len(shown) + 1.5)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(members) + 4), height), layout="constrained")
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(members)), members, rotation=45, ha="right")
    ax.set_yticks(range(len(shown)), [d["name"] for d in shown], fontsize=7)
    ax.set_xlabel("member")
    ax.set_title("shared energy fraction ‖shared‖² / ‖Δ‖²")
    fig.colorbar(image, ax=ax, label="fraction of the task vector's energy")
    return fig


def spectrum_figure(diagnostics: Sequence[Diagnostics], max_params: int = 6) -> Figure:
    """Eigenvalue spectra of a few parameters (largest k first) against chance and threshold."""
    chosen = sorted(diagnostics, key=lambda d: -_scalar(d["k"]))[:max_params]
    cols = min(3, max(1, len(chosen)))
    rows = max(1, -(-len(chosen) // cols))
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(chosen) :]:
        ax.axis("off")
    for ax, d in zip(axes.flat, chosen, strict=False):
        eig = d["eigenvalues"]
        if eig and isinstance(eig[0], list):  # pairwise: one spectrum per member
            for member, values in zip(d["members"], eig, strict=True):
                ax.plot(range(1, len(values) + 1), values, marker=".", lw=0.8, label=member)
            ax.legend(fontsize=6)
        else:
            ax.plot(
                range(1, len(eig) + 1), eig, marker=".", lw=0.8, color="C0", label="eigenvalues"
            )
            ax.axhline(_scalar(d["chance"]), color="C3", ls=":", label="chance level")
        ax.axhline(float(d["threshold_used"]), color="k", ls="--", label="threshold")
        ax.set_title(f"{d['name']}  (k = {d['k']})", fontsize=8)
        ax.set_xlabel("index")
        ax.set_ylabel("eigenvalue")
        if not (eig and isinstance(eig[0], list)):
            ax.legend(fontsize=6)
    fig.suptitle("shared-subspace spectra")
    return fig


def spectrum_text(d: Diagnostics, width: int = 40) -> list[str]:
    """A terminal rendering of one parameter's spectrum: one bar per eigenvalue, with marks
    for the threshold (|) and the chance level (:)."""
    eig = d["eigenvalues"]
    spectra = eig if eig and isinstance(eig[0], list) else [eig]
    labels = d["members"] if len(spectra) > 1 else [""]
    scale = max(1.0, max((max(s) for s in spectra if s), default=1.0))
    tau_col = round(float(d["threshold_used"]) / scale * width)
    chance_col = round(_scalar(d["chance"]) / scale * width)
    lines = []
    for label, values in zip(labels, spectra, strict=True):
        if label:
            lines.append(f"member {label}:")
        for index, value in enumerate(values[:24], start=1):
            bar = list("█" * round(value / scale * width) + " " * (width + 1))
            if chance_col < len(bar) and bar[chance_col] == " ":
                bar[chance_col] = ":"
            if tau_col < len(bar):
                bar[tau_col] = "|"
            lines.append(f"{index:3d} {value:7.3f} {''.join(bar)}")
    return lines
