"""The command line: `tvsplit demo` does real work and reports what it found."""

from __future__ import annotations

from tvsplit.flows.cli import app
from tvsplit.flows.demo import run_demo
from typer.testing import CliRunner


def test_demo_finds_every_planted_direction():
    rows = run_demo(size=128, members=4, noise=0.05, seed=1)
    for row in rows:
        if row.found is None:  # 1-D parameter: kept whole in the unique part
            assert row.split.k == 0 and float(row.split.shared_energy.max()) == 0.0
            continue
        assert row.split.k == row.param.shared_rank, row.param.name
        assert row.found.max_angle_deg < 5.0 and row.found.leak < 0.01, row


def test_demo_command_prints_the_table():
    result = CliRunner().invoke(app, ["demo", "--planted", "--size", "64", "--members", "3"])
    assert result.exit_code == 0, result.output
    for text in ("attn.q_proj.weight", "shared energy per member", "chance", "norm.weight"):
        assert text in result.output


def test_cli_lists_demo():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output
