"""The split-estimator registry, SplitSettings and the generated `tvsplit decompose` flags."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from pydantic import Field, ValidationError
from tvsplit.flows.cli import app
from tvsplit.tasks import estimators
from tvsplit.tasks.decompose import DecompositionError, decompose_layer
from tvsplit.tasks.estimators import EstimatorParams, available_estimators, register_estimator
from tvsplit.tasks.split_settings import SplitSettings
from typer.testing import CliRunner


class KeepParams(EstimatorParams):
    keep: int = Field(1, ge=1, description="Directions of the first member kept.")


@pytest.fixture
def first_member_estimator():
    """A toy estimator: the first member's top `keep` directions are 'shared'."""

    @register_estimator(
        "first-member",
        params=KeepParams,
        chance=lambda ranks, dim, like: 0.0,
        threshold=lambda params, members: float(params.keep),
    )
    def first_member(bases, cut):
        """The first member's leading directions."""
        return bases[0][:, : int(cut)], torch.ones(bases[0].shape[1], dtype=bases[0].dtype)

    yield "first-member"
    estimators._REGISTRY.pop("first-member")


def test_a_registered_estimator_splits_exactly_and_validates_its_parameters(
    first_member_estimator,
) -> None:
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 24, 16, generator=g, dtype=torch.float64)
    split = decompose_layer(deltas, method=first_member_estimator, keep=2, rank="fixed:3")
    assert split.k == 2 and split.method == first_member_estimator
    assert torch.allclose(split.shared + split.unique, deltas, atol=1e-12)
    for i in range(3):  # Frobenius-orthogonal parts
        assert abs(float((split.shared[i] * split.unique[i]).sum())) < 1e-10
    with pytest.raises(DecompositionError, match="keep: Input should be greater than or equal"):
        decompose_layer(deltas, method=first_member_estimator, keep=0)
    with pytest.raises(DecompositionError, match="has no parameter 'density'"):
        decompose_layer(deltas, method=first_member_estimator, density=0.5)
    settings = SplitSettings(method=first_member_estimator, keep=2, rank="fixed:3")
    assert settings.estimator_params() == {"keep": 2}
    assert settings.split_kwargs()["keep"] == 2
    assert decompose_layer(deltas, settings=settings).k == 2


def test_split_settings_validate_by_the_chosen_estimator() -> None:
    default = SplitSettings()
    # The stored form of a run's settings (and so its run id) is what it was before the
    # registry: the estimator's parameters sit flat beside the basis settings.
    assert set(default.model_dump()) == {
        "method", "threshold", "min_tasks", "rank", "max_rank_fraction", "side",
        "two_sided", "one_d", "seed", "solver",
    }  # fmt: skip
    assert default.threshold == 0.85 and SplitSettings(min_tasks=2).min_tasks == 2
    assert "threshold" not in SplitSettings(method="pairwise").model_dump()
    for data, where in (
        ({"threshold": 1.5}, "threshold"),
        ({"method": "pairwise", "threshold": 0.5}, "threshold"),
        ({"method": "svd"}, "method"),
        ({"thresold": 0.5}, "thresold"),
    ):
        with pytest.raises(ValidationError) as caught:
            SplitSettings(**data)
        assert [e["loc"] for e in caught.value.errors()] == [(where,)]


def test_registry_and_settings_import_without_the_engines() -> None:
    code = (
        "import sys\n"
        "import tvsplit.tasks.split_settings, tvsplit.tasks.estimators\n"
        "from tvsplit.tasks.estimators import available_estimators\n"
        "assert len(available_estimators()) >= 3\n"
        "heavy = [m for m in ('torch', 'prefect', 'dask', 'zarr', 'mlflow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_decompose_flags_are_generated_from_the_settings() -> None:
    runner = CliRunner()
    text = runner.invoke(app, ["decompose", "--help"], env={"COLUMNS": "200"}).output
    flags = {*SplitSettings.model_fields, *estimators.estimator_fields()}
    for name in flags:
        assert "--" + name.replace("_", "-") in text, name
    for method in available_estimators():
        assert method in text
    bad = runner.invoke(app, ["decompose", "fam", "--threshold", "1.5"])
    assert bad.exit_code == 1 and "--threshold: Input should be less than or equal to 1" in (
        bad.output
    )
    foreign = runner.invoke(app, ["decompose", "fam", "--method", "pairwise", "--threshold", "0.5"])
    assert foreign.exit_code == 1 and "not a setting of pairwise" in foreign.output
    unknown = runner.invoke(app, ["decompose", "fam", "--method", "svd"])
    assert unknown.exit_code != 0 and "svd" in unknown.output
