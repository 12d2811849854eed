"""Fault injection on real processes (slow, about a minute): ``pytest -m slow``.

Runs ``benchmarks/fault_injection.py``: 10 SIGKILLs at seeded random moments with a resume after each must end
bit-identical to an uninterrupted run, with no half-written file; SIGTERM must exit 143 with a checkpoint;
injected NaNs must be rolled back or stop the run cleanly.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from fault_injection import main

pytestmark = pytest.mark.slow


def test_faults_are_survived(tmp_path):
    result = main(["--kills", "10", "--seed", "1234", "--out", str(tmp_path / "result.json")])
    assert result["kills"] == 10
    assert result["bit_identical_to_uninterrupted"]
    assert result["stale_tmp_files_at_end"] == 0 and result["metrics_lines"] == 6
    assert result["sigterm"]["exit_code"] == 128 + signal.SIGTERM and result["sigterm"]["checkpoint_saved"]
    assert "--resume" in result["sigterm"]["message"]
    assert result["nan"]["transient_nan_rollbacks"] == 1 and result["nan"]["transient_run_finished_finite"]
    assert result["nan"]["persistent_nan_stopped_with_error"]
