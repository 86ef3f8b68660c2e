"""The style suite (tasks/suites/style): real style transforms, the judges, the choice rule,
and (slow) the small preset end to end through the generic suite flow: the mixes are built
from the stored split, the exported edit is a diffusers folder that ``from_pretrained``
loads and samples, the sample grid is an MLflow artifact and a PNG beside RESULTS.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tvsplit.tasks.suites.base import MethodSpec, Trial
from tvsplit.tasks.suites.style.data import (
    apply_styles,
    digits,
    mixable_pairs,
    random_style_subsets,
)
from tvsplit.tasks.suites.style.suite import StyleSuite


def test_styles_are_real_transforms_of_real_digits():
    images, labels = digits("val", 16, 64)
    assert images.shape == (64, 1, 16, 16) and labels.shape == (64,)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    ink = float(images.mean())
    assert float(apply_styles(images, ["thick"]).mean()) > 1.5 * ink  # dilated strokes
    assert float(apply_styles(images, ["thin"]).mean()) < 0.7 * ink
    assert torch.allclose(apply_styles(images, ["inverted"]), 1 - images)
    rotated = apply_styles(images, ["rotated"])
    assert torch.equal(torch.rot90(rotated, -1, dims=(-2, -1)), images)
    blurred = apply_styles(images, ["blurred"])
    assert float((blurred[..., 1:] - blurred[..., :-1]).abs().mean()) < float(
        (images[..., 1:] - images[..., :-1]).abs().mean()
    )
    # one canonical order: the names' order does not matter
    assert torch.equal(
        apply_styles(images, ["inverted", "thick"]), apply_styles(images, ["thick", "inverted"])
    )
    with pytest.raises(ValueError, match="unknown style"):
        apply_styles(images, ["sepia"])


def test_contradicting_pairs_are_left_out_of_the_mixing_table():
    pairs = mixable_pairs(["thin", "thick", "inverted", "rotated"])
    assert ("thick", "thin") not in pairs and len(pairs) == 5
    assert ("thick", "inverted") in pairs


def test_random_style_subsets_label_what_was_applied():
    images, _ = digits("val", 16, 200)
    generator = torch.Generator().manual_seed(0)
    styled, applied = random_style_subsets(images, ("thick", "inverted"), generator)
    assert applied.shape == (200, 2) and 0.3 < float(applied.mean()) < 0.7
    for i in range(len(images)):
        chosen = [s for s, on in zip(("thick", "inverted"), applied[i].tolist(), strict=True) if on]
        assert torch.equal(styled[i], apply_styles(images[i : i + 1], chosen)[0])


def test_quality_metric_separates_real_digits_from_noise():
    """FID on the digit classifier's features (torchmetrics): held-out real digits are near
    the real reference, uniform noise is far from it."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from tvsplit.tasks.suites.style.classifiers import train_classifier

    train, labels = digits("train", 8, 1000)
    net = train_classifier(train, labels, (), multilabel=False, steps=20, seed=0, batch_size=64)
    fid = FrechetInceptionDistance(
        feature=net.features, normalize=True, reset_real_features=False,
        input_img_size=(1, 8, 8),
    )  # fmt: skip
    fid.update(digits("val", 8, 256)[0], real=True)

    def distance(images: torch.Tensor) -> float:
        fid.reset()
        fid.update(images, real=False)
        return float(fid.compute())

    real = digits("test", 8, 256)[0]
    noise = torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert distance(noise) > 5 * distance(real)
    assert distance(apply_styles(real, ["thick"])) > 2 * distance(real)  # a style is a shift


def _trial(fid: float, a: float, b: float) -> Trial:
    return Trial({}, {"fid/thick-inverted": fid, "strength/thick": a, "strength/inverted": b}, 0)


def test_choice_is_the_best_fid_among_candidates_with_both_styles():
    suite = StyleSuite.from_preset("small", "/nonexistent")
    suite._current = "seed-0"
    suite._single["seed-0"] = {"thick": 80.0, "inverted": 90.0}
    method = MethodSpec("unique[thick+inverted]", "unique_mix", members=("thick", "inverted"))
    trials = [_trial(1.0, 10.0, 90.0), _trial(3.0, 50.0, 50.0), _trial(2.0, 41.0, 46.0)]
    assert suite.choose(method, trials, {}) == 2  # trial 0 has the best FID, thick absent
    # no candidate has both: the one whose weaker style is strongest relative to its own
    weak = [_trial(1.0, 10.0, 90.0), _trial(3.0, 30.0, 30.0)]
    assert suite.choose(method, weak, {}) == 1


def run_small_preset(suite: str, tmp_path, monkeypatch):
    """The suite's small preset through the generic flow, everything under ``tmp_path``."""
    from tvsplit.flows.suite import suite_flow

    monkeypatch.setenv("TVSPLIT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("TVSPLIT_ARTIFACTS", str(tmp_path / "artifacts"))
    results = tmp_path / "RESULTS.md"
    run = suite_flow(suite, preset="small", results_path=str(results), workers=1,
                     show_progress=False)  # fmt: skip
    return run, results


@pytest.mark.slow
def test_small_preset_end_to_end(prefect_harness, tmp_path, monkeypatch):
    """Run with `make test-slow` (or `pytest -m slow tests/test_style_suite.py`)."""
    import mlflow
    from diffusers import UNet2DModel
    from tvsplit.tasks.decompose_job import stored_shared_parts
    from tvsplit.tasks.suites.edited import FamilyTensors
    from tvsplit.tasks.suites.style.model import sample

    run, results = run_small_preset("style", tmp_path, monkeypatch)
    result = run.result
    family = run.pool.families[0]
    assert result.rows == [
        "base", "individual", "full[thick+inverted]", "unique[thick+inverted]",
        "ties[thick+inverted]", "tsv_m[thick+inverted]",
    ]  # fmt: skip

    # the unique mix is built from the stored split: θ0 + α(u_A + u_B) + β·mean(s)
    unique = result.record("unique[thick+inverted]", family.label)
    assert unique.run == result.runs[f"{family.label}/split"]
    from tvsplit.flows.settings import load_settings

    catalogue = load_settings().catalogue
    tensors = FamilyTensors(catalogue, family.name, list(family.members))
    shared = stored_shared_parts(catalogue, family.name, unique.run, tensors.members)
    alpha, beta = unique.params["scale"], unique.params["shared_weight"]
    state = tensors.state("unique_mix", unique.params, members=("thick", "inverted"),
                          run=unique.run)  # fmt: skip
    some_shared_is_nonzero = False
    for name, parts in shared.items():
        s_a, s_b = parts[0].float(), parts[1].float()
        tau_a, tau_b = tensors.vectors["thick"][name].float(), tensors.vectors["inverted"][name]
        expected = (
            tensors.base[name].float()
            + alpha * (tau_a - s_a + tau_b.float() - s_b)
            + beta * (s_a + s_b) / 2
        )
        assert torch.allclose(state[name].float(), expected, atol=1e-5), name
        some_shared_is_nonzero |= bool(s_a.abs().sum() > 0)
    assert some_shared_is_nonzero
    full = result.record("full[thick+inverted]", family.label)
    assert full.run is None and full.candidates == 2

    # the exported edit: diffusers' layout, loaded by diffusers, samples, scores as in memory
    assert result.exported["row"] == "unique[thick+inverted]"
    assert (run.model_dir / "diffusion_pytorch_model.safetensors").is_file()
    unet = UNet2DModel.from_pretrained(run.model_dir)
    for name, tensor in unet.state_dict().items():
        if name in state:
            assert torch.allclose(tensor, state[name].to(tensor.dtype), atol=1e-6), name
    images = sample(unet, 4, 2, seed=0)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    assert run.model_test == pytest.approx(unique.test, rel=1e-4, abs=1e-4)

    # the section, the grid beside it and in MLflow
    text = results.read_text()
    assert "Style suite" in text and "| thick + inverted | `unique` |" in text
    assert (tmp_path / "style_samples.png").stat().st_size > 1000
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.mlflow_run_id)}
    assert "style_samples.png" in artifacts


def test_a_lora_zoo_shares_the_base_and_judges_of_the_full_zoo():
    from tvsplit.tasks.suites.style.suite import StyleLoraSuite
    from tvsplit.tasks.suites.style.zoo import StyleZoo, StyleZooConfig

    full = StyleZooConfig.model_validate(StyleSuite.presets["small"]["zoo"])
    lora = StyleZooConfig.model_validate(StyleLoraSuite.presets["small"]["zoo"])
    assert lora.members == "lora" and full.members == "full"
    assert lora.fingerprint() == full.fingerprint()  # one base, one pair of judges
    manifest = {"fingerprint": full.fingerprint()}
    full_zoo, lora_zoo = (StyleZoo(Path("/z"), c, manifest) for c in (full, lora))
    assert full_zoo.base_dir == lora_zoo.base_dir
    assert full_zoo.family_name(0) != lora_zoo.family_name(0)
    assert lora_zoo.member_dir(0, "thick").parent.parent.name.startswith("lora-")
    wider = StyleZooConfig.model_validate(
        {**StyleLoraSuite.presets["small"]["zoo"], "lora": {"rank": 3}}
    )
    assert StyleZoo(Path("/z"), wider, manifest).member_dir(0, "thick") != lora_zoo.member_dir(
        0, "thick"
    )


@pytest.mark.slow
def test_small_lora_preset_end_to_end(prefect_harness, tmp_path, monkeypatch):
    """The styles as PEFT LoRA adapters through ingest → decompose → edit: the stored task
    vectors are PEFT's own merged ΔW, the exported edit loads with diffusers."""
    from diffusers import UNet2DModel
    from peft import PeftModel
    from safetensors.torch import load_file
    from tvsplit.flows.settings import load_settings
    from tvsplit.tasks.suites.edited import FamilyTensors
    from tvsplit.tasks.suites.style.model import load_unet, sample

    run, results = run_small_preset("style-lora", tmp_path, monkeypatch)
    result, family = run.result, run.pool.families[0]
    assert "unique[thick+inverted]" in result.rows

    # members are adapters in PEFT's layout, read as LoRA sources
    adapter = Path(family.members["thick"])
    assert (adapter / "adapter_config.json").is_file()
    keys = load_file(adapter / "adapter_model.safetensors")
    assert keys and all(k.startswith("base_model.model.") and ".lora_" in k for k in keys)
    adapted = {k.removeprefix("base_model.model.").split(".lora_")[0] + ".weight" for k in keys}

    # τ_thick as stored = PEFT's merged weights − base; zero outside the adapted modules
    tensors = FamilyTensors(load_settings().catalogue, family.name, list(family.members))
    base = load_unet(family.base)
    merged = PeftModel.from_pretrained(load_unet(family.base), str(adapter)).merge_and_unload()
    want = {k: v - base.state_dict()[k] for k, v in merged.state_dict().items()}
    tau = tensors.vectors["thick"]
    assert adapted <= set(tau)
    for name, value in tau.items():
        assert torch.allclose(value.float(), want[name], atol=1e-6), name
        assert (name in adapted) == bool(value.abs().sum() > 0), name

    # the exported edit: diffusers' layout, loaded by diffusers, sampled
    unet = UNet2DModel.from_pretrained(run.model_dir)
    assert torch.isfinite(sample(unet, 4, 2, seed=0)).all()
    text = results.read_text()
    assert "<!-- tvsplit:suite style-lora begin -->" in text and "LoRA adapters" in text
    assert "PEFT LoRA r=2" in text
    assert (tmp_path / "style-lora_samples.png").stat().st_size > 1000
