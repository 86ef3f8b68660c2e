"""The edit flow end to end on a tiny GPT-2: ingest → decompose → edit → load back."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tvsplit.flows.checks import InputError
from tvsplit.flows.decompose import run_decompose
from tvsplit.flows.edit import edit_model
from tvsplit.flows.ingest import ingest
from tvsplit.flows.recipe import RecipeError
from tvsplit.storage.catalogue import Catalogue
from tvsplit.tasks.decompose import decompose_layer
from tvsplit.tasks.edit_job import EditPlanError

WPE = "transformer.wpe.weight"


@pytest.fixture(scope="module")
def pipeline(repos, tmp_path_factory, prefect_harness):
    """A catalogue with family 'tiny' (base + ft1, ft2, ft3; wpe excluded) and one run."""
    root = tmp_path_factory.mktemp("edit-flow")
    members = {
        f"ft{i}": _structured_finetune(repos.base, root / f"ft{i}", seed=i) for i in (1, 2, 3)
    }
    spec = {
        "families": {
            "tiny": {
                "base": str(repos.base),
                "exclude": [WPE],
                "members": {name: str(path) for name, path in members.items()},
            }
        }
    }
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    url = str(root / "catalogue.zarr")
    ingest(spec_path, url, progress=False)
    from tvsplit.tasks.decompose_job import SplitSettings

    result = run_decompose(
        "tiny",
        settings=SplitSettings(min_tasks=2),
        catalogue_url=url,
        track=False,
        show_progress=False,
    )
    return {"url": url, "run": result.run, "root": root, "repos": repos, **members}


def _structured_finetune(base, folder, seed: int):
    """A fake fine-tune whose 2-D updates share two directions with every other member's
    (seeded by the parameter) and add two of their own: a family with something to share."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(base, folder)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    own = torch.Generator().manual_seed(seed)
    for index, (name, tensor) in enumerate(sorted(tensors.items())):
        if tensor.ndim != 2:
            tensors[name] = tensor + 0.01 * torch.randn(tensor.shape, generator=own)
            continue
        common = torch.Generator().manual_seed(1000 + index)
        rows, cols = tensor.shape
        shared = torch.randn(rows, 2, generator=common) @ torch.randn(2, cols, generator=own)
        mine = torch.randn(rows, 2, generator=own) @ torch.randn(2, cols, generator=own)
        tensors[name] = (
            tensor + 0.01 * (shared + mine) + 1e-4 * torch.randn(rows, cols, generator=own)
        )
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def _recipe(pipeline, tmp_path, **fields) -> str:
    recipe = {"base": str(pipeline["repos"].base), "family": "tiny", **fields}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out |= load_file(file)
    return out


def _edit(pipeline, tmp_path, **fields):
    out = tmp_path / "out"
    return edit_model(
        _recipe(pipeline, tmp_path, **fields), output=str(out), catalogue_url=pipeline["url"],
        track=False, show_progress=False,
    )  # fmt: skip


def test_task_arithmetic_of_one_member_gives_its_weights(pipeline, tmp_path):
    result = _edit(
        pipeline, tmp_path, method="task_arithmetic", members=[{"name": "ft1", "weight": 1.0}]
    )
    out, ft1, base = (
        _weights(result.output),
        _weights(pipeline["ft1"]),
        _weights(pipeline["repos"].base),
    )
    assert set(out) == set(base)
    for name, tensor in out.items():
        expected = base[name] if name == WPE else ft1[name]  # wpe is outside the family
        assert torch.allclose(tensor, expected, atol=1e-6), name
    assert result.copied == {WPE: "base"}
    assert (result.output / "config.json").is_file() and "task_arithmetic" in (
        result.output / "README.md"
    ).read_text()


PROMPT = torch.arange(8)[None]


def _logits_of_folder(folder) -> torch.Tensor:
    """The logits of a model folder as transformers loads it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(PROMPT).logits


def _logits_of_state(base_folder, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of a fresh model (the base's config) holding ``state``, loaded by hand:
    every stored tensor must be given (lm_head is tied to wte)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_folder))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    with torch.no_grad():
        return model.eval()(PROMPT).logits


def test_output_loads_with_transformers_and_gives_the_hand_applied_edit(pipeline, tmp_path):
    """Unique negation of ft2 reloaded with transformers gives the logits of θ0 − u_ft2
    built here: the stored run's shared parts (its compact form) subtracted from ft2's task
    vector, applied to the base's state dict; and not those of plain negation."""
    result = _edit(
        pipeline, tmp_path, method="unique_negation", decomposition=pipeline["run"],
        members=[{"name": "ft2"}], params={"scale": 1.0},
    )  # fmt: skip
    from tvsplit.tasks.decompose_job import stored_shared_parts

    base = _weights(pipeline["repos"].base)
    catalogue = Catalogue(pipeline["url"])
    shared = stored_shared_parts(pipeline["url"], "tiny", pipeline["run"], ["ft2"])
    assert set(shared) == set(base) - {WPE}
    by_hand, plain = dict(base), dict(base)
    for name, parts in shared.items():
        vector = catalogue.read("tiny", name, member="ft2")
        by_hand[name] = base[name] - (vector - parts[0])
        plain[name] = base[name] - vector
    logits = _logits_of_folder(result.output)
    torch.testing.assert_close(logits, _logits_of_state(pipeline["repos"].base, by_hand),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    assert not torch.allclose(logits, _logits_of_state(pipeline["repos"].base, plain), atol=1e-3)


def test_unique_negation_equals_direct_calls(pipeline, tmp_path):
    result = _edit(
        pipeline, tmp_path, method="unique_negation", decomposition=pipeline["run"],
        members=[{"name": "ft2"}], params={"scale": 0.7},
    )  # fmt: skip
    out, base = _weights(result.output), _weights(pipeline["repos"].base)
    catalogue = Catalogue(pipeline["url"])
    name = "transformer.h.1.mlp.c_fc.weight"
    deltas = torch.stack([catalogue.read("tiny", name, member=m) for m in ("ft1", "ft2", "ft3")])
    split = decompose_layer(deltas, min_tasks=2)
    expected = base[name] - 0.7 * split.unique[1]
    assert torch.allclose(out[name], expected, atol=1e-6)
    assert not torch.allclose(
        out[name], base[name] - 0.7 * deltas[1], atol=1e-4
    )  # not plain negation


def test_excluded_parameters_come_from_the_named_member(pipeline, tmp_path):
    result = _edit(
        pipeline, tmp_path, method="task_arithmetic", members=[{"name": "ft1"}], excluded_from="ft3",
    )  # fmt: skip
    assert result.copied == {WPE: "member"}
    assert torch.equal(_weights(result.output)[WPE], _weights(pipeline["ft3"])[WPE])


def test_lora_export_reproduces_the_edit(pipeline, tmp_path):
    result = edit_model(
        _recipe(pipeline, tmp_path, method="task_arithmetic", members=[{"name": "ft1", "weight": 0.5}]),
        output=str(tmp_path / "out"), catalogue_url=pipeline["url"], lora_rank=32, track=False,
        show_progress=False,
    )  # fmt: skip
    assert result.lora is not None and (result.lora / "adapter_config.json").is_file()
    assert result.lora_max_error < 1e-5  # rank 32 ≥ every module's smaller side: exact


def test_recipe_errors_name_the_field(pipeline, tmp_path):
    with pytest.raises(
        EditPlanError, match=r"members\[0\]\.name: family 'tiny' has no member 'nope'"
    ):
        _edit(pipeline, tmp_path, method="task_arithmetic", members=[{"name": "nope"}])
    with pytest.raises(RecipeError, match=r"members\[0\]\.weight"):
        _edit(
            pipeline,
            tmp_path,
            method="task_arithmetic",
            members=[{"name": "ft1", "weight": "heavy"}],
        )
    with pytest.raises(RecipeError, match="method"):
        _edit(pipeline, tmp_path, method="tiez", members=[{"name": "ft1"}])
    with pytest.raises(EditPlanError, match="decomposition: family 'tiny' has no run 'r0'"):
        _edit(
            pipeline, tmp_path, method="unique_mix", decomposition="r0", members=[{"name": "ft1"}]
        )
    assert not (tmp_path / "out").exists()


def test_edit_is_tracked_with_lineage(pipeline, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("TVSPLIT_ARTIFACTS", str(tmp_path / "artifacts"))
    result = edit_model(
        _recipe(pipeline, tmp_path, method="task_arithmetic", members=[{"name": "ft1"}]),
        output=str(tmp_path / "out"), catalogue_url=pipeline["url"], show_progress=False,
    )  # fmt: skip
    lineage = mlflow.artifacts.load_dict(f"runs:/{result.mlflow_run_id}/lineage.json")
    assert lineage["sources"]["ft1"]["source"].endswith("ft1")
    assert mlflow.get_run(result.mlflow_run_id).data.params["method"] == "task_arithmetic"


@pytest.mark.parametrize(
    ("method", "params", "members"),
    [
        ("shared_augmented", {"merge": "ties", "density": 0.3, "scale": 0.8}, None),
        ("unique_negation", {"scale": 0.7}, ["ft2"]),
    ],
)
def test_suite_in_memory_edit_equals_the_edit_flow(pipeline, tmp_path, method, params, members):
    """``FamilyTensors.state`` (the suites' in-memory edit) gives the tensors the edit flow
    writes for the same recipe, exactly."""
    from tvsplit.tasks.suites.edited import FamilyTensors

    chosen = members or ["ft1", "ft2", "ft3"]
    result = _edit(
        pipeline, tmp_path, method=method, decomposition=pipeline["run"],
        members=[{"name": m} for m in chosen], params=params,
    )  # fmt: skip
    written = _weights(result.output)
    tensors = FamilyTensors(pipeline["url"], "tiny")
    state = tensors.state(method, params, members=members, run=pipeline["run"])
    assert set(state) == set(written) - {WPE}
    for name, tensor in state.items():
        assert tensor.dtype == written[name].dtype
        assert torch.equal(tensor, written[name]), name
    own = tensors.member_state("ft1")
    ft1 = _weights(pipeline["ft1"])
    for name, tensor in own.items():
        torch.testing.assert_close(tensor, ft1[name], atol=1e-6, rtol=0)


def _tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))}


def test_failed_overwrite_leaves_model_and_adapter_byte_identical(pipeline, tmp_path, monkeypatch):
    """An edit that fails part-way (after tensors were written) with --overwrite over an
    existing model and its adapter leaves both exactly as they were, and nothing beside."""
    import tvsplit.flows.edit as edit_flow

    out = tmp_path / "out"
    recipe = _recipe(pipeline, tmp_path, method="task_arithmetic", members=[{"name": "ft1"}])
    edit_model(
        recipe, output=str(out), catalogue_url=pipeline["url"], lora_rank=4, track=False,
        show_progress=False,
    )  # fmt: skip
    before = {p.name: _tree(p) for p in tmp_path.iterdir() if p.is_dir()}
    assert set(before) == {"out", "out-lora"}
    real = edit_flow.edited_tensors

    def fails_part_way(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 5:
                raise RuntimeError("disk full")
            yield item

    monkeypatch.setattr(edit_flow, "edited_tensors", fails_part_way)
    with pytest.raises(RuntimeError, match="disk full"):
        edit_model(
            recipe, output=str(out), catalogue_url=pipeline["url"], lora_rank=4, overwrite=True,
            track=False, show_progress=False,
        )  # fmt: skip
    with pytest.raises(EditPlanError, match=r"members\[0\]\.name"):
        edit_model(
            _recipe(pipeline, tmp_path, method="task_arithmetic", members=[{"name": "nope"}]),
            output=str(out), catalogue_url=pipeline["url"], overwrite=True, track=False,
        )  # fmt: skip
    after = {p.name: _tree(p) for p in tmp_path.iterdir() if p.is_dir()}
    assert after == before


def test_overwrite_without_lora_removes_the_old_adapter(pipeline, tmp_path):
    out = tmp_path / "out"
    first = _recipe(pipeline, tmp_path, method="task_arithmetic", members=[{"name": "ft1"}])
    edit_model(
        first, output=str(out), catalogue_url=pipeline["url"], lora_rank=4, track=False,
        show_progress=False,
    )  # fmt: skip
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        edit_model(first, output=str(out), catalogue_url=pipeline["url"], track=False)
    second = _recipe(pipeline, tmp_path, method="task_arithmetic", members=[{"name": "ft2"}])
    result = edit_model(
        second, output=str(out), catalogue_url=pipeline["url"], overwrite=True, track=False,
        show_progress=False,
    )  # fmt: skip
    assert result.lora is None and not (tmp_path / "out-lora").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]
    name = "transformer.h.0.attn.c_attn.weight"
    assert torch.allclose(_weights(out)[name], _weights(pipeline["ft2"])[name], atol=1e-6)


def test_output_that_is_a_file_is_refused(pipeline, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(InputError, match="is a file, not a model folder"):
        _edit(pipeline, tmp_path, method="task_arithmetic", members=[{"name": "ft1"}])
    assert (tmp_path / "out").read_text() == "not a folder"


def test_default_output_is_under_the_data_folder(pipeline, tmp_path, monkeypatch):
    monkeypatch.setenv("TVSPLIT_DATA", str(tmp_path / "data"))
    result = edit_model(
        _recipe(pipeline, tmp_path, method="task_arithmetic", members=[{"name": "ft1"}]),
        catalogue_url=pipeline["url"], track=False, show_progress=False,
    )  # fmt: skip
    assert result.output == tmp_path / "data" / "models" / "tiny-task_arithmetic"
    assert (result.output / "config.json").is_file()


def test_cli_edit_writes_a_tsv_m_merge_that_loads(pipeline, tmp_path):
    """`tvsplit edit` with method tsv_m (a registered subspace merge, no decomposition run):
    the folder loads with transformers and each family tensor is θ0 + λ · TSV-M(τ_1…τ_3),
    checked against the independent float64 reference of test_merges.py (the edit computes
    in float32: relative error of the delta < 1e-3)."""
    from test_merges import reference_tsv_m
    from tvsplit.flows.cli import app
    from typer.testing import CliRunner

    recipe = _recipe(
        pipeline, tmp_path, method="tsv_m", params={"scale": 0.6},
        members=[{"name": m} for m in ("ft1", "ft2", "ft3")],
    )  # fmt: skip
    out = tmp_path / "tsv"
    args = ["edit", recipe, "--out", str(out), "--catalogue", pipeline["url"], "--no-track"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "tsv_m" in (out / "README.md").read_text()
    written, base = _weights(out), _weights(pipeline["repos"].base)
    members = [_weights(pipeline[m]) for m in ("ft1", "ft2", "ft3")]
    matrices = 0
    for name, tensor in written.items():
        if name == WPE:  # outside the family: the base's
            assert torch.equal(tensor, base[name])
            continue
        deltas = [(m[name].double() - base[name].double()).numpy() for m in members]
        expected = torch.from_numpy(0.6 * reference_tsv_m(deltas))
        got = tensor.double() - base[name].double()  # computed in float32 by the edit
        error = float((got - expected).norm() / expected.norm())
        assert error < 1e-3, (name, error)
        matrices += tensor.ndim == 2
    assert matrices >= 4
    # Reloaded with transformers: the logits of θ0 + λ·TSV-M(τ) applied by hand to a fresh model.
    by_hand = {
        name: (tensor if name == WPE else
               (tensor.double() + torch.from_numpy(0.6 * reference_tsv_m(
                   [(m[name].double() - tensor.double()).numpy() for m in members]))).float())
        for name, tensor in base.items()
    }  # fmt: skip
    # (the edit's float32 TSV-M differs from the float64 reference by < 1e-3 relative, so
    # the logits agree to ~1e-3; the edit itself moves them by far more than that)
    logits, expected = _logits_of_folder(out), _logits_of_state(pipeline["repos"].base, by_hand)
    torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-3)
    assert float((logits - _logits_of_folder(pipeline["repos"].base)).abs().max()) > 1e-2
