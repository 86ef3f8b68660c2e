"""The vision suite through the whole pipeline at the small preset (real data, few steps)."""

from __future__ import annotations

import pytest
import torch
from tvsplit.flows.vision import EXPORTED_METHOD, vision_suite
from tvsplit.tasks.decompose_job import stored_shared_parts
from tvsplit.tasks.suites.vision.benchmark import BenchmarkConfig
from tvsplit.tasks.suites.vision.merging import load_family, split_family


@pytest.fixture(scope="module")
def outcome(prefect_harness, vision_data_root, tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("vision-pipeline")
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out}/mlflow.db")
    monkeypatch_module.setenv("TVSPLIT_ARTIFACTS", str(out / "artifacts"))
    return vision_suite(
        preset="small", data_root=str(vision_data_root), catalogue_url=str(out / "catalogue.zarr"),
        results_path=str(out / "RESULTS.md"), show_progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_individual_models_beat_the_base_on_their_own_task(outcome):
    result = outcome.result
    for seed in result.seeds:
        base, individual = result.record("base", seed).test, result.record("individual", seed).test
        for task in result.tasks:
            assert individual[task] > base[task], task


def test_merges_beat_the_base_on_average(outcome):
    result = outcome.result
    for seed in result.seeds:
        base = result.record("base", seed).test_average
        assert result.record("task_arithmetic", seed).test_average > base
        assert result.record("ties", seed).test_average > base


def test_pipeline_shared_parts_equal_direct_calls(outcome):
    """The shared parts the suite read back from the decomposition runs are the ones
    decompose_layer gives on the same task vectors."""
    zoo, seed = outcome.zoo, outcome.zoo.seeds[0]
    family = load_family(zoo.base_dir, zoo.members(seed))
    config = BenchmarkConfig.small()
    for variant in config.variants:
        direct = split_family(family, config.split_settings(variant))
        run = outcome.runs[(seed, variant)]
        stored = stored_shared_parts(
            _catalogue(outcome), zoo.family_name(seed), run, family.members
        )
        assert set(stored) == set(direct)
        for name in direct:
            torch.testing.assert_close(stored[name], direct[name], atol=1e-5, rtol=1e-4)


def _catalogue(outcome) -> str:
    return str(outcome.results_path.parent / "catalogue.zarr")


def test_edited_model_equals_the_suites_merge(outcome):
    """The edit flow's model folder scores what the suite measured for the same recipe."""
    record = outcome.result.record(EXPORTED_METHOD, outcome.zoo.seeds[0])
    assert outcome.model_test.keys() == record.test.keys()
    for task, accuracy in record.test.items():
        assert outcome.model_test[task] == pytest.approx(accuracy, abs=1e-9), task
    from transformers import ConvNextModel

    ConvNextModel.from_pretrained(outcome.model_dir)


def test_results_and_tracking(outcome):
    import mlflow

    text = outcome.results_path.read_text()
    assert "task_arithmetic" in text and "shared_ta[two-sided]" in text and "tsv_m" in text
    children = mlflow.search_runs(
        experiment_names=["tvsplit-vision"],
        filter_string=f"tags.mlflow.parentRunId = '{outcome.mlflow_run_id}'",
    )
    assert {"task_arithmetic", "ties", "shared_ta[one-sided]", "tsv_m"} <= set(
        children["tags.mlflow.runName"]
    )
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(outcome.mlflow_run_id)}
    assert {"vision_results.png", "results_table.md", "RESULTS.md"} <= artifacts
