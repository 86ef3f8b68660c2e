"""Bad input, as a user gives it on the command line: one ``error: ...`` line on stderr, exit
status 1, no traceback (unless ``--debug``), and nothing complete written.

Commands run through `tvsplit.cli.main`, the console entry point, in this process (a
subprocess per case would cost seconds of start-up each); one case runs the installed
entry point as a subprocess.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer

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
