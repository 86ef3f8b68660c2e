"""The generic suite flow on a small real suite (tests/toy_suite.py): build → ingest →
decompose → choice on validation → test → the chosen edit written and scored → MLflow
parent + nested runs → its own RESULTS.md section; and `tvsplit evaluate`."""

from __future__ import annotations

import pytest
import torch
import toy_suite
import yaml
from fixtures_models import finetuned_copy
from safetensors.torch import load_file
from tvsplit.flows.suite import suite_flow
from tvsplit.tasks.suites.results import read_section, replace_section
from typer.testing import CliRunner

from tvsplit.cli import app


@pytest.fixture(scope="module")
def toy(repos, tmp_path_factory):
    """A three-member family and the toy suite pointed at it; one catalogue for the module
    (later runs reuse its entries and decompositions)."""
    root = tmp_path_factory.mktemp("suite-flow")
    members = {
        name: str(finetuned_copy(repos.base, root / name, seed=i + 3))
        for i, name in enumerate(("a", "b", "c"))
    }
    spec = root / "spec.yaml"
    spec.write_text(
        yaml.safe_dump({"families": {"toyfam": {"base": str(repos.base), "members": members}}})
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(toy_suite.ToySuite, "SPEC", spec)
        patch.setenv("TVSPLIT_DATA", str(root / "data"))
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        patch.setenv("TVSPLIT_ARTIFACTS", str(root / "artifacts"))
        yield root


def test_generic_flow_runs_a_suite_end_to_end(toy, prefect_harness, fake_credentials):
    import mlflow

    results = toy / "RESULTS.md"
    results.write_text(replace_section("", "other", "## Other suite\n\nkeep me"))
    before = results.read_text()
    run = suite_flow("toy", preset="small", results_path=str(results), workers=1,
                     show_progress=False)  # fmt: skip
    result = run.result
    assert result.rows == ["base", "individual", "task_arithmetic", "shared_ta"]
    assert result.record("base", "toyfam").test == pytest.approx({"a": 0, "b": 0, "c": 0})
    individual = result.record("individual", "toyfam")
    assert individual.test == pytest.approx({"a": 100.0, "b": 100.0, "c": 100.0})
    # the choice read validation only: the chosen λ is the grid's best validation score
    ta = result.record("task_arithmetic", "toyfam")
    assert ta.candidates == 2 and ta.params in ({"scale": 0.5}, {"scale": 1.0})
    assert ta.test_score > 0  # closer to the members than the base is
    shared = result.record("shared_ta", "toyfam")
    assert shared.run == result.runs["toyfam/mean"]
    # the exported edit is the chosen row, written by the edit flow, and scores the same
    assert result.exported["row"] == "shared_ta"
    assert run.model_test == pytest.approx(shared.test, abs=1e-6)
    written = load_file(str(run.model_dir / "model.safetensors"))
    assert written and all(torch.isfinite(t).all() for t in written.values())
    # its own section, the other suite's kept byte for byte
    text = results.read_text()
    assert "## Toy suite" in read_section(text, "toy")
    assert text.startswith(before.rstrip("\n").split("<!-- tvsplit:suite toy")[0])
    assert read_section(text, "other") == "## Other suite\n\nkeep me"
    children = mlflow.search_runs(
        experiment_names=["tvsplit-toy"],
        filter_string=f"tags.mlflow.parentRunId = '{run.mlflow_run_id}'",
    )
    assert set(children["tags.mlflow.runName"]) == set(result.rows)
    assert children["metrics.score"].notna().all()
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.mlflow_run_id)}
    assert {"results_table.md", "RESULTS.md", "results.json"} <= artifacts
    _assert_tracked_contents(run, results)
    assert fake_credentials(toy) == []  # mlflow.db, artifacts, catalogue, models

    again = suite_flow("toy", preset="small", results_path=str(results), workers=1,
                       show_progress=False, track=False)  # fmt: skip
    assert again.runs == run.runs  # finished decompositions are reused
    assert [r.test for r in again.result.records] == [r.test for r in result.records]


def _assert_tracked_contents(run, results) -> None:
    """What the parent and nested runs hold, read back: params, every row's metrics, the
    artifacts' contents (the table, the section, the records) against the suite's result."""
    import json
    import math

    import mlflow

    result, uri = run.result, f"runs:/{run.mlflow_run_id}"
    params = mlflow.get_run(run.mlflow_run_id).data.params
    assert (params["suite"], params["preset"], params["families"]) == ("toy", "small", "toyfam")
    assert json.loads(params["settings"]) == json.loads(json.dumps(result.settings))
    children = mlflow.MlflowClient().search_runs(
        [mlflow.get_run(run.mlflow_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run.mlflow_run_id}'",
    )
    for child in children:
        row, metrics = child.info.run_name, child.data.metrics
        scores = result.scores(row)
        assert metrics["score"] == pytest.approx(sum(scores) / len(scores)), row
        for metric in result.metrics:
            assert metrics[f"test/{metric}"] == pytest.approx(
                result.metric_summary(row, metric)[0]
            ), (row, metric)
        chosen = json.loads(child.data.params["chosen_params"])
        assert chosen == [result.record(row, f).params for f in result.families], row
        assert all(math.isfinite(v) for v in metrics.values())
    assert mlflow.artifacts.load_text(f"{uri}/results_table.md") == result.markdown_table()
    assert mlflow.artifacts.load_text(f"{uri}/RESULTS.md") == read_section(
        results.read_text(), "toy"
    )
    stored = mlflow.artifacts.load_dict(f"{uri}/results.json")
    assert stored["records"] == json.loads(json.dumps([r.__dict__ for r in result.records]))
    assert stored["runs"] == result.runs and stored["exported"]["row"] == "shared_ta"


def test_evaluate_lists_suites_and_names_bad_ones(toy):
    listed = CliRunner().invoke(app, ["evaluate", "--list"])
    assert listed.exit_code == 0 and "vision" in listed.output and "toy" in listed.output
    assert "small, full" in listed.output
    bad = CliRunner().invoke(app, ["evaluate", "nope"])
    assert bad.exit_code == 1 and "no suite 'nope'" in bad.output and "vision" in bad.output
    bad = CliRunner().invoke(app, ["evaluate", "toy", "--preset", "huge"])
    assert bad.exit_code == 1 and "no preset 'huge'" in bad.output
    assert "Traceback" not in bad.output


def test_evaluate_runs_the_suite_through_the_cli(toy, prefect_harness):
    results = toy / "cli-RESULTS.md"
    done = CliRunner().invoke(
        app, ["evaluate", "toy", "--preset", "small", "--results", str(results), "--no-track",
              "--workers", "1"],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "`shared_ta`" in done.output and "section 'toy'" in done.output
    assert "tvsplit evaluate toy --preset small" in read_section(results.read_text(), "toy")
