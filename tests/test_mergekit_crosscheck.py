"""Cross-check of tasks/edit.py against mergekit (benchmarks/mergekit_crosscheck.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mergekit_crosscheck.py"


@pytest.mark.slow
def test_edits_match_mergekit_within_float_tolerance() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=1800
    )
    if "SKIP:" in result.stdout:
        pytest.skip(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.endswith(("yes", "NO"))]
    assert len(rows) == 5 and all(row.endswith("yes") for row in rows), result.stdout
