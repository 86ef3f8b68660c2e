"""Split estimators: how a family's shared subspace is estimated from its members' bases.

One registry, in the pattern of `tasks.edit`: an estimator registers its name, a typed
parameter model, its subspace estimate, its chance level and its threshold rule::

    class MyParams(EstimatorParams):
        threshold: float = Field(0.5, gt=0, le=1, description="Cut on my eigenvalues.")

    @register_estimator(
        "my-estimator", params=MyParams, chance=my_chance,
        threshold=lambda params, members: params.threshold,
    )
    def my_estimate(bases, cut):  # (m × r_i orthonormal bases, the cut) -> (S, eigenvalues)
        ...

Then ``decompose_layer(..., method="my-estimator")``, ``SplitSettings(method=...)`` and the
``tvsplit decompose --method`` flag (its fields become flags too) know it. Another installed
package registers one through the ``tvsplit.estimators`` entry point group (`tvsplit.plugins`).

This module imports no torch, Prefect, Dask, Zarr or MLflow (``--help`` lists the
estimators in about a second): an estimate or chance function may be given as a
``"module:function"`` string, imported on first use. The built-in estimators are declared
that way (their math is in `tasks.subspaces`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class EstimatorError(ValueError):
    """An unknown estimator or a bad registration."""


class EstimatorParams(BaseModel):
    """Base of every estimator's parameter model (frozen; unknown fields are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ThresholdParams(EstimatorParams):
    """Eigenvalue threshold τ, or a number of members a direction must be shared by."""

    threshold: float = Field(
        0.85, gt=0, le=1, description="Eigenvalue threshold τ (ignored with min_tasks)."
    )
    min_tasks: int | None = Field(
        None, ge=1, description="Shared by at least this many members (overrides τ)."
    )


class PairwiseParams(EstimatorParams):
    """Per member: directions found in at least ``min_tasks`` − 1 other members."""

    min_tasks: int | None = Field(
        None, ge=1, description="Shared by at least this many members (default 2)."
    )


#: (params, members) → the cut applied to the eigenvalues; ValueError naming the field when
#: the parameters do not fit a family of that many members.
ThresholdRule = Callable[[Any, int], float]


@dataclass(frozen=True)
class Estimator:
    """A registered split estimator.

    ``estimate(bases, cut) -> (S, eigenvalues)``: S orthonormal (m × k) from the members'
    bases (m × r_i), or a tuple of per-member S_i when ``per_member``; ``chance(ranks, dim,
    like) -> level`` (a float, or one per member): how high the top eigenvalue gets for
    random subspaces of the same ranks; ``threshold(params, members) -> cut``.
    """

    name: str
    params: type[EstimatorParams]
    estimate_ref: Callable[..., Any] | str
    chance_ref: Callable[..., Any] | str
    threshold: ThresholdRule
    summary: str
    per_member: bool = False

    @property
    def estimate(self) -> Callable[..., Any]:
        return _resolve(self.estimate_ref)

    @property
    def chance(self) -> Callable[..., Any]:
        return _resolve(self.chance_ref)

    def parse(self, values: Mapping[str, Any] | EstimatorParams | None = None) -> Any:
        """Validate the estimator's parameters; pydantic's ValidationError names the field."""
        if isinstance(values, self.params):
            return values
        raw = values.model_dump() if isinstance(values, BaseModel) else dict(values or {})
        return self.params.model_validate(raw)

    def fields(self) -> tuple[str, ...]:
        return tuple(self.params.model_fields)


def _resolve(ref: Callable[..., Any] | str) -> Callable[..., Any]:
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, Estimator] = {}


def register_estimator(
    name: str,
    *,
    params: type[EstimatorParams],
    chance: Callable[..., Any] | str,
    threshold: ThresholdRule,
    estimate: Callable[..., Any] | str | None = None,
    per_member: bool = False,
    summary: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register split estimator ``name``; use as a decorator on the estimate function, or
    call with ``estimate=`` (a function or a ``"module:function"`` string)."""

    def add(function: Callable[..., Any] | str) -> Any:
        if name in _REGISTRY:
            raise EstimatorError(f"split estimator {name!r} is already registered")
        if not (isinstance(params, type) and issubclass(params, EstimatorParams)):
            raise EstimatorError(f"split estimator {name!r}: params must be an EstimatorParams")
        doc = "" if isinstance(function, str) else (function.__doc__ or "")
        text = summary or (doc.strip().splitlines()[0] if doc.strip() else "")
        _REGISTRY[name] = Estimator(
            name, params, function, chance, threshold, text, per_member=per_member
        )
        return function

    if estimate is not None:
        add(estimate)
        return lambda function: function
    return add


def available_estimators() -> tuple[str, ...]:
    """Names of the registered estimators (built-ins first, then plugins, in order)."""
    _load_plugins()
    return tuple(_REGISTRY)


def get_estimator(name: str) -> Estimator:
    """The registered estimator ``name``; EstimatorError listing the known names otherwise."""
    if name not in _REGISTRY:
        _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EstimatorError(
            f"unknown split method {name!r}; known methods: {', '.join(_REGISTRY)}"
        ) from None


def estimator_fields() -> dict[str, Any]:
    """Every registered estimator's parameter fields (name → pydantic FieldInfo; the first
    declaration of a name wins): the settings a split can carry besides the basis ones."""
    fields: dict[str, Any] = {}
    for name in available_estimators():
        for field, info in _REGISTRY[name].params.model_fields.items():
            fields.setdefault(field, info)
    return fields


def _load_plugins() -> None:
    from tvsplit.plugins import load_entry_points

    load_entry_points("tvsplit.estimators")


# --------------------------------------------------------------------------- threshold rules


def _check_min_tasks(params: Any, members: int) -> None:
    if params.min_tasks is not None and not 1 <= params.min_tasks <= members:
        raise ValueError(f"min_tasks must be between 1 and {members}, not {params.min_tasks}")


def mean_projector_cut(params: ThresholdParams, members: int) -> float:
    """τ, or (j − ½)/T for ``min_tasks=j``: an eigenvalue of the mean projector counts the
    members (as a fraction of T) a direction lies in."""
    _check_min_tasks(params, members)
    return params.threshold if params.min_tasks is None else (params.min_tasks - 0.5) / members


def projector_product_cut(params: ThresholdParams, members: int) -> float:
    """τ; the product finds directions in every member, so ``min_tasks`` may only be T."""
    _check_min_tasks(params, members)
    if params.min_tasks not in (None, members):
        raise ValueError(
            f"projector-product finds only directions shared by all {members} members; "
            f"min_tasks={params.min_tasks} needs mean-projector or pairwise"
        )
    return params.threshold


def pairwise_cut(params: PairwiseParams, members: int) -> float:
    """j − 1.5 for ``min_tasks=j`` (default 2): a pairwise eigenvalue counts the other
    members a direction lies in."""
    _check_min_tasks(params, members)
    return (2 if params.min_tasks is None else params.min_tasks) - 1.5


register_estimator(
    "mean-projector",
    params=ThresholdParams,
    estimate="tvsplit.tasks.subspaces:mean_projector",
    chance="tvsplit.tasks.subspaces:mean_projector_chance_like",
    threshold=mean_projector_cut,
    summary="eigenvectors of the mean of the members' projectors (default; order-free)",
)
register_estimator(
    "projector-product",
    params=ThresholdParams,
    estimate="tvsplit.tasks.subspaces:projector_product",
    chance="tvsplit.tasks.subspaces:projector_product_chance",
    threshold=projector_product_cut,
    summary="singular vectors of the product of the projectors (shared by every member)",
)
register_estimator(
    "pairwise",
    params=PairwiseParams,
    estimate="tvsplit.tasks.subspaces:pairwise_cut",
    chance="tvsplit.tasks.subspaces:pairwise_chance",
    threshold=pairwise_cut,
    per_member=True,
    summary="per member, the directions other members share with it",
)
