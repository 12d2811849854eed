"""Interruption and divergence: SIGINT/SIGTERM write a resumable checkpoint and mid-epoch resume is bit-identical;
a NaN rolls the run back with lower learning rates, or stops it without keeping a diverged model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dfq.errors import DFQError
from dfq.models import create_model
from dfq.testing import tiny_config, tiny_trainer
from dfq.train import RunInterrupted, read_train_checkpoint
from dfq.train.finite import Diverged

SMALL = {"train__epochs": 3, "train__iters_per_epoch": 4}


def trainer(run_dir, **overrides):
    return tiny_trainer(tiny_config("adadfq", **{**SMALL, **overrides}), run_dir=run_dir)


def assert_same(a, b):
    for name in ("student", "generator"):
        sa, sb = getattr(a.game, name).state_dict(), getattr(b.game, name).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name} {k}"


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_signal_mid_epoch_then_resume_is_bit_identical(tmp_path, monkeypatch):
    ref = trainer(tmp_path / "ref")
    ref.run()

    interrupted = trainer(tmp_path / "run")
    method, calls = interrupted.game.method, []
    iteration = method.iteration

    def signalling(game, train_q):
        calls.append(1)
        if len(calls) == 6:  # epoch 1, iteration 1: the run stops after it, at iteration 2
            os.kill(os.getpid(), signal.SIGINT)
        return iteration(game, train_q)

    monkeypatch.setattr(method, "iteration", signalling)
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN in a background job
    with pytest.raises(RunInterrupted, match="resume") as info:
        interrupted.run()
    assert info.value.exit_code == 128 + signal.SIGINT
    ckpt = read_train_checkpoint(tmp_path / "run")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 2)
    assert signal.getsignal(signal.SIGINT) is before  # handler restored

    resumed = trainer(tmp_path / "run")
    resumed.run(resume=True)
    assert_same(resumed, ref)
    drop = ("train_seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "run")] == [
        {k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "ref")
    ]


def test_checkpoint_every_iters_writes_mid_epoch(tmp_path, monkeypatch):
    t = trainer(tmp_path, train__checkpoint_every_iters=3, train__epochs=1)
    saved = []
    save = t.save_checkpoint
    monkeypatch.setattr(t, "save_checkpoint", lambda: (saved.append((t.state.epoch, t.state.iteration)), save()))
    t.run()
    assert saved == [(0, 3), (1, 0)]
    assert read_train_checkpoint(tmp_path)["epoch"] == 1


def test_cli_sigterm_then_resume(tmp_path):
    torch.manual_seed(0)
    weights, out = tmp_path / "w.pt", tmp_path / "run"
    torch.save(create_model("resnet20a_cifar10").state_dict(), weights)
    # Epochs of one iteration: the run is still going when the signal comes, and its resume is short.
    schedule = ["method.train.epochs=60", "method.train.iters_per_epoch=1", "method.train.batch_size=2",
                "method.train.checkpoint_every=100"]  # fmt: skip
    cmd = [sys.executable, "-m", "dfq", "quantize", "resnet20a_cifar10", "--method", "adadfq", "--weights",
           str(weights), "--out", str(out), "--no-progress", "--json"]  # fmt: skip
    cmd += [arg for setting in schedule for arg in ("--set", setting)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "--resume" in err.strip().splitlines()[-1]
    assert (out / "checkpoint.pt").is_file() and not (out / "model.pt").exists()
    resume = [sys.executable, "-m", "dfq", "quantize", "resnet20a_cifar10", "--out", str(out), "--resume",
              "--no-progress", "--json"]  # fmt: skip
    done = subprocess.run(resume, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 60 and (out / "model.pt").is_file()


def _inject_nan(method, at_calls: set[int], monkeypatch) -> None:
    """Make the generator loss NaN on the given (1-based) generator-loss calls."""
    calls = []
    loss = method.generator_loss

    def nan_loss(out):
        calls.append(1)
        losses = loss(out)
        if len(calls) in at_calls:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(method, "generator_loss", nan_loss)


def test_nan_loss_rolls_back_with_lower_lr_and_finishes(tmp_path, monkeypatch):
    t = trainer(tmp_path)
    _inject_nan(t.game.method, {7}, monkeypatch)  # epoch 1, iteration 2
    _, summary = t.run()
    assert summary["rollbacks"] == 1 and t.state.lr_scale == 0.5
    assert all(torch.isfinite(v).all() for v in t.game.student.state_dict().values() if v.is_floating_point())
    lines = read_metrics(tmp_path)
    assert [r["epoch"] for r in lines] == [0, 1, 2]  # epoch 1 redone from its start, logged once
    assert lines[0]["q_lr"] == pytest.approx(1e-4) and lines[2]["q_lr"] == pytest.approx(1e-4 * 0.5)


def test_persistent_nan_stops_with_a_clear_error_and_no_nan_checkpoint(tmp_path, monkeypatch):
    t = trainer(tmp_path, train__max_rollbacks=2)
    _inject_nan(t.game.method, set(range(6, 1000)), monkeypatch)
    with pytest.raises(DFQError, match="non-finite again after 2 rollback"):
        t.run()
    ckpt = read_train_checkpoint(tmp_path)
    assert ckpt["epoch"] == 1  # the last good state, never a diverged one
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values() if v.is_floating_point())


def test_nan_gradient_is_detected():
    game = trainer(None).game
    hook = next(game.generator.parameters()).register_hook(lambda g: g * float("nan"))
    with pytest.raises(Diverged, match="generator gradient"):
        game.generator_step()
    hook.remove()
