"""Commands that do no model work import none of the heavy engines (issue 20, item 2).

Each command runs in a fresh interpreter (``tvsplit.cli.main``, as the console script does),
which then reports which of torch, Prefect, Dask and MLflow are in ``sys.modules``. Not a
timed test: benchmarks/cli_bench.py measures what this saves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "prefect", "dask", "distributed", "mlflow")

PROBE = """
import json, sys
from tvsplit.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
else:
    code = 0
heavy = [m for m in {heavy!r} if m in sys.modules]
print("\\nPROBE " + json.dumps({{"code": code, "heavy": heavy}}))
"""


def _run(args: list[str], cwd: Path, probe: str = PROBE) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TVSPLIT_CATALOGUE", "TVSPLIT_DATA")}
    result = subprocess.run(
        [sys.executable, "-c", probe.format(heavy=HEAVY), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, result.stdout + result.stderr
    report = json.loads(lines[-1].removeprefix("PROBE "))
    report["output"] = result.stdout + result.stderr
    return report


def _recipe(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def family_catalogue(tmp_path: Path) -> Path:
    """A data folder whose catalogue holds family ``fam`` (members a, b), written directly."""
    import torch
    from tvsplit.storage.catalogue import Catalogue

    cat = Catalogue(str(tmp_path / "tvsplit-data" / "catalogue.zarr"))
    for member in (None, "a", "b"):
        writer = cat.writer("fam", member, {"source": f"synthetic:{member}"})
        writer.write("w", torch.ones(4, 3), {"source": "synthetic"})
        writer.finish(["w"], {"source": f"synthetic:{member}"})
    return tmp_path


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--version"], ["catalogue", "ls"], ["edit", "--help"], ["ingest", "--help"]],
    ids=" ".join,
)
def test_commands_without_model_work_import_no_engine(tmp_path, args):
    report = _run(args, tmp_path)
    assert report["code"] in (0, None), report["output"]
    assert report["heavy"] == [], report["output"]


BAD_FIELD = (
    "base: ./base\nfamily: fam\nmethod: ties\nparams: {density: 2.0}\nmembers: [{name: a}]\n"
)
NO_FAMILY = "base: ./base\nfamily: nosuch\nmethod: task_arithmetic\nmembers: [{name: a}]\n"
NO_MEMBER = "base: ./base\nfamily: fam\nmethod: task_arithmetic\nmembers: [{name: zzz}]\n"


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (BAD_FIELD, "params.density"),
        (NO_FAMILY, "no family 'nosuch'"),
        (NO_MEMBER, "no member 'zzz'"),
        (None, "recipe.yaml"),  # a recipe file that does not exist
    ],
    ids=["bad field", "no family", "no member", "no file"],
)
def test_an_input_error_imports_no_engine(family_catalogue, recipe, message):
    folder = family_catalogue
    path = str(folder / "recipe.yaml") if recipe is None else _recipe(folder, "r.yaml", recipe)
    report = _run(["edit", path], folder)
    assert report["code"] == 1, report["output"]
    assert message in report["output"]
    assert report["heavy"] == [], report["output"]


def test_the_probe_sees_an_engine_a_command_imports(tmp_path):
    """The same probe reports torch once a stand-in is used (it can fail)."""
    probe = PROBE.replace(
        "main(sys.argv[1:])",
        "from tvsplit.tasks.edit import compute_dtype; compute_dtype(); main(sys.argv[1:])",
    )
    report = _run(["--version"], tmp_path, probe)
    assert report["heavy"] == ["torch"], report["output"]


def test_a_lazy_module_is_imported_on_first_attribute_only(tmp_path):
    code = (
        "import sys\n"
        "from tvsplit.storage.lazy import lazy_module\n"
        "colorsys = lazy_module('colorsys')\n"
        "assert 'colorsys' not in sys.modules\n"
        "assert colorsys.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)\n"
        "assert 'colorsys' in sys.modules\n"
        "assert colorsys.rgb_to_hsv is sys.modules['colorsys'].rgb_to_hsv\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


# Beyond the engines: what the two cheapest commands leave out (issue 20's ≤ 1.5 s).


def test_version_imports_not_even_the_app(tmp_path):
    """``--version`` prints the installed version without building the typer app."""
    probe = PROBE.replace("{heavy!r}", repr(("tvsplit.flows.cli", "typer", "pydantic_settings")))
    report = _run(["--version"], tmp_path, probe)
    assert report["code"] == 0, report["output"]
    assert report["output"].startswith("tvsplit "), report["output"]
    assert report["heavy"] == [], report["output"]
    # --version after a command name is the command's business, not the fast path
    probe_app = PROBE.replace("{heavy!r}", repr(("tvsplit.flows.cli",)))
    assert _run(["catalogue", "--help"], tmp_path, probe_app)["heavy"] == ["tvsplit.flows.cli"]


def test_listing_a_catalogue_that_does_not_exist_imports_no_zarr(tmp_path):
    probe = PROBE.replace("{heavy!r}", repr(("zarr", "numpy")))
    report = _run(["catalogue", "ls"], tmp_path, probe)
    assert report["code"] in (0, None), report["output"]
    assert "no families" in report["output"], report["output"]
    assert report["heavy"] == [], report["output"]
    assert not (tmp_path / "tvsplit-data" / "catalogue.zarr").exists()


def test_listing_an_existing_catalogue_still_reads_it(family_catalogue):
    report = _run(["catalogue", "ls"], family_catalogue)
    assert report["code"] in (0, None), report["output"]
    assert "fam" in report["output"] and "no families" not in report["output"]


def test_no_family_in_a_catalogue_that_does_not_exist_imports_no_zarr(tmp_path):
    probe = PROBE.replace("{heavy!r}", repr(("zarr", "numpy")))
    report = _run(["edit", _recipe(tmp_path, "r.yaml", NO_FAMILY)], tmp_path, probe)
    assert report["code"] == 1, report["output"]
    assert "no family 'nosuch'" in report["output"] and "(families: none)" in report["output"]
    assert report["heavy"] == [], report["output"]
