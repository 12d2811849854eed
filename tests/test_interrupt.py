"""Interruption: SIGINT/SIGTERM write a resumable checkpoint; mid-epoch resume is bit-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dfq.engine import Engine, RunInterrupted

from dfq.config import resolve_config
from dfq.models import create_model

SMALL = {
    "method": "adadfq",
    "seed": 5,
    "train.epochs": 3,
    "train.iters_per_epoch": 4,
    "train.batch_size": 4,
    "train.warmup_epochs": 1,
    "train.observe_epochs": 1,
}


def engine(run_dir, **overrides):
    torch.manual_seed(0)
    teacher = create_model("resnet20a_cifar10")
    config = resolve_config(None, {**SMALL, **overrides})
    return Engine(config, teacher, num_classes=10, input_size=(3, 32, 32), run_dir=run_dir, progress=False)


def states(e):
    return {
        **{f"q.{k}": v for k, v in e.student.state_dict().items()},
        **{f"g.{k}": v for k, v in e.generator.state_dict().items()},
    }


def assert_same(a, b):
    sa, sb = states(a), states(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_signal_mid_epoch_then_resume_is_bit_identical(tmp_path):
    ref = engine(tmp_path / "ref")
    ref.run()

    interrupted = engine(tmp_path / "run")
    calls = {"n": 0}
    original = interrupted._iteration

    def iteration(train_q):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 1, iteration 2
            os.kill(os.getpid(), signal.SIGINT)
        return original(train_q)

    interrupted._iteration = iteration
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN in a background job
    with pytest.raises(RunInterrupted, match="resume") as info:
        interrupted.run()
    assert info.value.exit_code == 128 + signal.SIGINT
    assert (interrupted.state.epoch, interrupted.state.iteration) == (1, 2)
    assert signal.getsignal(signal.SIGINT) is before  # handler restored

    resumed = engine(tmp_path / "run")
    resumed.run(resume=True)
    assert_same(resumed, ref)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    drop = ("train_seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in lines] == [
        {k: v for k, v in r.items() if k not in drop} for r in ref_lines
    ]


def test_checkpoint_every_iters_writes_mid_epoch(tmp_path):
    e = engine(tmp_path, **{"train.checkpoint_every_iters": 3, "train.epochs": 1})
    saved = []
    original = e._save_checkpoint
    e._save_checkpoint = lambda: (saved.append((e.state.epoch, e.state.iteration)), original())[1]
    e.run()
    assert saved == [(0, 3), (1, 0)]


def _write_weights(tmp_path: Path) -> Path:
    path = tmp_path / "w.pt"
    torch.manual_seed(0)
    torch.save(create_model("resnet20a_cifar10").state_dict(), path)
    return path


def test_cli_sigterm_then_resume(tmp_path):
    weights, out = _write_weights(tmp_path), tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "dfq",
        "quantize",
        "resnet20a_cifar10",
        "--method",
        "adadfq",
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--epochs",
        "40",
        "--iters-per-epoch",
        "5",
        "--batch-size",
        "4",
        "--no-progress",
        "--json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "--resume" in err.strip().splitlines()[-1]
    assert (out / "checkpoint.pt").is_file() and not (out / "model.pt").exists()
    resume = [
        sys.executable,
        "-m",
        "dfq",
        "quantize",
        "resnet20a_cifar10",
        "--out",
        str(out),
        "--resume",
        "--no-progress",
        "--json",
    ]
    done = subprocess.run(resume, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 40 and (out / "model.pt").is_file()


def _inject_nan(e, at_calls):
    """Make the generator loss NaN on the given (1-based) generator-step calls."""
    calls = {"n": 0}
    original = e.method.generator_loss

    def loss(out):
        calls["n"] += 1
        losses = original(out)
        if calls["n"] in at_calls:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    e.method.generator_loss = loss
    return calls


def test_nan_loss_rolls_back_with_lower_lr_and_finishes(tmp_path):
    e = engine(tmp_path)
    _inject_nan(e, {7})  # epoch 1, iteration 3
    _, summary = e.run()
    assert summary["rollbacks"] == 1 and e.state.lr_scale == 0.5
    assert all(torch.isfinite(t).all() for t in e.student.state_dict().values() if t.is_floating_point())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2]  # epoch 1 redone from its start, logged once
    assert lines[2]["q_lr"] == pytest.approx(1e-4 * 0.5)


def test_persistent_nan_stops_with_a_clear_error_and_no_nan_checkpoint(tmp_path):
    from dfq.engine import read_train_checkpoint

    from dfq.errors import DFQError

    e = engine(tmp_path, **{"train.max_rollbacks": 2})
    _inject_nan(e, set(range(6, 1000)))
    with pytest.raises(DFQError, match="non-finite again after 2 rollback"):
        e.run()
    ckpt = read_train_checkpoint(tmp_path)
    assert ckpt["epoch"] == 1  # the last good state, never a diverged one
    assert all(torch.isfinite(t).all() for t in ckpt["student"].values() if t.is_floating_point())


def test_nan_gradient_is_detected(tmp_path):
    e = engine(None)
    param = next(e.generator.parameters())
    hook = param.register_hook(lambda g: g * float("nan"))
    with pytest.raises(Exception, match="generator gradient"):
        e._generator_step()
    hook.remove()
