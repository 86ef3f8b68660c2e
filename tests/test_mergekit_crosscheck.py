"""Cross-check of tasks/edit.py against mergekit (benchmarks/mergekit_crosscheck.py).

CI runs the script itself (``make crosscheck`` in .ci/run, after ``make test``); the full run
here is slow (it may build mergekit's venv). The fast test checks that a mergekit that
cannot be installed is a failure with one line, never a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mergekit_crosscheck.py"


def test_no_mergekit_is_a_failure_not_a_skip(tmp_path: Path) -> None:
    env = dict(os.environ, TVSPLIT_MERGEKIT_VENV=str(tmp_path / "venv"), PATH=str(tmp_path))
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("FAIL: mergekit 0.1.5"), result.stdout
    assert "SKIP" not in result.stdout


@pytest.mark.slow
def test_edits_match_mergekit_within_float_tolerance() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.endswith(("yes", "NO"))]
    assert len(rows) == 5 and all(row.endswith("yes") for row in rows), result.stdout
    # the trim-threshold ties are present (the case where the definitions differ is exercised)
    ties_rows = [row for row in rows if row.startswith("ties")]
    assert all(int(row.split()[-6]) > 0 for row in ties_rows), result.stdout  # 'tied'
