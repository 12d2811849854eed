"""``train.fast``: bfloat16 autocast and channels-last. Not exact, so the tests check that it runs every method,
keeps the numerics that must stay float32 (codes, BNS statistics, losses) and stays close to the exact mode."""

from __future__ import annotations

import pytest
import torch
from test_engine import make_config, make_engine, quiet_bar

from dfq.generators import BNStatsLoss
from dfq.quant import ActMode, ActQuantizer, QuantSpec

pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")


@pytest.mark.parametrize("method", ["gdfq", "zaq", "adasg", "adadfq"])
def test_fast_mode_runs_every_method_to_a_finite_model(method, tmp_path):
    engine = make_engine(make_config(method, train__fast=True), run_dir=tmp_path)
    student, summary = engine.run()
    assert summary["epochs"] == 2
    assert all(torch.isfinite(t).all() for t in student.state_dict().values() if t.is_floating_point())


def test_fast_mode_resumes_bit_identically(tmp_path):
    full = make_engine(make_config("adadfq", train__fast=True, train__epochs=3), run_dir=tmp_path / "a")
    reference, _ = full.run()
    part = make_engine(make_config("adadfq", train__fast=True, train__epochs=3), run_dir=tmp_path / "b")
    part._run_epoch(0, quiet_bar())
    part._run_epoch(1, quiet_bar())
    resumed, _ = make_engine(make_config("adadfq", train__fast=True, train__epochs=3), run_dir=tmp_path / "b").run(
        resume=True
    )
    ref, got = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_fast_iteration_is_close_to_the_exact_one():
    """The same state and batch in both modes: the losses agree to bfloat16 precision, not exactly."""
    logs = {}
    for fast in (False, True):
        engine = make_engine(make_config("gdfq", train__fast=fast, train__warmup_epochs=0))
        engine._iteration(True)  # observe ranges once
        logs[fast] = engine._iteration(True)
    for key in ("g_loss", "q_loss", "g_bns"):
        exact, fast = float(logs[False][key]), float(logs[True][key])
        assert fast == pytest.approx(exact, rel=0.1), key
        assert logs[True][key].dtype == torch.float32


def test_quantizer_and_bns_statistics_are_float32_under_autocast():
    q = ActQuantizer(QuantSpec(bits=4, symmetric=False))
    x = torch.randn(2, 3, 4, 4)
    q(x)
    q.set_mode(ActMode.FROZEN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, q(x.bfloat16().float()), rtol=0, atol=0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    with BNStatsLoss(net) as bns, torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
        stats = next(iter(bns._stats.values()))
        assert all(s.dtype == torch.float32 for s in stats)
        bns.loss()
