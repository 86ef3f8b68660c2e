"""Edits of a LoRA family written as one PEFT LoRA adapter: it loads with
`PeftModel.from_pretrained` and merges to the dense edit's weights within float32 round-off,
with rank ≤ Σ r_i + k; truncation reports its error; TIES goes the dense route."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from fixtures_models import lora_adapter
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.decompositions import DecompositionRun
from tvsplit.tasks.adapter_edit import linear_coefficients
from tvsplit.tasks.adapter_edit_job import write_edit_adapter
from tvsplit.tasks.decompose_job import SplitSettings, decompose_parameters, run_id
from tvsplit.tasks.edit import get_method
from tvsplit.tasks.edit_job import edited_tensors, plan_edit
from tvsplit.tasks.ingest import IngestJob, run_ingest_job

MEMBERS = ("a", "b", "c")
TARGETS = ["c_attn", "c_fc", "wte"]


@pytest.fixture(scope="module")
def family(repos, tmp_path_factory):
    """Three LoRA members (Conv1D + embedding modules) ingested as factors, and a split."""
    root = tmp_path_factory.mktemp("lora-family")
    url = str(root / "c.zarr")
    run_ingest_job(IngestJob(url, "fam", None, str(repos.base), str(repos.base)))
    for i, member in enumerate(MEMBERS):
        lora_adapter(repos.base_model, root / member, seed=10 + i, r=4, lora_alpha=8,
                     target_modules=TARGETS, fan_in_fan_out=True)  # fmt: skip
        run_ingest_job(IngestJob(url, "fam", member, str(root / member), str(repos.base)))
    catalogue = Catalogue(url)
    settings = SplitSettings(min_tasks=2)
    fingerprints = {m: m for m in MEMBERS}
    run = run_id("fam", MEMBERS, settings, fingerprints)
    names = catalogue.parameters("fam")
    store = DecompositionRun(catalogue, "fam", run)
    store.begin(settings.model_dump(), MEMBERS, names)
    _, failures = decompose_parameters(url, "fam", run, names, MEMBERS, fingerprints, settings)
    assert not failures
    store.finish({})
    return {"url": url, "run": run, "root": root}


def _plan(family, method: str, params: dict, members: list[dict]):
    edit = get_method(method)
    catalogue = Catalogue(family["url"])
    return plan_edit(
        catalogue, "fam", method, [m["name"] for m in members], edit.parse_params(params),
        edit.parse_members([{k: v for k, v in m.items() if k != "name"} for m in members],
                           len(members)),
        family["run"], edit.needs_split,
    )  # fmt: skip


def _merged(repos, folder) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(repos.base_model), str(folder))
    return model.merge_and_unload().state_dict()


def _dense(repos, plan) -> dict[str, torch.Tensor]:
    base = {k: v.detach() for k, v in repos.base_model.state_dict().items()}
    return {name: tensor for name, tensor, how in edited_tensors(plan, base) if how == "edited"}


CASES = {
    "task_arithmetic": (
        {"scale": 0.7},
        [{"name": "a", "weight": 1.0}, {"name": "c", "weight": 0.5}],
    ),
    "negation": ({"scale": 1.0}, [{"name": "b"}]),
    "unique_negation": ({"scale": 1.5}, [{"name": "a"}]),
    "unique_mix": ({"scale": 0.8, "shared_weight": 0.3}, [{"name": m} for m in MEMBERS]),
    "shared_augmented": ({"scale": 0.5, "shared_weight": 0.4}, [{"name": m} for m in MEMBERS]),
}


@pytest.mark.parametrize("method", list(CASES))
def test_exact_adapter_merges_to_the_dense_edit(repos, family, tmp_path, method: str) -> None:
    params, members = CASES[method]
    plan = _plan(family, method, params, members)
    report = write_edit_adapter(plan, tmp_path / "adapter")
    assert report.routes() == {"factored": len(report.modules)}
    assert report.max_relative_error < 1e-6
    merged, dense, base = (
        _merged(repos, tmp_path / "adapter"),
        _dense(repos, plan),
        repos.base_model.state_dict(),
    )
    assert dense
    for name, want in dense.items():
        change = want - base[name]
        error = (merged[name] - want).norm() / max(change.norm(), 1e-12)
        assert error <= 1e-5, (name, float(error))
    for module, row in report.modules.items():
        assert row["rank"] <= row["bound"] <= 4 * len(members) + 4 * 3, module  # Σ r_i + k


def test_coefficients_are_read_off_the_registered_method() -> None:
    method = get_method("shared_augmented")
    params = method.parse_params({"scale": 2.0, "shared_weight": 0.5, "shared_as": "mean"})
    a, b = linear_coefficients("shared_augmented", params, method.parse_members(None, 2), 2)
    assert b == [2.0, 2.0] and a == pytest.approx([2.5, 2.5])  # λ(τ + γ·mean(s))
    ties = get_method("ties")
    assert linear_coefficients("ties", ties.parse_params({"density": 0.5}),
                               ties.parse_members(None, 2), 2) is None  # fmt: skip


def test_truncation_reports_its_error_and_ties_goes_dense(repos, family, tmp_path) -> None:
    plan = _plan(family, "task_arithmetic", {"scale": 1.0}, [{"name": m} for m in MEMBERS])
    report = write_edit_adapter(plan, tmp_path / "cut", rank=3)
    merged, dense, base = (
        _merged(repos, tmp_path / "cut"),
        _dense(repos, plan),
        repos.base_model.state_dict(),
    )
    name = "transformer.h.0.mlp.c_fc"
    row = report.modules[name]
    assert row["rank"] == 3 < row["exact_rank"] and row["relative_error"] > 0.01
    change = dense[f"{name}.weight"] - base[f"{name}.weight"]
    measured = (merged[f"{name}.weight"] - dense[f"{name}.weight"]).norm() / change.norm()
    assert float(measured) == pytest.approx(row["relative_error"], rel=1e-3)

    for method, params in (("ties", {"density": 0.5}), ("tsv_m", {})):
        dense_plan = _plan(family, method, params, [{"name": m} for m in MEMBERS])
        report = write_edit_adapter(dense_plan, tmp_path / method)
        assert set(report.routes()) == {"dense"}, method  # expanded one module at a time
        merged, dense = _merged(repos, tmp_path / method), _dense(repos, dense_plan)
        assert dense
        for name, want in dense.items():
            change = want - base[name]
            assert (merged[name] - want).norm() <= 1e-5 * max(change.norm(), 1e-12), name


def test_cli_edit_as_adapter(prefect_harness, repos, family, tmp_path) -> None:
    from typer.testing import CliRunner

    from tvsplit.cli import app

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(repos.base), "family": "fam", "method": "unique_negation",
        "decomposition": family["run"], "members": [{"name": "a"}], "params": {"scale": 1.0},
    }))  # fmt: skip
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, [
        "edit", str(recipe), "--as-adapter", "--out", str(out), "--catalogue", family["url"],
        "--no-track",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote LoRA adapter" in result.output and (out / "adapter_config.json").is_file()
    plan = _plan(family, "unique_negation", {"scale": 1.0}, [{"name": "a"}])
    merged, dense = _merged(repos, out), _dense(repos, plan)
    for name, want in dense.items():
        assert torch.allclose(merged[name], want, atol=1e-5), name
