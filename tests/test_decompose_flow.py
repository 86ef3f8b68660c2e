"""The decomposition flow on a threaded LocalCluster, against direct calls of the engine."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import tvsplit.tasks.decompose_job as job
from tvsplit.flows.decompose import DecomposeError, run_decompose
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.decompositions import DecompositionRun, list_runs
from tvsplit.tasks.decompose import decompose_layer, split_from_arrays
from tvsplit.tasks.decompose_job import SplitSettings
from tvsplit.tasks.synthetic import planted_family

PARAMS = {
    "blocks.0.mlp.weight": (40, 24),
    "blocks.0.attn.weight": (24, 24),
    "blocks.0.norm.weight": (24,),
}


def _vectors(members: int) -> dict[str, torch.Tensor]:
    out = {}
    for index, (name, shape) in enumerate(PARAMS.items()):
        if len(shape) == 2:
            fam = planted_family(
                *shape, members, shared_rank=2, unique_rank=2, noise=0.02, seed=index
            )
            out[name] = fam.deltas
        else:
            out[name] = torch.randn(members, *shape, generator=torch.Generator().manual_seed(index))
    return out


@pytest.fixture
def catalogue(tmp_path) -> Catalogue:
    """A family 'fam' with a base and four members m0..m3 written straight into the catalogue."""
    cat = Catalogue(str(tmp_path / "catalogue.zarr"))
    vectors = _vectors(4)
    entries = [(None, {n: torch.zeros(s) for n, s in PARAMS.items()})]
    entries += [(f"m{i}", {n: v[i] for n, v in vectors.items()}) for i in range(4)]
    for member, tensors in entries:
        writer = cat.writer("fam", member, {"source": f"synthetic:{member}"})
        for name, tensor in tensors.items():
            writer.write(name, tensor, {"source": "synthetic"})
        writer.finish(list(tensors), {"source": f"synthetic:{member}"})
    return cat


def _run(catalogue, **kwargs):
    kwargs.setdefault("track", False)
    kwargs.setdefault("show_progress", False)
    return run_decompose("fam", catalogue_url=catalogue.url, workers=2, **kwargs)


def test_flow_equals_direct_calls(prefect_harness, catalogue):
    settings = SplitSettings(min_tasks=2)
    members = ["m0", "m1", "m2"]
    result = _run(catalogue, members=members, settings=settings)
    assert sorted(result.computed) == sorted(PARAMS) and not result.failed
    assert result.bases_computed == len(PARAMS) * 3
    store = DecompositionRun(catalogue, "fam", result.run)
    assert store.attrs()["status"] == "complete"
    for name in PARAMS:
        deltas = torch.stack([catalogue.read("fam", name, member=m) for m in members])
        direct = decompose_layer(deltas, min_tasks=2)
        stored = store.read_parameter(name)
        rebuilt = split_from_arrays(stored.arrays, stored.diagnostics, deltas)
        assert stored.diagnostics["k"] == direct.k
        assert torch.allclose(rebuilt.shared, direct.shared, atol=1e-6)
        assert torch.allclose(rebuilt.unique, direct.unique, atol=1e-6)
    runs = dict(list_runs(catalogue, "fam"))
    assert runs[result.run]["settings"]["min_tasks"] == 2


def test_rerun_skips_everything(prefect_harness, catalogue):
    first = _run(catalogue)
    again = _run(catalogue)
    assert again.run == first.run
    assert again.computed == [] and sorted(again.skipped) == sorted(PARAMS)
    assert again.bases_computed == 0


def test_adding_a_member_computes_only_its_bases(prefect_harness, catalogue):
    first = _run(catalogue, members=["m0", "m1", "m2"])
    grown = _run(catalogue, members=["m0", "m1", "m2", "m3"])
    assert grown.run != first.run
    assert grown.bases_computed == len(PARAMS)  # one new basis per parameter, for m3 only


def test_a_job_that_fails_once_is_retried(prefect_harness, catalogue, monkeypatch):
    real = job.split_from_bases
    calls: dict[str, int] = {}

    def flaky(deltas, bases, *, name, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        if name == "blocks.0.attn.weight" and calls[name] == 1:
            raise OSError("worker lost its connection")
        return real(deltas, bases, name=name, **kwargs)

    monkeypatch.setattr(job, "split_from_bases", flaky)
    result = _run(catalogue)
    assert calls["blocks.0.attn.weight"] == 2
    assert sorted(result.computed) == sorted(PARAMS) and not result.failed


def test_a_parameter_that_keeps_failing_is_reported_and_the_rest_kept(
    prefect_harness, catalogue, monkeypatch
):
    real = job.split_from_bases

    def broken(deltas, bases, *, name, **kwargs):
        if name == "blocks.0.mlp.weight":
            raise OSError("disk on fire")
        return real(deltas, bases, name=name, **kwargs)

    monkeypatch.setattr(job, "split_from_bases", broken)
    with pytest.raises(
        DecomposeError, match=r"1 of 3 parameter\(s\) failed.*blocks.0.mlp.weight.*disk on fire"
    ):
        _run(catalogue)
    ((run, attrs),) = list_runs(catalogue, "fam")
    assert attrs["status"] == "partial"
    assert DecompositionRun(catalogue, "fam", run).completed() == set(PARAMS) - {
        "blocks.0.mlp.weight"
    }
    monkeypatch.setattr(job, "split_from_bases", real)
    resumed = _run(catalogue)
    assert resumed.run == run and resumed.computed == ["blocks.0.mlp.weight"]


def test_unknown_family_and_member(prefect_harness, catalogue):
    with pytest.raises(DecomposeError, match=r"no family 'nope'.*families: fam"):
        run_decompose("nope", catalogue_url=catalogue.url, track=False, show_progress=False)
    with pytest.raises(DecomposeError, match=r"no complete member 'm9'.*m0, m1, m2, m3"):
        _run(catalogue, members=["m0", "m9"])
    with pytest.raises(DecomposeError, match="at least 2 members"):
        _run(catalogue, members=["m0"])


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU"
)
def test_gpu_is_refused_without_a_gpu_worker(catalogue):
    with pytest.raises(DecomposeError, match="no CUDA device"):
        _run(catalogue, gpu=True)


def test_gpu_is_refused_when_no_worker_offers_one(catalogue):
    from distributed import LocalCluster

    with (
        LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster,
        pytest.raises(DecomposeError, match="no worker of .* offers a GPU resource"),
    ):
        _run(catalogue, gpu=True, scheduler=cluster.scheduler_address)


def test_gpu_jobs_run_on_workers_that_offer_a_gpu(prefect_harness, catalogue):
    """The GPU path on CPU: jobs annotated with GPU=1 land on a worker offering it."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, processes=False, dashboard_address=None, resources={"GPU": 1}
    ) as cluster:
        result = _run(catalogue, gpu=True, scheduler=cluster.scheduler_address)
    assert sorted(result.computed) == sorted(PARAMS)


def test_tracked_in_mlflow_with_plots(
    prefect_harness, catalogue, tmp_path, monkeypatch, fake_credentials
):
    """The run's params are the settings; its metrics and summary table are what the
    engine gives on the stored task vectors; the plots are PNG images; no credential of the
    environment is stored anywhere (MLflow's database, artifacts, the catalogue)."""
    import matplotlib.image
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("TVSPLIT_ARTIFACTS", str(tmp_path / "artifacts"))
    result = _run(catalogue, track=True)
    run = mlflow.get_run(result.mlflow_run_id)
    params, metrics = run.data.params, run.data.metrics
    for key, value in SplitSettings().model_dump().items():
        assert params[key] == str(value), key
    assert (params["family"], params["run"]) == ("fam", result.run)
    assert params["members"] == "m0,m1,m2,m3" and metrics["parameters"] == len(PARAMS)
    uri = f"runs:/{result.mlflow_run_id}"
    table = mlflow.artifacts.load_dict(f"{uri}/summary.json")
    rows = {row[table["columns"].index("parameter")]: row for row in table["data"]}
    assert set(rows) == set(PARAMS)
    for name in PARAMS:
        deltas = torch.stack([catalogue.read("fam", name, member=f"m{i}") for i in range(4)])
        split = decompose_layer(deltas, settings=SplitSettings())
        assert metrics[f"k/{name}"] == split.k == rows[name][table["columns"].index("k")]
        for i in range(4):
            energy = float(split.shared[i].square().sum() / deltas[i].square().sum())
            assert metrics[f"shared_energy/{name}/m{i}"] == pytest.approx(energy, abs=1e-5)
    assert metrics["k/blocks.0.attn.weight"] == 2  # the planted shared rank
    for figure in ("shared_energy_heatmap.png", "eigenvalue_spectra.png"):
        path = mlflow.artifacts.download_artifacts(f"{uri}/{figure}", dst_path=str(tmp_path))
        image = matplotlib.image.imread(path)  # decodes the whole PNG
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0
    assert json.dumps(table)  # plain data
    assert fake_credentials(tmp_path, catalogue.url) == []
    # The per-parameter chance detail: one row per parameter with a chance level.
    chance = json.loads(
        Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="chance.json"))
        .read_text()
    )  # fmt: skip
    table = dict(zip(chance["columns"], zip(*chance["data"], strict=True), strict=True))
    by_name = {d["name"]: d for d in result.diagnostics}
    for name, tau, level, near in zip(
        table["parameter"], table["threshold"], table["chance"], table["near_chance"], strict=True
    ):
        assert tau == pytest.approx(by_name[name]["threshold_used"])
        assert near == (tau - level < 0.1)
    assert sum(table["near_chance"]) == len(result.warnings)


def test_cli_sums_up_chance_warnings_once_and_lists_them_with_verbose(prefect_harness, catalogue):
    """A threshold just above chance: without --verbose one summary line for the run, no
    per-parameter line; with --verbose the per-parameter lines, one per parameter counted."""
    from tvsplit.flows.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    args = ["decompose", "fam", "--catalogue", catalogue.url, "--no-track", "--threshold", "0.05"]
    quiet = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert quiet.exit_code == 0, quiet.output
    summaries = re.findall(
        r"(\d+) of (\d+) parameters: threshold within 0\.1 of chance", quiet.output
    )
    assert len(summaries) == 1, quiet.output
    near, total = map(int, summaries[0])
    assert 1 <= near <= total == len(PARAMS)
    assert "of the chance level" not in quiet.output
    loud = runner.invoke(app, [*args, "--verbose"], env={"COLUMNS": "300"})
    assert loud.exit_code == 0, loud.output
    lines = re.findall(r"(\S+): threshold [\d.]+ is within 0\.1 of the chance level", loud.output)
    assert len(lines) == near and set(lines) <= set(PARAMS)
    assert "parameters: threshold within" not in loud.output


def test_cli_decompose_then_show_the_spectrum(prefect_harness, catalogue):
    from tvsplit.flows.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    args = ["decompose", "fam", "--catalogue", catalogue.url, "--min-tasks", "2", "--no-track"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})  # the table's names in full
    assert result.exit_code == 0, result.output
    assert "blocks.0.attn.weight" in result.output and "3 parameter(s) split" in result.output
    ((run, _),) = list_runs(catalogue, "fam")
    shown = runner.invoke(
        app,
        [
            "catalogue",
            "show",
            "fam",
            "--catalogue",
            catalogue.url,
            "--param",
            "blocks.0.attn.weight",
        ],
    )
    assert shown.exit_code == 0, shown.output
    assert run in shown.output and "min_tasks=2" in shown.output
    assert "chance level" in shown.output and "█" in shown.output
    bad = runner.invoke(
        app, ["decompose", "fam", "--catalogue", catalogue.url, "--threshold", "1.5"]
    )
    assert bad.exit_code == 1 and "--threshold" in bad.output


def test_repository_wide_decomposition(prefect_harness, catalogue):
    from tvsplit.flows.schedule import decompose_catalogue

    writer = catalogue.writer("solo", None, {"source": "synthetic:solo"})
    writer.write("w", torch.zeros(4, 4), {"source": "synthetic"})
    writer.finish(["w"], {"source": "synthetic:solo"})
    report = decompose_catalogue(catalogue_url=catalogue.url, track=False)["decomposed"]
    assert report["solo"]["status"] == "skipped"
    assert report["fam"]["status"] == "done" and report["fam"]["computed"] == len(PARAMS)
    again = decompose_catalogue(catalogue_url=catalogue.url, track=False)["decomposed"]
    assert again["fam"] == {"status": "unchanged"}  # a finished run: no flow started


def test_a_lost_scheduler_is_told_apart_and_failures_are_one_short_line():
    """Jobs cancelled because the client lost its scheduler end the run with one line
    saying so (SchedulerLostError); other failures list the first three and a count."""
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from tvsplit.flows.decompose import SchedulerLostError, failure_error, scheduler_lost

    assert scheduler_lost(FutureCancelledError("job-1", "scheduler-connection-lost"))
    assert scheduler_lost(CommClosedError("in <TCP>: Stream is closed"))
    assert not scheduler_lost(FutureCancelledError("job-1", "cancelled by the user"))
    assert not scheduler_lost(OSError("disk on fire"))
    failed = {f"p{i}": "OSError: disk on fire" for i in range(5)}
    lost = failure_error("r1", failed, 12, lost=True)
    assert isinstance(lost, SchedulerLostError)
    assert "scheduler was lost" in str(lost) and "7 of 12" in str(lost) and "other 5" in str(lost)
    other = failure_error("r1", failed, 12, lost=False)
    assert not isinstance(other, SchedulerLostError) and "\n" not in str(other)
    assert str(other).count("disk on fire") == 3 and "and 2 more" in str(other)
    assert str(other).startswith("run r1: 5 of 12 parameter(s) failed after retries")
