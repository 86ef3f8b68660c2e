"""The vision suite through the generic suite flow at the small preset (real data, few
steps): what the pipeline adds to the suite (stored splits, the exported edit, tracking)."""

from __future__ import annotations

import pytest
import torch
from tvsplit.tasks.decompose_job import stored_shared_parts
from tvsplit.tasks.suites.vision.merging import load_family, split_family
from tvsplit.tasks.suites.vision.suite import EXPORTED_ROW


@pytest.fixture(scope="module")
def outcome(vision_run):
    return vision_run


def test_individual_models_beat_the_base_on_their_own_task(outcome):
    result = outcome.result
    for seed in result.families:
        base, individual = result.record("base", seed).test, result.record("individual", seed).test
        for task in result.metrics:
            assert individual[task] > base[task], task


def test_merges_beat_the_base_on_average(outcome):
    result = outcome.result
    for seed in result.families:
        base = result.record("base", seed).test_score
        assert result.record("task_arithmetic", seed).test_score > base
        assert result.record("ties", seed).test_score > base


def test_pipeline_shared_parts_equal_direct_calls(outcome):
    """The shared parts the suite read back from the decomposition runs are the ones
    decompose_layer gives on the same task vectors."""
    zoo, family_ref = outcome.pool.handle, outcome.pool.families[0]
    family = load_family(zoo.base_dir, zoo.members(zoo.seeds[0]))
    assert family_ref.name == zoo.family_name(zoo.seeds[0])
    for variant, settings in outcome.suite.split_variants().items():
        direct = split_family(family, settings)
        run = outcome.runs[(family_ref.name, variant)]
        stored = stored_shared_parts(_catalogue(outcome), family_ref.name, run, family.members)
        assert set(stored) == set(direct)
        for name in direct:
            torch.testing.assert_close(stored[name], direct[name], atol=1e-5, rtol=1e-4)


def _catalogue(outcome) -> str:
    return str(outcome.results_path.parent / "catalogue.zarr")


def test_edited_model_equals_the_suites_merge(outcome):
    """The edit flow's model folder scores what the suite measured for the same recipe."""
    record = outcome.result.record(EXPORTED_ROW, outcome.pool.families[0].label)
    assert outcome.result.exported["row"] == EXPORTED_ROW
    assert outcome.model_test.keys() == record.test.keys()
    for task, accuracy in record.test.items():
        assert outcome.model_test[task] == pytest.approx(accuracy, abs=1e-9), task
    from transformers import ConvNextModel

    ConvNextModel.from_pretrained(outcome.model_dir)


def test_results_and_tracking(outcome):
    import mlflow
    from tvsplit.tasks.suites.results import read_section

    section = read_section(outcome.results_path.read_text(), "vision")
    assert section.startswith("## Vision suite")
    assert "task_arithmetic" in section and "shared_ta[two-sided]" in section
    assert "tsv_m" in section
    children = mlflow.search_runs(
        experiment_names=["tvsplit-vision"],
        filter_string=f"tags.mlflow.parentRunId = '{outcome.mlflow_run_id}'",
    )
    assert set(outcome.result.rows) == set(children["tags.mlflow.runName"])
    assert children["metrics.normalized"].notna().all()
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(outcome.mlflow_run_id)}
    assert {"vision_results.png", "results_table.md", "RESULTS.md"} <= artifacts
