"""The suite interface: what an evaluation suite supplies to the generic suite flow.

A suite has FusionBench's three roles:

- a **pool of models** (``build``): builds or fetches its family or families (e.g. one per
  fine-tuning seed), reusing what is already built, and ends in a catalogue spec that goes
  through ``tvsplit ingest`` (``ModelPool.spec``, the ``flows.ingest.parse_spec`` shape);
- **methods** (``methods``, ``split_variants``, ``choose``): the rows it compares, each a
  registered edit method of ``tasks.edit`` (or a reference row, ``base`` / ``individual``)
  with its coefficient grid, its members, and which split variant's decomposition it reads;
  the named split variants (variant → ``SplitSettings``) the flow decomposes each family with;
  and how coefficients are chosen from validation metrics (default: the highest ``score``);
- a **pool of evaluation tasks** (``evaluation``): a model in (an in-memory state dict or a
  model folder), metrics per evaluation task out, on the ``"val"`` and ``"test"`` splits.

It also names its presets (``small`` for CI, ``full`` for the published run; more allowed),
and writes its own section of RESULTS.md (``report``). The generic flow
(``tvsplit evaluate SUITE --preset P``) runs any registered suite: build or reuse the
family → ingest → decompose → pick coefficients on validation → score on test → write the
chosen edit with the edit flow → MLflow (one parent run, one nested run per method) → the
suite's section of RESULTS.md (between its own markers; other sections are kept).

Declarations (the class, its ``name``, ``settings_model`` and ``presets``) import without
torch, Prefect, Dask or MLflow, so listing suites and ``--help`` stay fast: import heavy
modules inside the methods. The in-memory edit of a family is built by
``tasks.suites.edited.FamilyTensors`` (base + task vectors + shared parts of a
decomposition run, through the ``tasks.edit`` registry); suites do not write their own.

The smallest real suite (the test suite of ``tests/test_suite_interface.py`` is this one)::

    from pydantic import BaseModel
    from tvsplit.tasks.suites.base import MethodSpec, ModelPool, Suite, grid
    from tvsplit.tasks.suites.registry import register

    class ToySettings(BaseModel):
        scales: tuple[float, ...] = (0.5, 1.0)

    @register
    class ToySuite(Suite):
        name = "toy"
        title = "Toy suite"
        settings_model = ToySettings
        presets: ClassVar = {"small": {"scales": (1.0,)}, "full": {}}

        def build(self, progress):
            folders = make_family(self.data_root / "toy")        # reused when present
            return ModelPool.from_spec({"families": {"toy": folders}})

        def evaluation(self, pool):
            return MyEvaluation()      # .evaluate(model, split, tasks=None) -> {task: metric}

        def methods(self, pool):
            return [
                MethodSpec("base", "base"),
                MethodSpec("task_arithmetic", "task_arithmetic", grid(scale=self.settings.scales)),
            ]

        def report(self, result, context):
            return "## Toy suite\\n\\n" + result.markdown_table()

Register it in ``tasks/suites/registry.py`` (``BUILTIN``), or from another package with an
entry point in the ``tvsplit.suites`` group (``toy = "my_package.toy:ToySuite"``).
"""

from __future__ import annotations

import itertools
import math
import statistics
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ValidationError
from tvsplit.storage.errors import format_validation_error

if TYPE_CHECKING:  # heavy: only for annotations
    from tvsplit.tasks.decompose_job import SplitSettings
    from tvsplit.tasks.suites.edited import FamilyTensors

Metrics = dict[str, float]
"""Metric name → value; for most suites one entry per evaluation task (vision: task →
accuracy %). A suite may name several metrics per task (``"<task>/<metric>"``)."""

SPLITS = ("val", "test")
REFERENCE_ROWS = ("base", "individual")
"""Rows that are not edits: ``base`` (the family's base model as is) and ``individual``
(each member's own model scored on the metrics it owns, ``Suite.member_metrics``)."""

Progress = Callable[[str], None]


class SuiteError(ValueError):
    """A suite, preset or settings that cannot be used; the message says which and why."""


def grid(**axes: Iterable[Any]) -> tuple[dict[str, Any], ...]:
    """Every combination of the axes' values, in order (last axis fastest)::

    grid(scale=(0.5, 1.0), shared_weight=(1.0,)) == ({'scale': 0.5, 'shared_weight': 1.0},
                                                     {'scale': 1.0, 'shared_weight': 1.0})
    """
    names = list(axes)
    return tuple(
        dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values())
    )


@dataclass(frozen=True)
class MethodSpec:
    """One row of a suite's table.

    ``edit`` is a registered ``tasks.edit`` method (``task_arithmetic``, ``ties``,
    ``shared_augmented``, ``tsv_m``, …) or a reference row (``base``, ``individual``).
    ``grid`` holds the candidate method parameters (each one dict of the method's params;
    a single ``{}`` for a method without coefficients). ``members``: which family members
    the edit uses (None: all, in family order); ``member_params``: per-member parameters by
    member name (e.g. ``{"toxic": {"weight": 1.0}}``), the rest get the defaults.
    ``variant`` names the split variant whose decomposition the edit reads (methods that
    need shared/unique parts); None for methods that need no split.
    """

    row: str
    edit: str
    grid: tuple[dict[str, Any], ...] = ({},)
    members: tuple[str, ...] | None = None
    member_params: Mapping[str, Mapping[str, Any]] | None = None
    variant: str | None = None

    @property
    def is_reference(self) -> bool:
        return self.edit in REFERENCE_ROWS


@dataclass(frozen=True)
class Trial:
    """One candidate of a method's grid, scored on validation."""

    params: dict[str, Any]
    val: Metrics
    score: float


@dataclass(frozen=True)
class FamilyRef:
    """One family of the pool: its catalogue name, a label for tables (e.g. ``seed-0``),
    its base source and its members' sources (member → source, in family order)."""

    name: str
    label: str
    base: str
    members: dict[str, str]


@dataclass(frozen=True)
class ModelPool:
    """What ``Suite.build`` returns: the catalogue spec to ingest, its families (in order),
    and ``handle``, anything of the suite's own it needs later (e.g. its zoo)."""

    spec: dict[str, Any]
    families: tuple[FamilyRef, ...]
    handle: Any = None
    notes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_spec(
        cls,
        spec: Mapping[str, Any],
        labels: Mapping[str, str] | None = None,
        handle: Any = None,
        notes: Mapping[str, Any] | None = None,
    ) -> ModelPool:
        """A pool whose families are those of ``spec`` (labels default to the names)."""
        families = tuple(
            FamilyRef(
                name=name,
                label=(labels or {}).get(name, name),
                base=str(entry["base"]),
                members={m: str(s) for m, s in entry.get("members", {}).items()},
            )
            for name, entry in spec["families"].items()
        )
        return cls(dict(spec), families, handle, dict(notes or {}))


class Evaluation(Protocol):
    """A suite's pool of evaluation tasks, ready to score models.

    ``model``: an in-memory state dict (name → tensor; the family's parameters, see
    ``FamilyTensors``) or a model folder. ``tasks``: restrict to these evaluation tasks
    (None: all). Returns ``Metrics`` in a fixed key order."""

    def evaluate(self, model: Any, split: str, tasks: Sequence[str] | None = None) -> Metrics: ...


@dataclass(frozen=True)
class Record:
    """One row on one family: the chosen parameters, their validation and test metrics."""

    row: str
    family: str
    params: dict[str, Any]
    val: Metrics
    test: Metrics
    val_score: float
    test_score: float
    candidates: int = 1
    run: str | None = None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); both NaN when a value is not
    finite (NaN: a metric a row does not have; ``statistics.stdev`` raises on both)."""
    if not all(math.isfinite(v) for v in values):
        return math.nan, math.nan
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass
class SuiteResult:
    """Every row's record on every family, in row order, plus what the suite adds
    (``diagnostics`` per family and variant, e.g. how the members' shared parts agree)."""

    suite: str
    preset: str
    families: tuple[str, ...]
    records: list[Record] = field(default_factory=list)
    diagnostics: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)
    """``"<family label>/<variant>"`` → decomposition run id."""
    exported: dict[str, Any] = field(default_factory=dict)
    """What the edit flow wrote: row, family, folder, and its test metrics."""

    @property
    def rows(self) -> list[str]:
        return list(dict.fromkeys(r.row for r in self.records))

    @property
    def metrics(self) -> list[str]:
        """Metric names in the order of the first record."""
        return list(self.records[0].test) if self.records else []

    def record(self, row: str, family: str) -> Record:
        for r in self.records:
            if r.row == row and r.family == family:
                return r
        raise KeyError(f"no result for row {row!r} on family {family!r}")

    def scores(self, row: str, split: str = "test") -> list[float]:
        """The row's score per family (``Suite.score`` of its metrics)."""
        return [getattr(self.record(row, f), f"{split}_score") for f in self.families]

    def paired_difference(self, row: str, reference: str) -> list[float]:
        """Per family: the row's test score minus the reference row's."""
        return [
            self.record(row, f).test_score - self.record(reference, f).test_score
            for f in self.families
        ]

    def metric_summary(self, row: str, metric: str) -> tuple[float, float]:
        return mean_std([self.record(row, f).test[metric] for f in self.families])

    def markdown_table(self, fmt: str = "{:.1f}") -> str:
        """Test metrics and score per row, mean ± std over families (a plain default)."""
        header = ["row", *self.metrics, "score"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            cells = [f"`{row}`"]
            for metric in self.metrics:
                if not all(metric in self.record(row, f).test for f in self.families):
                    cells.append("—")  # e.g. `individual`: each member owns some metrics
                    continue
                mean, std = self.metric_summary(row, metric)
                cells.append(f"{fmt.format(mean)} ± {fmt.format(std)}")
            mean, std = mean_std(self.scores(row))
            cells.append(f"**{fmt.format(mean)} ± {fmt.format(std)}**")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


@dataclass(frozen=True)
class Export:
    """Which chosen edit the flow writes as a model folder with the edit flow:
    ``row`` on the family at index ``family`` of the pool."""

    row: str
    family: int = 0
    folder: str | None = None
    """Output folder name under ``<data_root>/<suite>/`` (default: from the row)."""


class Suite(ABC):
    """Base class of every suite; see the module docstring.

    Class attributes (declarations, no heavy imports): ``name`` (registry key, CLI
    argument), ``title``, ``description``, ``settings_model`` (a pydantic model of
    everything the suite's run depends on) and ``presets`` (preset name → settings values;
    ``small`` and ``full`` required, ``full`` is the published run).
    """

    name: ClassVar[str]
    title: ClassVar[str] = ""
    description: ClassVar[str] = ""
    settings_model: ClassVar[type[BaseModel]]
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {"small": {}, "full": {}}
    higher_is_better: ClassVar[bool] = True
    figures_beside_results: ClassVar[bool] = False
    """Also write ``artifacts`` into the folder of RESULTS.md (figures the section links)."""
    """Direction of ``score`` (for tables and the default ``choose``)."""

    def __init__(self, settings: BaseModel, data_root: str | Path, preset: str = "custom"):
        if not isinstance(settings, self.settings_model):
            raise SuiteError(
                f"suite {self.name!r}: settings must be a {self.settings_model.__name__}"
            )
        self.settings = settings
        self.data_root = Path(data_root)
        self.preset = preset

    # -- declarations -------------------------------------------------------------------
    @classmethod
    def preset_settings(cls, preset: str, **changes: Any) -> BaseModel:
        """The settings of ``preset`` (with ``changes`` on top), validated."""
        if preset not in cls.presets:
            raise SuiteError(
                f"suite {cls.name!r} has no preset {preset!r} (presets: {', '.join(cls.presets)})"
            )
        try:
            return cls.settings_model.model_validate({**cls.presets[preset], **changes})
        except ValidationError as error:
            where = f"suite {cls.name!r}, preset {preset!r}"
            raise SuiteError(f"{where}: {format_validation_error(error)}") from None

    @classmethod
    def from_preset(cls, preset: str, data_root: str | Path, **changes: Any) -> Suite:
        return cls(cls.preset_settings(preset, **changes), data_root, preset)

    @property
    def work_dir(self) -> Path:
        """``<data_root>/<suite name>``: the suite's own files (recipes, edited models)."""
        return self.data_root / self.name

    # -- the pool of models -------------------------------------------------------------
    @abstractmethod
    def build(self, progress: Progress) -> ModelPool:
        """Build or fetch the family or families (reuse what is built); return the pool."""

    # -- the pool of evaluation tasks ---------------------------------------------------
    @abstractmethod
    def evaluation(self, pool: ModelPool) -> Evaluation:
        """The evaluation tasks, loaded once for the whole run."""

    def member_metrics(self, pool: ModelPool, family: FamilyRef, member: str) -> list[str]:
        """The metrics member ``member``'s own model is scored on in the ``individual`` row
        (default: the metric named like the member)."""
        return [member]

    # -- methods ------------------------------------------------------------------------
    @abstractmethod
    def methods(self, pool: ModelPool) -> list[MethodSpec]:
        """The rows to compare, in table order."""

    def split_variants(self) -> dict[str, SplitSettings]:
        """Named decomposition settings; each family is decomposed once per variant that
        some method reads. Default: none."""
        return {}

    def score(self, metrics: Metrics) -> float:
        """One number per model (default: the mean of the metrics)."""
        return sum(metrics.values()) / len(metrics) if metrics else math.nan

    def choose(self, method: MethodSpec, trials: Sequence[Trial], base_val: Metrics) -> int:
        """Index of the chosen candidate, from validation only. Default: the best ``score``
        (first in grid order on ties). ``base_val`` is the base model's validation metrics
        (for rules such as "perplexity within 5% of the base")."""
        sign = 1.0 if self.higher_is_better else -1.0
        best = 0
        for i, trial in enumerate(trials):
            if sign * trial.score > sign * trials[best].score + 1e-12:
                best = i
        return best

    def begin_family(
        self, family: FamilyRef, tensors: FamilyTensors, evaluation: Evaluation
    ) -> None:
        """Called before a family's rows are scored (e.g. to read what ``choose`` compares
        against on this family, such as each member's own validation metrics); default
        nothing."""
        return None

    def diagnostics(
        self, family: FamilyRef, variant: str, tensors: FamilyTensors, run: str
    ) -> dict[str, Any] | None:
        """Extra facts about one family's split (e.g. shared-part alignment); default none."""
        return None

    # -- output -------------------------------------------------------------------------
    def export(self) -> Export | None:
        """The chosen edit to write with the edit flow (default: none)."""
        return None

    @abstractmethod
    def report(self, result: SuiteResult, context: Mapping[str, Any]) -> str:
        """The suite's section of RESULTS.md (markdown, starting with a ``##`` heading).
        ``context`` carries the command, timings and decomposition runs."""

    def artifacts(self, result: SuiteResult, folder: Path) -> list[Path]:
        """Extra files to log to MLflow (figures); default none."""
        return []

    def row_metrics(self, result: SuiteResult, row: str) -> dict[str, float]:
        """Extra metrics of one row for its nested MLflow run (beside the score and the
        per-metric means the flow logs); default none."""
        return {}

    def summary(self, result: SuiteResult) -> str:
        """What ``tvsplit evaluate`` prints at the end (default: the plain table)."""
        return result.markdown_table()
