"""The wheel installs one top-level package, `tvsplit`, and works from outside the checkout.

Builds the wheel from a copy of the sources (the checkout is not written to), installs it
with ``--no-deps --target`` into a temporary folder and runs the console script from a
working directory outside the checkout with ``python -S``: only that folder and the test
interpreter's site-packages are on the path (no ``.pth`` processing, so no editable
install of the checkout is visible).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "tvsplit", "storage", "tasks", "flows")
SETUPTOOLS_FOR_LICENSE_EXPRESSION = (77, 0)  # `license = "Apache-2.0"` (PEP 639)


def _site_packages() -> list[str]:
    return [p for p in sys.path if p.rstrip("/").endswith("site-packages")]


def _setuptools_dir() -> str | None:
    """A site-packages folder whose setuptools can build this project (the first one
    importable may be older: a venv's bundled copy), for ``--no-build-isolation``."""
    for folder in _site_packages():
        for dist in importlib.metadata.distributions(name="setuptools", path=[folder]):
            version = tuple(int(x) for x in dist.version.split(".")[:2] if x.isdigit())
            if version >= SETUPTOOLS_FOR_LICENSE_EXPRESSION:
                return folder
    return None


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"}
    build = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(tmp)]
    setuptools_dir = _setuptools_dir()
    if setuptools_dir is not None:  # fast: no isolated build environment to install
        build.append("--no-build-isolation")
        env["PYTHONPATH"] = setuptools_dir
    else:
        env.pop("PIP_NO_INDEX")
    built = _run(build, tmp, env)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = tmp.glob("tvsplit-*.whl")
    target = tmp / "site"
    env.pop("PYTHONPATH", None)
    done = _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        tmp,
        env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    work = tmp / "elsewhere"
    work.mkdir()
    run_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(target), *_site_packages()]),
        "TVSPLIT_DATA": str(tmp / "data"),
        "COLUMNS": "120",
    }
    return {"wheel": wheel, "target": target, "work": work, "env": run_env}


def _python(installed, *args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-S", *args], installed["work"], installed["env"])


def test_the_only_top_level_package_is_tvsplit(installed):
    with zipfile.ZipFile(installed["wheel"]) as archive:
        names = archive.namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"tvsplit"}
    for package in ("storage", "tasks", "flows"):
        assert f"tvsplit/{package}/__init__.py" in names
    assert "tvsplit/tasks/merges.py" in names
    assert "tvsplit/tasks/suites/vision/merging.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(installed["wheel"]) as archive:
        assert "tvsplit = tvsplit.cli:" in archive.read(entry_points).decode()


def test_installed_wheel_runs_from_outside_the_checkout(installed):
    script = str(installed["target"] / "bin" / "tvsplit")
    where = _python(installed, "-c", "import tvsplit.tasks.edit as e; print(e.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(installed["target"]))
    shown = _python(installed, script, "--help")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "decompose" in shown.stdout and "edit" in shown.stdout
    split = _python(installed, script, "demo", "--planted", "--size", "64", "--members", "3")
    assert split.returncode == 0, split.stdout + split.stderr
    assert "shared energy per member" in split.stdout
    for name in ("tasks", "storage", "flows"):
        missing = _python(installed, "-c", f"import {name}")
        assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr, name
