"""The ingest flow and CLI: spec validation, a mixed family end to end, skip on rerun,
failures reported per source, and kill-and-resume equal to a clean ingest."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from fixtures_models import lora_adapter
from tvsplit.flows.cli import app
from tvsplit.flows.ingest import IngestFailedError, SpecError, ingest, load_spec, parse_spec
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def write_spec(path: Path, families: dict) -> Path:
    path.write_text(yaml.safe_dump({"families": families}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def family(repos, tmp_path_factory) -> dict:
    """A family with a full fine-tune, a LoRA adapter and a sharded base."""
    root = tmp_path_factory.mktemp("family")
    lora_adapter(
        repos.base_model, root / "lora", seed=5, r=2, lora_alpha=4, target_modules=["c_fc"]
    )
    return {
        "base": str(repos.sharded),
        "members": {"ft1": str(repos.ft1), "lora": str(root / "lora"), "ft2": str(repos.ft2)},
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"families": {"f": {"members": {}}}}, "families.f.base: Field required"),
        ({"families": {"f": {"base": "x", "colour": 1}}}, "families.f.colour: Extra inputs"),
        ({"families": {"f": {"base": "s3://b/x"}}}, "families.f.base: 's3://b/x': unsupported"),
        (
            {"families": {"f": {"base": "x", "members": {"m": ""}}}},
            "families.f.members: member 'm'",
        ),
        (
            {"families": {"f": {"base": "x", "members": {"a/b": "y"}}}},
            "families.f.members: member name 'a/b'",
        ),
        (
            {"families": {"f": {"base": "x", "include": "h.*"}}},
            "families.f.include: Input should be",
        ),
        ({"families": {}}, "families: Dictionary should have at least 1 item"),
    ],
)
def test_bad_spec_fields_are_named(data: dict, message: str) -> None:
    with pytest.raises(SpecError, match="spec: " + message.replace(".", r"\.").replace("(", r"\(")):
        parse_spec(data)


def test_spec_sources_resolve_against_the_spec_folder(tmp_path) -> None:
    spec = load_spec(
        write_spec(tmp_path / "s.yaml", {"f": {"base": "hf://o/n@r", "members": {"m": "sub/x"}}})
    )
    assert spec.families["f"].base == "hf://o/n@r"
    assert spec.families["f"].members["m"] == str(tmp_path / "sub" / "x")
    (tmp_path / "bad.yaml").write_text("families: [unclosed")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def _arrays(url: str) -> dict[str, np.ndarray]:
    """Every array of a catalogue by path (the ground truth for comparisons)."""
    out: dict[str, np.ndarray] = {}

    def visit(group: zarr.Group, prefix: str) -> None:
        for name, array in group.arrays():
            out[f"{prefix}{name}"] = array[...]
        for name, sub in group.groups():
            visit(sub, f"{prefix}{name}/")

    visit(zarr.open_group(url, mode="r"), "")
    return out


def test_flow_ingests_a_mixed_family_then_skips_it(prefect_harness, family, tmp_path) -> None:
    url = str(tmp_path / "c.zarr")
    spec = write_spec(tmp_path / "spec.yaml", {"fam": family})
    rows = ingest(spec, url, progress=False)
    assert [(r["entry"], r["status"]) for r in rows] == [
        ("fam/base", "ingested"),
        ("fam/vectors/ft1", "ingested"),
        ("fam/vectors/lora", "ingested"),
        ("fam/vectors/ft2", "ingested"),
    ]
    again = ingest(spec, url, progress=False)
    assert {r["status"] for r in again} == {"skipped"}
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:  # the newest: other tests ingest too
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tvsplit-ingest"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    assert artifacts and artifacts[0].type == "table"
    assert "fam/vectors/lora" in str(artifacts[0].data)

    result = CliRunner().invoke(app, ["catalogue", "ls", "--catalogue", url])
    assert result.exit_code == 0 and "ft1, ft2, lora" in result.output
    result = CliRunner().invoke(app, ["catalogue", "show", "fam", "--catalogue", url])
    assert result.exit_code == 0 and "fam/vectors/lora" in result.output
    os.environ["TVSPLIT_CATALOGUE"] = url
    try:
        result = CliRunner().invoke(app, ["catalogue", "rm", "fam", "--member", "ft2"])
    finally:
        del os.environ["TVSPLIT_CATALOGUE"]
    assert result.exit_code == 0 and "deleted fam/vectors/ft2" in result.output


def test_failures_are_reported_per_source_and_exit_nonzero(
    prefect_harness, family, tmp_path
) -> None:
    url = str(tmp_path / "c.zarr")
    bad = {**family, "members": {"ft1": family["members"]["ft1"], "gone": str(tmp_path / "nope")}}
    with pytest.raises(IngestFailedError) as error:
        ingest(write_spec(tmp_path / "spec.yaml", {"fam": bad}), url, progress=False)
    statuses = {r["entry"]: r["status"] for r in error.value.rows}
    assert statuses == {
        "fam/base": "ingested",
        "fam/vectors/ft1": "ingested",
        "fam/vectors/gone": "failed",
    }
    assert "nope: no such file or folder" in str(error.value)

    spec = write_spec(
        tmp_path / "b.yaml", {"g": {"base": str(tmp_path / "absent"), "members": {"m": "x"}}}
    )
    result = CliRunner().invoke(app, ["ingest", str(spec), "--catalogue", url, "--no-progress"])
    assert result.exit_code == 1
    assert "g/vectors/m" in result.output and "not run" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "missing.yaml"), "--catalogue", url])
    assert result.exit_code == 1 and "cannot read" in result.output


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import tvsplit.storage.catalogue as catalogue
    from tvsplit.storage.names import param_key

    limit = int(sys.argv[1])
    calls = 0
    original = catalogue.EntryWriter.write

    def write(self, name, tensor, attrs):
        global calls
        calls += 1
        if calls <= limit:
            return original(self, name, tensor, attrs)
        # Crash mid-array: data written, completion never marked.
        shape = tuple(tensor.shape) if tensor is not None else tuple(attrs["shape"])
        array = self._group.create_array(name=param_key(name), shape=shape, dtype="float32",
                                         overwrite=True, attributes={"tvsplit": {"status": "partial"}})
        array[...] = 7.0
        os.kill(os.getpid(), signal.SIGKILL)

    catalogue.EntryWriter.write = write
    from tvsplit.flows.cli import app
    app(sys.argv[2:])
    """
)


def test_kill_and_resume_matches_a_clean_ingest(prefect_harness, family, tmp_path) -> None:
    from prefect.settings import PREFECT_API_URL

    spec = write_spec(tmp_path / "spec.yaml", {"fam": family})
    clean, resumed = str(tmp_path / "clean.zarr"), str(tmp_path / "resumed.zarr")
    ingest(spec, clean, progress=False)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    n_params = len(
        zarr.open_group(clean, mode="r")["families/fam/base"].attrs["tvsplit"]["parameters"]
    )
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLER,
            str(n_params + 20),
            "ingest",
            str(spec),
            "--catalogue",
            resumed,
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    group = zarr.open_group(resumed, mode="r")["families/fam"]
    assert group["base"].attrs["tvsplit"]["status"] == "complete"
    assert group["vectors/ft1"].attrs["tvsplit"]["status"] == "partial"  # killed inside ft1

    rows = ingest(spec, resumed, progress=False)
    assert [r["status"] for r in rows] == ["skipped", "resumed", "ingested", "ingested"]
    assert rows[1]["written"] == rows[1]["parameters"] - 20
    want, got = _arrays(clean), _arrays(resumed)
    assert want.keys() == got.keys()
    for path, array in want.items():
        np.testing.assert_array_equal(got[path], array, err_msg=path)


def test_only_network_errors_are_retried() -> None:
    from prefect.states import Failed
    from tvsplit.storage.errors import SourceError, SourceUnavailableError
    from tvsplit.tasks.ingest import _network_error, ingest_source

    assert ingest_source.retries == 3 and ingest_source.retry_condition_fn is _network_error
    assert _network_error(None, None, Failed(data=SourceUnavailableError("hub down")))
    assert not _network_error(None, None, Failed(data=SourceError("bad input")))
    assert not _network_error(None, None, Failed(message="bad input"))


def test_layers_import_only_downwards() -> None:
    import ast

    rules = {"storage": ("tasks", "flows", "prefect", "dask"), "tasks": ("flows",)}
    for package, forbidden in rules.items():
        for path in (ROOT / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                for name in names:
                    assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
