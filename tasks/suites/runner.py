"""The suite runner: every row of a suite on every family of its pool, coefficients chosen on
validation, the chosen candidate scored on test (plain functions; the generic flow
``flows.suite`` wires them to ingest, decomposition, the edit flow and MLflow).

Guarantees:

- the test split is read only for a row's chosen candidate (``Suite.choose`` sees validation
  metrics only);
- an edit row's model is ``FamilyTensors.state``: θ0 + the registered ``tasks.edit`` method
  on every family parameter, exactly the tensors the edit flow writes for the same recipe
  (``export_recipe``);
- deterministic for a suite, its settings and its catalogue entries; rows and families keep
  the suite's order.

No Prefect, Dask or MLflow here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from tvsplit.tasks.suites.base import (
    Evaluation,
    Export,
    FamilyRef,
    MethodSpec,
    ModelPool,
    Progress,
    Record,
    Suite,
    SuiteError,
    SuiteResult,
    Trial,
)


def variants_used(suite: Suite, methods: Sequence[MethodSpec]) -> dict[str, Any]:
    """The split variants (name → ``SplitSettings``) some method reads, in the suite's order;
    SuiteError when a method names a variant the suite does not declare."""
    declared = suite.split_variants()
    for method in methods:
        if method.variant is not None and method.variant not in declared:
            raise SuiteError(
                f"suite {suite.name!r}: row {method.row!r} reads split variant "
                f"{method.variant!r}, which is not one of {sorted(declared)}"
            )
    wanted = {m.variant for m in methods if m.variant is not None}
    return {name: settings for name, settings in declared.items() if name in wanted}


def restrict_pool(pool: ModelPool, families: Sequence[str] | None) -> ModelPool:
    """The pool with only the named families (catalogue names or labels), in pool order;
    SuiteError naming the pool's families when one is not in it."""
    if not families:
        return pool
    known = {f.name for f in pool.families} | {f.label for f in pool.families}
    missing = [name for name in families if name not in known]
    if missing:
        raise SuiteError(
            f"family(ies) {', '.join(missing)} not in the suite's pool "
            f"({', '.join(f.name for f in pool.families)})"
        )
    kept = tuple(f for f in pool.families if f.name in families or f.label in families)
    spec = dict(pool.spec)
    spec["families"] = {
        name: entry
        for name, entry in pool.spec["families"].items()
        if name in {f.name for f in kept}
    }
    return replace(pool, spec=spec, families=kept)


def _score(suite: Suite, metrics: Mapping[str, float]) -> float:
    return suite.score(dict(metrics))


def _edit_state(tensors: Any, method: MethodSpec, params: Mapping[str, Any], run: str | None):
    return tensors.state(
        method.edit, params, members=method.members, member_params=method.member_params, run=run
    )


def evaluate_family(
    suite: Suite,
    pool: ModelPool,
    family: FamilyRef,
    tensors: Any,
    evaluation: Evaluation,
    methods: Sequence[MethodSpec],
    runs: Mapping[str, str],
    progress: Progress = lambda message: None,
) -> tuple[list[Record], dict[str, Any]]:
    """Every row on one family. ``tensors``: the family's ``FamilyTensors``; ``runs``:
    split variant → decomposition run id of this family. Returns the records in row order
    and the suite's diagnostics per variant."""
    from tvsplit.tasks.suites.edited import member_model

    records: list[Record] = []

    def add(record: Record) -> None:
        records.append(record)
        progress(
            f"{family.label}: {record.row:<24} test {record.test_score:6.2f}  "
            f"val {record.val_score:6.2f}  {record.params}"
        )

    suite.begin_family(family, tensors, evaluation)
    base_val = evaluation.evaluate(tensors.base, "val")
    for method in methods:
        run = runs[method.variant] if method.variant is not None else None
        if method.edit == "base":
            test = evaluation.evaluate(tensors.base, "test")
            add(
                Record(
                    method.row, family.label, {}, base_val, test,
                    _score(suite, base_val), _score(suite, test),
                )
            )  # fmt: skip
            continue
        if method.edit == "individual":
            val: dict[str, float] = {}
            test = {}
            for member in method.members or family.members:
                model = member_model(tensors, family.members[member], member)
                metrics = suite.member_metrics(pool, family, member)
                val |= evaluation.evaluate(model, "val", metrics)
                test |= evaluation.evaluate(model, "test", metrics)
            add(
                Record(
                    method.row, family.label, {}, val, test,
                    _score(suite, val), _score(suite, test),
                )
            )  # fmt: skip
            continue
        trials: list[Trial] = []
        best_state, best_index = None, -1
        for params in method.grid:
            state = _edit_state(tensors, method, params, run)
            val = evaluation.evaluate(state, "val")
            trials.append(Trial(dict(params), val, _score(suite, val)))
            if suite.choose(method, trials, base_val) == len(trials) - 1:
                best_state, best_index = state, len(trials) - 1  # keep only the leader
            del state
        chosen = suite.choose(method, trials, base_val)
        if chosen != best_index:  # a rule that looks back at earlier candidates
            best_state = _edit_state(tensors, method, method.grid[chosen], run)
        test = evaluation.evaluate(best_state, "test")
        trial = trials[chosen]
        add(
            Record(
                method.row, family.label, trial.params, trial.val, test, trial.score,
                _score(suite, test), len(trials), run,
            )
        )  # fmt: skip
    diagnostics = {}
    for variant, run in runs.items():
        found = suite.diagnostics(family, variant, tensors, run)
        if found is not None:
            diagnostics[f"{family.label}/{variant}"] = found
    return records, diagnostics


def evaluate_pool(
    suite: Suite,
    pool: ModelPool,
    catalogue_url: str,
    runs: Mapping[tuple[str, str], str],
    evaluation: Evaluation | None = None,
    progress: Progress = lambda message: None,
) -> SuiteResult:
    """Every row on every family of ``pool`` (read from the catalogue at ``catalogue_url``);
    ``runs``: (family name, variant) → decomposition run id."""
    from tvsplit.tasks.suites.edited import FamilyTensors

    evaluation = evaluation if evaluation is not None else suite.evaluation(pool)
    methods = suite.methods(pool)
    variants = variants_used(suite, methods)
    result = SuiteResult(
        suite.name,
        suite.preset,
        tuple(f.label for f in pool.families),
        settings=suite.settings.model_dump(mode="json"),
        runs={f"{f.label}/{v}": runs[(f.name, v)] for f in pool.families for v in variants},
    )
    for family in pool.families:
        tensors = FamilyTensors(catalogue_url, family.name, list(family.members))
        family_runs = {v: runs[(family.name, v)] for v in variants}
        records, diagnostics = evaluate_family(
            suite, pool, family, tensors, evaluation, methods, family_runs, progress
        )
        result.records += records
        result.diagnostics |= diagnostics
        del tensors
    return result


def export_recipe(
    suite: Suite, pool: ModelPool, result: SuiteResult, export: Export
) -> dict[str, Any]:
    """The edit recipe (``tvsplit edit`` YAML data) of ``export``'s chosen row and family."""
    try:
        family = pool.families[export.family]
    except IndexError:
        raise SuiteError(
            f"suite {suite.name!r} exports family #{export.family}; the pool has "
            f"{len(pool.families)}"
        ) from None
    methods = {m.row: m for m in suite.methods(pool)}
    method = methods.get(export.row)
    if method is None or method.is_reference:
        raise SuiteError(f"suite {suite.name!r} exports {export.row!r}, which is not an edit row")
    record = result.record(export.row, family.label)
    members = method.members or tuple(family.members)
    recipe: dict[str, Any] = {
        "base": family.base,
        "family": family.name,
        "method": method.edit,
        "members": [
            {"name": m, "weight": 1.0, **dict((method.member_params or {}).get(m, {}))}
            for m in members
        ],
        "params": dict(record.params),
    }
    if method.variant is not None:
        recipe["decomposition"] = result.runs[f"{family.label}/{method.variant}"]
    return recipe
