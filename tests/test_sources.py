"""Sources: local folders, sharded checkpoints, LoRA adapters, task-vector files, pickle
refusal, the hub cache and the hub download path; every bad input names file and parameter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAKE_CREDENTIALS, files_holding_credentials
from fixtures_models import (
    install_in_hub_cache,
    loopback_hub,
    lora_adapter,
    merged_minus_base,
    rewrite,
)
from safetensors.torch import load_file, save_file
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.errors import PickleRefusedError, SourceError
from tvsplit.storage.provenance import sha256_file
from tvsplit.storage.sources import open_source, parse_source, task_vector_metadata
from tvsplit.tasks.ingest import IngestJob, run_ingest_job
from tvsplit.tasks.task_vector import TaskVectorError

ROOT = Path(__file__).resolve().parents[1]


def ingest(cat_url: str, base: Path | str, member: Path | str | None = None, **kw) -> Catalogue:
    """Base, then (optionally) one member, straight through the job function (no Prefect)."""
    run_ingest_job(IngestJob(cat_url, "fam", None, str(base), str(base), **kw))
    if member is not None:
        run_ingest_job(IngestJob(cat_url, "fam", "m", str(member), str(base), **kw))
    return Catalogue(cat_url)


def test_parse_source_forms() -> None:
    assert parse_source("hf://org/name@v1.0").revision == "v1.0"
    assert parse_source("hf://org/name").revision == "main"
    assert parse_source("delta:./x.safetensors").delta
    for bad in ("", "s3://b/x", "hf://../x", "hf://org/name@"):
        with pytest.raises(SourceError):
            parse_source(bad)


def test_local_single_and_sharded_checkpoints_agree(repos) -> None:
    single = open_source(str(repos.base))
    sharded = open_source(str(repos.sharded))
    assert single.kind == sharded.kind == "model"
    assert len(sharded.checkpoint.files) > 1  # really sharded
    assert set(single.checkpoint) == set(sharded.checkpoint)
    for name in single.checkpoint:
        assert torch.equal(single.checkpoint[name], sharded.checkpoint[name])
    sums = sharded.checksums()
    assert "model.safetensors.index.json" in sums
    assert sums["model.safetensors.index.json"] == sha256_file(
        repos.sharded / "model.safetensors.index.json"
    )


def test_full_finetune_vector_is_finetuned_minus_base(repos, tmp_path) -> None:
    cat = ingest(str(tmp_path / "c.zarr"), repos.sharded, repos.ft1)
    base = load_file(repos.base / "model.safetensors")
    tuned = load_file(repos.ft1 / "model.safetensors")
    assert (
        cat.parameters("fam", "m")
        == cat.parameters("fam")
        == list(open_source(str(repos.sharded)).checkpoint)
    )
    for name in base:
        assert torch.equal(cat.read("fam", name, member="m"), tuned[name] - base[name])
        assert torch.equal(cat.read("fam", name), base[name])
    attrs = cat.array_attrs("fam", "transformer.h.0.attn.c_attn.weight", member="m")
    assert attrs["kind"] == "delta" and attrs["file"] == "model.safetensors"
    assert attrs["file_sha256"] == sha256_file(repos.ft1 / "model.safetensors")
    assert attrs["base_file"].startswith("model-0000")  # the base is the sharded copy
    entry = cat.entry("fam", "m").attrs
    assert entry["source"] == str(repos.ft1) and entry["base"]["source"] == str(repos.sharded)


LORA_CASES = {
    "conv1d-patterns-modules_to_save": dict(
        classifier=True,
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
        rank_pattern={"h.1.attn.c_attn": 2},
        alpha_pattern={"c_fc": 3},
        modules_to_save=["score"],
    ),
    "rslora": dict(
        r=8, lora_alpha=4, use_rslora=True, target_modules=["c_proj"], fan_in_fan_out=True
    ),
    "embedding": dict(r=2, lora_alpha=5, target_modules=["wte"]),
    "lora-bias": dict(
        r=2, lora_alpha=5, target_modules=["attn.c_proj"], fan_in_fan_out=True, lora_bias=True
    ),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_delta_equals_peft_merge_minus_base(repos, tmp_path, case: str) -> None:
    config = dict(LORA_CASES[case])
    classifier = config.pop("classifier", False)
    model, folder = (
        (repos.classifier_model, repos.classifier) if classifier else (repos.base_model, repos.base)
    )
    peft_model = lora_adapter(model, tmp_path / "adapter", seed=3, **config)
    truth = merged_minus_base(peft_model, model)
    cat = ingest(str(tmp_path / "c.zarr"), folder, tmp_path / "adapter")
    names = cat.parameters("fam", "m")
    assert truth and set(truth) <= set(names) | {"lm_head.weight"}
    for name in names:
        got = cat.read("fam", name, member="m")
        want = truth.get(name, torch.zeros_like(got))
        assert torch.allclose(got, want, atol=1e-6, rtol=0), name
    kinds = {cat.array_attrs("fam", n, member="m")["kind"] for n in names}
    assert {"lora-delta", "zero"} <= kinds
    if classifier:
        assert cat.array_attrs("fam", "score.weight", member="m")["kind"] == "full-delta"
        patterned = cat.array_attrs("fam", "transformer.h.1.attn.c_attn.weight", member="m")
        assert (patterned["r"], patterned["alpha"]) == (2, 8.0)
        assert cat.array_attrs("fam", "transformer.h.0.mlp.c_fc.weight", member="m")["alpha"] == 3


def test_ready_task_vector_file(repos, tmp_path) -> None:
    base = load_file(repos.base / "model.safetensors")
    vector = {f"model.{k}": torch.full_like(v, 0.5) for k, v in base.items()}  # prefixed names
    path = tmp_path / "tv.safetensors"
    save_file(vector, path, metadata=task_vector_metadata())
    assert open_source(str(path)).kind == "delta"
    cat = ingest(str(tmp_path / "c.zarr"), repos.base, path)
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(cat.read("fam", name, member="m"), torch.full_like(base[name], 0.5))
    plain = tmp_path / "plain.safetensors"
    save_file(vector, plain)
    assert open_source(str(plain)).kind == "model"
    assert open_source(f"delta:{plain}").kind == "delta"


def test_pickle_is_refused_unless_allowed(repos, tmp_path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    state = load_file(repos.ft1 / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="pytorch_model.bin.*--allow-pickle"):
        open_source(str(folder))
    with pytest.raises(PickleRefusedError):
        ingest(str(tmp_path / "c.zarr"), repos.base, folder)
    assert Catalogue(str(tmp_path / "c.zarr")).members("fam", include_partial=True) == []
    cat = ingest(str(tmp_path / "d.zarr"), repos.base, folder, allow_pickle=True)
    name = "transformer.wte.weight"
    assert torch.equal(
        cat.read("fam", name, member="m"),
        state[name] - load_file(repos.base / "model.safetensors")[name],
    )


def _broken(repos, tmp_path: Path, change) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(repos.ft1, folder)
    rewrite(folder / "model.safetensors", change)
    return folder


BAD_INPUTS = {
    "missing": (lambda t: t.pop("transformer.h.1.ln_2.bias"), "transformer.h.1.ln_2.bias.*missing"),
    "shape": (
        lambda t: t.update({"transformer.h.0.ln_1.weight": torch.ones(5)}),
        "transformer.h.0.ln_1.weight.*shape",
    ),
    "nan": (
        lambda t: t["transformer.h.1.mlp.c_fc.weight"].__setitem__((0, 0), float("nan")),
        "transformer.h.1.mlp.c_fc.weight.*NaN",
    ),
    "non-float": (
        lambda t: t.update({"transformer.wpe.weight": torch.ones(32, 32, dtype=torch.int64)}),
        "transformer.wpe.weight.*int64",
    ),
    "unexpected": (
        lambda t: t.update({"transformer.extra.weight": torch.ones(2)}),
        "transformer.extra.weight.*no counterpart",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_members_fail_naming_file_and_parameter(repos, tmp_path, case: str) -> None:
    change, pattern = BAD_INPUTS[case]
    folder = _broken(repos, tmp_path, change)
    url = str(tmp_path / "c.zarr")
    with pytest.raises((TaskVectorError, SourceError), match=pattern) as error:
        ingest(url, repos.base, folder)
    assert "model.safetensors" in str(error.value)
    assert Catalogue(url).members("fam") == []  # nothing half-made is visible


def test_non_float_base_parameter_fails_unless_excluded(repos, tmp_path) -> None:
    folder = tmp_path / "base_with_buffer"
    shutil.copytree(repos.base, folder)
    rewrite(
        folder / "model.safetensors",
        lambda t: t.update({"transformer.h.0.attn.bias": torch.ones(4, dtype=torch.bool)}),
    )
    with pytest.raises(
        TaskVectorError, match=r"model.safetensors.*transformer.h.0.attn.bias.*bool"
    ):
        ingest(str(tmp_path / "a.zarr"), folder)
    cat = ingest(str(tmp_path / "b.zarr"), folder, exclude=("*.attn.bias",))
    assert "transformer.h.0.attn.bias" not in cat.parameters("fam")


def test_hub_cache_is_read_offline(repos, tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants as hub_constants

    commit = "a" * 40
    install_in_hub_cache(repos.base, tmp_path / "hub", "org/tiny", commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    opened = open_source("hf://org/tiny@main")
    assert opened.commit == commit and opened.kind == "model"
    cat = ingest(str(tmp_path / "c.zarr"), "hf://org/tiny@main")
    entry = cat.entry("fam").attrs
    assert entry["commit"] == commit and entry["source"] == "hf://org/tiny@main"
    assert entry["files"]["model.safetensors"] == sha256_file(repos.base / "model.safetensors")
    with pytest.raises(SourceError, match="hf://org/absent@main: not in the local hub cache"):
        open_source("hf://org/absent@main")


def test_hub_download_against_loopback_server(repos, tmp_path) -> None:
    repo = tmp_path / "served"
    shutil.copytree(repos.sharded, repo)
    (repo / "pytorch_model.bin").write_bytes(b"not fetched")  # outside allow_patterns
    (repo / "tokenizer.json").write_text("{}")
    commit = "b" * 40
    script = textwrap.dedent(
        """
        import json, sys
        from tvsplit.storage.sources import open_source
        opened = open_source(sys.argv[1])
        print(json.dumps({"commit": opened.commit, "folder": str(opened.location),
                          "n": len(opened.checkpoint), "files": opened.checksums()}))
        """
    )
    with loopback_hub({"org/served": (commit, repo)}) as (endpoint, log):
        env = {
            **os.environ,
            "HF_ENDPOINT": endpoint,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "0",
            **FAKE_CREDENTIALS,
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        out = subprocess.run(
            [sys.executable, "-c", script, "hf://org/served@main"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["commit"] == commit
    assert Path(result["folder"]).parts[-2:] == ("snapshots", commit)
    fetched = {p.name for p in Path(result["folder"]).iterdir()}
    assert fetched == {p.name for p in repo.iterdir()} - {"pytorch_model.bin"}
    assert "model.safetensors.index.json" in result["files"] and result["n"] > 10
    assert any(line.startswith("GET /api/models/org/served/revision/main") for line in log)
    assert any("/resolve/" + commit + "/model.safetensors.index.json" in line for line in log)
    assert not any(v in out.stdout + out.stderr for v in FAKE_CREDENTIALS.values())
    assert files_holding_credentials(tmp_path) == []  # the hub cache, its refs and snapshots
    cached = tmp_path / "hf" / "hub" / "models--org--served"
    assert (cached / "refs" / "main").read_text() == commit
