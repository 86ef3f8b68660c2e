"""Bad input, as a user gives it on the command line: one ``error: ...`` line on stderr, exit
status 1, no traceback (unless ``--debug``), and nothing complete written.

Commands run through `tvsplit.cli.main`, the console entry point, in this process (a
subprocess per case would cost seconds of start-up each); one case runs the installed
entry point as a subprocess.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
import yaml

from tvsplit import cli


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``tvsplit ARGS`` through the entry point: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(code: int, err: str, *fragments: str) -> str:
    """Exit status 1 and stderr one ``error:`` line holding every fragment, no traceback."""
    assert code == 1, (code, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- the entry point
@pytest.fixture
def failing_app(monkeypatch):
    """`tvsplit` replaced by an app whose commands raise (what a bug or a missed check does)."""
    app = typer.Typer()

    @app.callback()
    def options(debug: bool = typer.Option(False, "--debug")) -> None:
        """Accepts the global option as the real app does."""

    @app.command()
    def bug() -> None:
        raise RuntimeError("a\nbug")

    @app.command()
    def user() -> None:
        raise ValueError("recipe.yaml: invalid recipe\n  - method: unknown method 'x'")

    monkeypatch.setattr(cli, "app", app)
    monkeypatch.delenv("TVSPLIT_DEBUG", raising=False)
    return app


def test_an_escaped_error_is_one_line_without_traceback(failing_app, capsys):
    code, _, err = run_cli(capsys, "user")
    line = assert_one_error(code, err, "recipe.yaml: invalid recipe; method: unknown method 'x'")
    assert "--debug" in line
    code, _, err = run_cli(capsys, "bug")
    assert_one_error(code, err, "RuntimeError: a; bug")


def test_debug_shows_the_traceback(failing_app, capsys, monkeypatch):
    with pytest.raises(RuntimeError, match="bug"):
        cli.main(["--debug", "bug"])
    monkeypatch.setenv("TVSPLIT_DEBUG", "1")
    with pytest.raises(ValueError, match="invalid recipe"):
        cli.main(["user"])


def test_installed_entry_point_is_main(tmp_path):
    missing = tmp_path / "missing.yaml"
    done = subprocess.run(
        [sys.executable, "-c", "from tvsplit.cli import main; main()", "edit", str(missing)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "TVSPLIT_DATA": str(tmp_path / "data")},
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"error: {missing}: cannot read the recipe" in done.stderr


# --------------------------------------------------------------------------- a catalogue
@pytest.fixture(scope="module")
def catalogue(repos, tmp_path_factory, prefect_harness):
    """Families 'tiny' (ft1, ft2), 'other' (alien) and 'solo' (ft1) on the tiny GPT-2 base."""
    from tvsplit.flows.ingest import ingest

    root = tmp_path_factory.mktemp("bad-inputs")
    spec = {
        "families": {
            "tiny": {
                "base": str(repos.base),
                "members": {"ft1": str(repos.ft1), "ft2": str(repos.ft2)},
            },
            "other": {"base": str(repos.base), "members": {"alien": str(repos.ft2)}},
            "solo": {"base": str(repos.base), "members": {"ft1": str(repos.ft1)}},
        }
    }
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    url = str(root / "catalogue.zarr")
    ingest(spec_path, url, progress=False)
    return SimpleNamespace(url=url, root=root, base=repos.base, repos=repos)


def _recipe(tmp_path, catalogue, name: str = "recipe.yaml", **fields: object) -> Path:
    recipe = {
        "base": str(catalogue.base),
        "family": "tiny",
        "method": "task_arithmetic",
        "members": [{"name": "ft1", "weight": 1.0}],
        **fields,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to show that nothing changed)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _edit(capfd, catalogue, recipe: Path, out: Path, *flags: str) -> tuple[int, str, str]:
    return run_cli(
        capfd, "edit", str(recipe), "--out", str(out), "--catalogue", catalogue.url,
        "--no-track", *flags,
    )  # fmt: skip


#: (recipe fields, the message fragment). Each is refused before any engine starts.
BAD_RECIPES = {
    "unknown key": ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    "misspelled method": (
        {"method": "task_arithmetc"},
        "method: unknown edit method 'task_arithmetc'",
    ),
    "unknown member": (
        {"members": [{"name": "ft9"}]},
        "members[0].name: family 'tiny' has no member 'ft9' (members: ft1, ft2)",
    ),
    "member of another family": (
        {"members": [{"name": "ft1"}, {"name": "alien"}]},
        "members[1].name: 'alien' is a member of family 'other', not of 'tiny'",
    ),
    "negative density": (
        {"method": "ties", "params": {"density": -0.5}},
        "params.density: Input should be greater than 0",
    ),
    "density above 1": (
        {"method": "ties", "params": {"density": 1.5}},
        "params.density: Input should be less than or equal to 1",
    ),
    "non-finite weight": (
        {"members": [{"name": "ft1", "weight": float("nan")}]},
        "members[0].weight: Input should be a finite number",
    ),
    "non-finite scale": (
        {"method": "negation", "params": {"scale": float("inf")}},
        "params.scale: Input should be a finite number",
    ),
    "missing decomposition run": (
        {"method": "unique_negation", "decomposition": "r0"},
        "decomposition: family 'tiny' has no run 'r0'",
    ),
    "method needing a run without one": (
        {"method": "unique_negation"},
        "decomposition: method 'unique_negation' reads shared/unique parts",
    ),
    "../x as member": ({"members": [{"name": "../x"}]}, "member name '../x' is not allowed"),
    "../x as family": ({"family": "../x"}, "family: family name '../x' is not allowed"),
    "../x as run": (
        {"method": "unique_negation", "decomposition": "../x"},
        "decomposition: run name '../x' is not allowed",
    ),
    "../x as excluded_from": (
        {"excluded_from": "../x"},
        "excluded_from: member name '../x' is not allowed",
    ),
    "unknown excluded_from": (
        {"excluded_from": "ft7"},
        "excluded_from: family 'tiny' has no member 'ft7'",
    ),
    "unknown family": ({"family": "huge"}, "family: no family 'huge' in catalogue"),
    "no members": ({"members": []}, "members: List should have at least 1 item"),
    "base that does not exist": (
        {"base": "/nonexistent/base"},
        "/nonexistent/base: no such file or folder",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipe_is_one_line_and_writes_nothing(case, catalogue, tmp_path, capfd):
    fields, fragment = BAD_RECIPES[case]
    recipe = _recipe(tmp_path, catalogue, **fields)
    code, _, err = _edit(capfd, catalogue, recipe, tmp_path / "out")
    assert_one_error(code, err, str(recipe), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "the recipe is empty"),
        (b"   \n# only a comment\n", "the recipe is empty"),
        (b"base: [unclosed\nfamily: tiny\n", "not valid YAML at line"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a text (UTF-8) file"),
        (b"base: x\x00\x00\x00", "not a text file (it holds NUL bytes)"),
        (b"- a\n- list\n", "a recipe is a mapping"),
    ],
    ids=["empty", "comment only", "malformed", "binary", "nul bytes", "a list"],
)
def test_unreadable_recipe_is_named(content, fragment, catalogue, tmp_path, capfd):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    code, _, err = _edit(capfd, catalogue, recipe, tmp_path / "out")
    assert_one_error(code, err, str(recipe), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_missing_recipe_is_named(catalogue, tmp_path, capfd):
    code, _, err = _edit(capfd, catalogue, tmp_path / "nope.yaml", tmp_path / "out")
    assert_one_error(code, err, f"{tmp_path / 'nope.yaml'}: cannot read the recipe")
    assert list(tmp_path.iterdir()) == []


def test_output_folder_rules(catalogue, tmp_path, capfd):
    recipe = _recipe(tmp_path, catalogue)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    code, _, err = _edit(capfd, catalogue, recipe, existing)
    assert_one_error(code, err, f"--out: {existing} exists; pass --overwrite")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for flags in ((), ("--overwrite",)):
        code, _, err = _edit(capfd, catalogue, recipe, a_file, *flags)
        assert_one_error(code, err, f"--out: {a_file} is a file, not a model folder")
    code, _, err = _edit(capfd, catalogue, recipe, a_file / "inside", "--overwrite")
    assert_one_error(code, err, f"--out: {a_file} is a file, so {a_file / 'inside'} cannot be")
    lora_file = tmp_path / "model-lora"
    lora_file.write_text("x")
    code, _, err = _edit(capfd, catalogue, recipe, tmp_path / "model", "--overwrite")
    assert_one_error(code, err, f"--out: {lora_file} is a file, not a model folder")
    assert (existing / "keep.txt").read_text() == "mine" and a_file.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a-file", "existing", "model-lora", "recipe.yaml",
    ]  # fmt: skip


def test_negative_scale_is_legitimate(catalogue, tmp_path):
    from tvsplit.flows.checks import check_edit

    recipe = _recipe(tmp_path, catalogue, method="negation", params={"scale": -1.0})
    checked = check_edit(recipe, output=str(tmp_path / "out"), catalogue_url=catalogue.url)
    assert checked.recipe.method_params.scale == -1.0


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A model with the family's shapes but other weights."""
    from fixtures_models import save_model, tiny_gpt2

    return save_model(tiny_gpt2(7), tmp_path_factory.mktemp("other-base") / "model")


def test_other_base_is_refused_unless_allowed(catalogue, other_base, tmp_path, capfd):
    recipe = _recipe(tmp_path, catalogue, base=str(other_base))
    code, _, err = _edit(capfd, catalogue, recipe, tmp_path / "out")
    assert_one_error(
        code, err, f"base: {str(other_base)!r} is not the base of family 'tiny'",
        "model.safetensors has sha256", "--allow-other-base",
    )  # fmt: skip
    assert not (tmp_path / "out").exists()
    from tvsplit.flows.checks import check_edit

    check_edit(
        recipe, output=str(tmp_path / "out"), catalogue_url=catalogue.url, allow_other_base=True
    )


def test_base_copy_is_accepted_and_the_recorded_base_is_not_reread(
    catalogue, tmp_path, monkeypatch
):
    import shutil

    import tvsplit.storage.base_identity as identity
    from tvsplit.flows.checks import check_edit

    copy = tmp_path / "copy"
    shutil.copytree(catalogue.base, copy)
    check_edit(
        _recipe(tmp_path, catalogue, base=str(copy)),
        catalogue_url=catalogue.url,
        output=str(tmp_path / "o"),
    )

    def no_reading(path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(identity, "sha256_file", no_reading)
    recipe = _recipe(tmp_path, catalogue, name="same.yaml")
    check_edit(recipe, catalogue_url=catalogue.url, output=str(tmp_path / "o"))
    with pytest.raises(AssertionError, match="read again"):  # a copy has its own mtime
        check_edit(
            _recipe(tmp_path, catalogue, base=str(copy)),
            catalogue_url=catalogue.url,
            output=str(tmp_path / "o"),
        )


def test_good_edit_through_the_cli(catalogue, tmp_path, capfd):
    out = tmp_path / "out"
    code, stdout, err = _edit(capfd, catalogue, _recipe(tmp_path, catalogue), out)
    assert code == 0, err
    assert "wrote" in stdout and (out / "config.json").is_file()


# --------------------------------------------------------------------------- decompose
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


BAD_DECOMPOSE = {
    "workers 0": (("tiny", "--workers", "0"), "--workers: must be at least 1, not 0"),
    "min-tasks above members": (
        ("tiny", "--min-tasks", "3"),
        "--min-tasks: min_tasks must be between 1 and 2, not 3 (the split has 2 members)",
    ),
    "rank energy:2": (
        ("tiny", "--rank", "energy:2"),
        "--rank: rank rule 'energy:2': energy must be in (0, 1]",
    ),
    "rank fixed:-1": (
        ("tiny", "--rank", "fixed:-1"),
        "--rank: rank rule 'fixed:-1': fixed rank must be a whole number >= 1",
    ),
    "rank foo": (("tiny", "--rank", "foo"), "--rank: unknown rank rule 'foo'"),
    "one-member family": (("solo",), "family 'solo': a split needs at least 2 members, got 1"),
    "unknown family": (("huge",), "no family 'huge' in catalogue"),
    "unknown member": (
        ("tiny", "-m", "ft1", "-m", "ft9"),
        "family 'tiny' has no complete member 'ft9'",
    ),
    "../x as family": (("../x",), "family name '../x' is not allowed"),
    "threshold above 1": (
        ("tiny", "--threshold", "1.5"),
        "--threshold: Input should be less than or equal to 1",
    ),
    "projector-product min-tasks": (
        ("tiny", "--method", "projector-product", "--min-tasks", "1"),
        "--min-tasks: projector-product finds only directions shared by all 2 members",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DECOMPOSE))
def test_bad_decompose_settings_fail_at_once_and_write_nothing(case, catalogue, capfd):
    args, fragment = BAD_DECOMPOSE[case]
    before = _listing(Path(catalogue.url))
    code, _, err = run_cli(capfd, "decompose", *args, "--catalogue", catalogue.url, "--no-track")
    assert_one_error(code, err, fragment)
    assert _listing(Path(catalogue.url)) == before


def test_scheduler_where_nothing_listens(catalogue, capfd):
    address = f"tcp://127.0.0.1:{_free_port()}"
    before = _listing(Path(catalogue.url))
    code, _, err = run_cli(
        capfd, "decompose", "tiny", "--scheduler", address, "--catalogue", catalogue.url,
        "--no-track",
    )  # fmt: skip
    assert_one_error(code, err, f"--scheduler: nothing answers at {address}")
    assert _listing(Path(catalogue.url)) == before


# --------------------------------------------------------------------------- model files
@pytest.fixture
def _prefect_logging(catalogue):
    """Prefect's log handlers are set up by the module's first flow (the catalogue's ingest),
    outside any one test's output capture: a handler bound to a test's captured stream
    fails once that capture is closed."""


def _ingest(capfd, repos, tmp_path, member: Path, *flags: str) -> tuple[int, str, str]:
    """``tvsplit ingest`` of family 'fam' (the tiny base) with one member 'bad' at
    ``member``; asserts that no traceback was printed and that 'bad' is not complete."""
    from tvsplit.storage.catalogue import Catalogue

    spec = tmp_path / "spec.yaml"
    family = {"base": str(repos.base), "members": {"bad": str(member)}}
    spec.write_text(yaml.safe_dump({"families": {"fam": family}}))
    url = str(tmp_path / "c.zarr")
    code, out, err = run_cli(
        capfd, "ingest", str(spec), "--catalogue", url, "--no-progress", *flags
    )
    assert code == 1, (out, err)
    assert "Traceback" not in out + err, out + err
    assert [line for line in err.splitlines() if line.startswith("error: ")], err
    assert "bad" not in Catalogue(url).members("fam")
    return code, out, err


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, to))


def _header(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and its data bytes."""
    import json
    import struct

    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _write_with_header(path: Path, header: dict, data: bytes) -> None:
    import json
    import struct

    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_index_naming_a_shard_outside_its_folder_is_refused(
    _prefect_logging, repos, tmp_path, capfd
):
    import json

    member = _copy(repos.sharded, tmp_path / "member")
    index = member / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    name, shard = next(iter(content["weight_map"].items()))
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((member / shard).read_bytes())  # a readable file: must not be read
    content["weight_map"][name] = "../outside.safetensors"
    index.write_text(json.dumps(content))
    _, _, err = _ingest(capfd, repos, tmp_path, member)
    assert (
        f"weight_map entry {name!r} names '../outside.safetensors', outside the checkpoint's folder; refused"
        in err
    )


def test_index_naming_a_shard_without_the_tensor_is_refused(
    _prefect_logging, repos, tmp_path, capfd
):
    import json

    member = _copy(repos.sharded, tmp_path / "member")
    index = member / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    shards = sorted(set(content["weight_map"].values()))
    name = next(n for n, s in content["weight_map"].items() if s == shards[0])
    content["weight_map"][name] = shards[1]
    index.write_text(json.dumps(content))
    _, _, err = _ingest(capfd, repos, tmp_path, member)
    assert f"shard {shards[1]} does not hold {name!r}" in err


def test_truncated_safetensors_is_refused(_prefect_logging, repos, tmp_path, capfd):
    member = _copy(repos.ft1, tmp_path / "member")
    weights = member / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    _, _, err = _ingest(capfd, repos, tmp_path, member)
    assert f"{weights}: not a readable safetensors file" in err


def test_corrupt_header_is_refused(_prefect_logging, repos, tmp_path, capfd):
    member = _copy(repos.ft1, tmp_path / "member")
    weights = member / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[8:40] = b"\xff" * 32
    weights.write_bytes(bytes(raw))
    _, _, err = _ingest(capfd, repos, tmp_path, member)
    assert f"{weights}: not a readable safetensors file" in err


@pytest.mark.parametrize("lie", ["shape", "offsets"])
def test_header_sizes_that_disagree_with_the_file_are_refused(
    _prefect_logging, lie, repos, tmp_path, capfd
):
    member = _copy(repos.ft1, tmp_path / "member")
    weights = member / "model.safetensors"
    header, data = _header(weights)
    name = next(k for k in header if k != "__metadata__")
    if lie == "shape":  # twice the elements the offsets hold
        header[name]["shape"] = [2 * header[name]["shape"][0], *header[name]["shape"][1:]]
    else:  # the last tensor ends past the end of the file
        last = max(
            (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1]
        )
        header[last]["data_offsets"][1] += 4096
    _write_with_header(weights, header, data)
    _, _, err = _ingest(capfd, repos, tmp_path, member)
    assert f"{weights}: not a readable safetensors file" in err


class _Evil:
    """Pickles to a call that creates a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("format", ["zip", "legacy"])
def test_malicious_pickle_runs_no_code(_prefect_logging, format, repos, tmp_path, capfd):
    import pickle
    import shutil

    import torch

    member = tmp_path / "member"
    member.mkdir()
    shutil.copy(repos.ft1 / "config.json", member / "config.json")
    marker = tmp_path / "marker"
    payload = {"transformer.wte.weight": torch.zeros(2, 2), "evil": _Evil(marker)}
    if format == "zip":
        torch.save(payload, member / "pytorch_model.bin")
    else:
        with open(member / "pytorch_model.bin", "wb") as handle:
            pickle.dump(payload, handle)
    _, _, err = _ingest(capfd, repos, tmp_path, member, "--allow-pickle")
    assert (
        "pytorch_model.bin: refused, it cannot be loaded as plain data with weights_only=True"
        in err
    )
    assert not marker.exists()
    again = tmp_path / "without-allow-pickle"
    again.mkdir()
    _, _, err = _ingest(capfd, repos, again, member)
    assert "pickle checkpoints can run arbitrary code when loaded and are refused" in err
    assert not marker.exists()


def test_lora_config_naming_modules_absent_from_the_base_is_refused(
    _prefect_logging, repos, tmp_path, capfd
):
    import json

    from fixtures_models import lora_adapter

    adapter = tmp_path / "adapter"
    lora_adapter(repos.base_model, adapter, seed=3, r=2, target_modules=["c_attn"])
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = ["c_attn", "q_proj"]
    config_path.write_text(json.dumps(config))
    _, _, err = _ingest(capfd, repos, tmp_path, adapter)
    assert f"{config_path}: target_modules names 'q_proj', which is no module of the base" in err


def test_run_decompose_checks_before_any_engine(catalogue):
    from tvsplit.flows.checks import InputError
    from tvsplit.flows.decompose import run_decompose
    from tvsplit.tasks.split_settings import SplitSettings

    before = _listing(Path(catalogue.url))
    calls = {
        "--workers: must be at least 1": {"workers": 0},
        "--min-tasks: min_tasks must be between 1 and 2": {"settings": SplitSettings(min_tasks=4)},
        "--scheduler: nothing answers": {"scheduler": f"tcp://127.0.0.1:{_free_port()}"},
    }
    for message, kwargs in calls.items():
        with pytest.raises(InputError, match=message):
            run_decompose("tiny", catalogue_url=catalogue.url, track=False, **kwargs)
    assert _listing(Path(catalogue.url)) == before


def test_base_that_is_no_full_model_is_refused(catalogue, tmp_path, capfd):
    from fixtures_models import lora_adapter

    adapter = tmp_path / "adapter"
    lora_adapter(catalogue.repos.base_model, adapter, seed=4, r=2, target_modules=["c_attn"])
    broken = tmp_path / "broken.safetensors"
    broken.write_text("not safetensors")
    cases = {
        str(adapter): f"base: {str(adapter)!r} is not a full model (a lora)",
        str(broken): f"base: {broken}: not a readable safetensors file",
    }
    for base, fragment in cases.items():
        recipe = _recipe(tmp_path, catalogue, base=base)
        for flags in ((), ("--allow-other-base",)):
            code, _, err = _edit(capfd, catalogue, recipe, tmp_path / "out", *flags)
            assert_one_error(code, err, str(recipe), fragment)
    assert not (tmp_path / "out").exists()
