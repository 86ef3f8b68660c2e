"""`tvsplit sync`: only what is new or changed is ingested, only families whose members
changed are decomposed, and a second run with nothing new does nothing and says so. Hub
members are resolved against the loopback hub, serving a revision that changes between
runs; local members by size and mtime, then sha256."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import yaml
from fixtures_models import finetuned_copy, loopback_hub
from safetensors.torch import load_file, save_file
from tvsplit.flows.schedule import apply_sync, plan_sync, sync
from tvsplit.storage.catalogue import Catalogue, entry_label
from typer.testing import CliRunner

from tvsplit.cli import app


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub pointed at a loopback hub (read at call time from its constants)."""
    from huggingface_hub import constants

    served: dict = {}
    with loopback_hub(served) as (endpoint, log):
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        yield served, log


def _spec(tmp_path, members: dict[str, str], base) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"families": {"fam": {"base": str(base), "members": members}}}))
    return str(path)


def test_sync_does_only_what_changed(repos, tmp_path, hub, prefect_harness):
    served, _ = hub
    ft1 = shutil.copytree(repos.ft1, tmp_path / "ft1")
    served["org/ft2"] = ("a" * 40, repos.ft2)
    spec = _spec(tmp_path, {"ft1": str(ft1), "ft2": "hf://org/ft2@main"}, repos.base)
    url = str(tmp_path / "catalogue.zarr")

    first = sync(spec, url, track=False, workers=1)
    ingested = {r["entry"] for r in first.ingested if r["status"] == "ingested"}
    assert ingested == {entry_label("fam", m) for m in (None, "ft1", "ft2")}
    assert first.decomposed["fam"]["status"] == "done"
    params = first.decomposed["fam"]["computed"]
    assert params > 0

    # Nothing new: nothing to ingest or decompose, and the command says so.
    again = plan_sync(spec, url)
    assert again.nothing_new, again.summary()
    result = CliRunner().invoke(app, ["sync", spec, "--catalogue", url, "--no-track"])
    assert result.exit_code == 0, result.output
    assert "nothing new" in result.output
    touched = ft1 / "model.safetensors"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    after_touch = plan_sync(spec, url)  # same bytes, newer mtime: hashed, found unchanged
    assert after_touch.nothing_new
    assert "sha256" in next(s.reason for s in after_touch.sources if s.member == "ft1")

    # The hub repo moves to a new commit: only that member is ingested, the family redone.
    served["org/ft2"] = ("b" * 40, finetuned_copy(repos.base, tmp_path / "ft2-v2", seed=7))
    plan = plan_sync(spec, url)
    assert [s.label for s in plan.to_ingest] == [entry_label("fam", "ft2")]
    assert "commit" in plan.to_ingest[0].reason
    assert list(plan.decompose) == ["fam"]
    report = apply_sync(plan, track=False, workers=1)
    assert [r["entry"] for r in report.ingested if r["status"] == "ingested"] == [
        entry_label("fam", "ft2")
    ]
    outcome = report.decomposed["fam"]
    assert outcome["computed"] == params
    # Bases are cached per member: only the new member's are computed (one per parameter
    # at most), not every member's again.
    assert 0 < outcome["bases_computed"] <= params
    commit = Catalogue(url).entry("fam", "ft2").attrs["commit"]
    assert commit == "b" * 40
    assert plan_sync(spec, url).nothing_new

    # A changed source whose new files are broken: the ingest fails and the complete entry
    # that was there stays, byte for byte (it is replaced only once the new one is complete).
    before = Catalogue(url).read("fam", next(iter(Catalogue(url).parameters("fam"))), member="ft1")
    weights = ft1 / "model.safetensors"
    tensors = load_file(weights)
    tensors[sorted(tensors)[-1]] = torch.full_like(tensors[sorted(tensors)[-1]], float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})
    plan = plan_sync(spec, url)
    assert [s.label for s in plan.to_ingest] == [entry_label("fam", "ft1")]
    with pytest.raises(Exception, match="ft1"):
        apply_sync(plan, track=False, workers=1)
    kept = Catalogue(url)
    assert kept.entry("fam", "ft1").complete and "ft1" in kept.members("fam")
    after = kept.read("fam", next(iter(kept.parameters("fam"))), member="ft1")
    assert after.equal(before)


def test_sync_reruns_the_configured_suite_when_the_family_changed(
    repos, tmp_path, monkeypatch, prefect_harness
):
    """A family entry naming its suite (``suite: toy:small``): the first sync and a sync
    after a member changed rerun it through the generic suite flow on that family (its
    RESULTS.md section rewritten); a sync with nothing new does not."""
    import toy_suite
    from tvsplit.flows.schedule import _run_suite
    from tvsplit.tasks.suites.results import read_section

    members = {n: str(finetuned_copy(repos.base, tmp_path / n, seed=s)) for n, s in (("a", 11), ("b", 12))}  # fmt: skip
    spec = tmp_path / "spec.yaml"
    family = {"base": str(repos.base), "members": members, "suite": "toy:small"}
    spec.write_text(yaml.safe_dump({"families": {"fam": family}}))
    monkeypatch.setattr(toy_suite.ToySuite, "SPEC", spec)
    monkeypatch.setenv("TVSPLIT_DATA", str(tmp_path / "data"))
    url = str(tmp_path / "catalogue.zarr")
    results = tmp_path / "data" / "RESULTS.md"

    first = sync(spec, url, track=False, workers=1)
    assert first.decomposed["fam"]["status"] == "done"
    assert "suite 'toy' (small) rerun" in first.suites["fam"], first.suites
    section = read_section(results.read_text(), "toy")
    assert "`shared_ta`" in section and "tvsplit sync (family fam)" in section

    again = sync(spec, url, track=False, workers=1)
    assert again.plan.nothing_new and again.suites == {}
    assert read_section(results.read_text(), "toy") == section

    shutil.rmtree(tmp_path / "b")
    finetuned_copy(repos.base, tmp_path / "b", seed=13)
    third = sync(spec, url, track=False, workers=1)
    assert [s.label for s in third.plan.to_ingest] == [entry_label("fam", "b")]
    assert "rerun" in third.suites["fam"]
    assert read_section(results.read_text(), "toy") != section  # the new member's numbers

    failed = _run_suite("nope", "fam", url, track=False)
    assert "failed: no suite 'nope'" in failed
