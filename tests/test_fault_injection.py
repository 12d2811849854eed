"""Fault injection: SIGKILL at random moments, resume each time, end bit-identical to an uninterrupted run.

Slow (about a minute): run with ``pytest -m slow``. ``benchmarks/fault_injection.py`` records the figures.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dfq.models import create_model

pytestmark = pytest.mark.slow

PRESET = """\
method: adadfq
seed: 11
train: {epochs: 6, iters_per_epoch: 5, batch_size: 4, warmup_epochs: 1, observe_epochs: 1,
        checkpoint_every_iters: 1}
"""


def quantize_cmd(weights: Path, config: Path, out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "dfq", "quantize", "resnet20a_cifar10", "--out", str(out), "--no-progress"]
    return [*cmd, "--resume"] if resume else [*cmd, "--weights", str(weights), "--config", str(config)]


def run_with_kills(weights: Path, config: Path, out: Path, kills: int, seed: int) -> list[float]:
    """Start the run, SIGKILL it ``kills`` times at random moments (resuming each time), then let it finish."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(seed)
    delays = []
    for k in range(kills + 1):
        resume = (out / "checkpoint.pt").exists()
        proc = subprocess.Popen(
            quantize_cmd(weights, config, out, resume),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if k == kills:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err
            break
        delay = rng.uniform(2.0, 8.0)  # the interpreter and torch take ~2 s to start
        delays.append(delay)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if (out / "model.pt").exists():
            break
    return delays


def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path):
    weights, config = tmp_path / "w.pt", tmp_path / "preset.yaml"
    torch.manual_seed(0)
    torch.save(create_model("resnet20a_cifar10").state_dict(), weights)
    config.write_text(PRESET)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(quantize_cmd(weights, config, ref, False), env=env, check=True, capture_output=True)

    out = tmp_path / "killed"
    run_with_kills(weights, config, out, kills=10, seed=1234)
    a = torch.load(ref / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not list(out.glob(".*.tmp"))  # no half-written file left behind
    assert (out / "metrics.jsonl").read_text().count("\n") == 6
