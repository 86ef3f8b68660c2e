"""The vision suite through the generic suite flow (conftest.VISION_PRESETS: tiny in
`make test`, small under `slow`): what the pipeline adds to the suite (stored splits, the
exported edit, tracking). The accuracy claims are in test_vision_suite.py."""

from __future__ import annotations

import pytest
import torch
from tvsplit.tasks.decompose_job import stored_shared_parts
from tvsplit.tasks.suites.vision.merging import load_family, split_family
from tvsplit.tasks.suites.vision.suite import EXPORTED_ROW


@pytest.fixture(scope="module")
def outcome(vision_run):
    return vision_run


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
    """The edit flow's model folder scores what the suite measured for the same recipe, and
    its weights are θ0 + λ (Σ τ_i + γ Σ s_i) formed by hand from the zoo's model folders and
    the run's stored shared parts (the chosen λ, γ)."""
    from transformers import ConvNextModel

    ref = outcome.pool.families[0]
    record = outcome.result.record(EXPORTED_ROW, ref.label)
    assert outcome.result.exported["row"] == EXPORTED_ROW
    assert outcome.model_test.keys() == record.test.keys()
    for task, accuracy in record.test.items():
        assert outcome.model_test[task] == pytest.approx(accuracy, abs=1e-9), task

    zoo = outcome.pool.handle
    family = load_family(zoo.base_dir, zoo.members(zoo.seeds[0]))
    params = record.params
    assert (params["merge"], params["shared_as"]) == ("task_arithmetic", "each")
    shared = stored_shared_parts(_catalogue(outcome), ref.name, record.run, family.members)
    folder = ConvNextModel.from_pretrained(outcome.model_dir).state_dict()
    changed = 0
    for name, base in family.base.items():
        delta = sum(family.vectors[name]) + params["shared_weight"] * shared[name].sum(0)
        expected = base + params["scale"] * delta
        torch.testing.assert_close(folder[name], expected, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(folder[name], base)
    assert changed > len(family.base) // 2  # the edit moved the model, not a copy of the base


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
