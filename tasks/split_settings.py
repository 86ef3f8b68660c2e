"""``SplitSettings``: everything that determines a split, declared once.

The settings model of ``decompose_layer`` (re-exported by `tasks.decompose` beside it and by
`tasks.decompose_job`), of the decomposition flow and of the ``tvsplit decompose`` flags,
which are generated from it (`flows.settings_cli`). Its fields are the basis settings
(rank rule, cap, side, seed, solver), the split settings (method, two-sided, 1-D policy) and
the chosen estimator's own parameters (``threshold`` and ``min_tasks`` for the built-in
ones), validated by that estimator's parameter model and stored flat beside the others, so
a stored run's settings read the same whatever the estimator.

Imports pydantic and the estimator declarations only (no torch, Prefect, Dask, Zarr or
MLflow): an in-memory benchmark or ``--help`` names settings without the engines.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from tvsplit.tasks.estimators import EstimatorError, estimator_fields, get_estimator
from tvsplit.tasks.rank_rule import RankRuleError, parse_rank_rule

BASIS_FIELDS = ("rank", "max_rank_fraction", "side", "seed", "solver")
SPLIT_FIELDS = ("method", "two_sided", "one_d")


def digest(value: Any, length: int) -> str:
    """A short sha256 of a JSON-able value (keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _field_error(field: str, value: Any, message: str) -> ValidationError:
    """A validation error located at `field` (so it is reported as ``field: message``)."""
    return ValidationError.from_exception_data(
        "SplitSettings",
        [{"type": "value_error", "loc": (field,), "input": value, "ctx": {"error": message}}],
    )


class SplitSettings(BaseModel):
    """Everything that determines a split (the arguments of ``decompose_layer``).

    ``SplitSettings(method="mean-projector", threshold=0.9)``: the estimator's parameters
    are given as keyword fields like the others; a field the chosen estimator does not
    declare is an error naming it. ``model_dump()`` carries every field, the estimator's
    defaults included."""

    model_config = ConfigDict(frozen=True, extra="allow")

    method: str = Field(
        "mean-projector", description="Split estimator (registered in tasks.estimators)."
    )
    rank: str = Field(
        "gavish-donoho", description="Rank rule: gavish-donoho | energy:E | fixed:R | fraction:F."
    )
    max_rank_fraction: float = Field(
        0.25, gt=0, le=1, description="Cap on each member's rank (share of the short side)."
    )
    side: Literal["left", "right", "auto"] = Field(
        "left", description="Space split: left | right | auto (auto: the smaller dimension)."
    )
    two_sided: bool = Field(False, description="Also project on the right singular space.")
    one_d: Literal["unique", "rank1"] = Field("unique", description="1-D parameters.")
    seed: int = Field(0, description="Seed of the randomized sketches.")
    solver: Literal["auto", "full", "randomized"] = Field(
        "auto", description="SVD solver (auto: a randomized sketch for large matrices)."
    )

    @field_validator("rank")
    @classmethod
    def _rank_rule(cls, value: str) -> str:
        """A rule `tasks.rank_rule` parses, with its value in range (checked before any job)."""
        try:
            parse_rank_rule(value)
        except RankRuleError as error:
            raise ValueError(str(error)) from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _estimator_parameters(cls, data: Any) -> Any:
        """Validate the fields outside the model by the chosen estimator's parameter model
        and store them flat, with its defaults filled in."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        method = data.get("method", cls.model_fields["method"].default)
        try:
            estimator = get_estimator(str(method))
        except EstimatorError as error:
            raise _field_error("method", method, str(error)) from None
        own = {key: data.pop(key) for key in list(data) if key not in cls.model_fields}
        foreign = sorted(set(own) - set(estimator.fields()) & set(estimator_fields()))
        if foreign:
            raise _field_error(
                foreign[0],
                own[foreign[0]],
                f"not a setting of {estimator.name} (its settings: "
                f"{', '.join(estimator.fields()) or 'none'})",
            )
        return {**data, **estimator.parse(own).model_dump()}

    def estimator_params(self) -> dict[str, Any]:
        """The chosen estimator's parameters (``threshold``, ``min_tasks``, ...)."""
        return dict(self.model_extra or {})

    def basis_key(self) -> str:
        """Key of the settings a member basis depends on (rank rule, cap, side, seed, solver).
        The prefix names the cache layout: ``b2`` packs (``b-`` folders of the per-member
        layout are never read)."""
        return "b2-" + digest({name: getattr(self, name) for name in BASIS_FIELDS}, 12)

    def split_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``split_from_bases``."""
        return {**{name: getattr(self, name) for name in SPLIT_FIELDS}, **self.estimator_params()}

    def basis_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``member_basis``."""
        return {name: getattr(self, name) for name in BASIS_FIELDS}
