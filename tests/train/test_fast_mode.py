"""``train.fast``: bfloat16 autocast and channels-last. Not exact, so the tests check that it runs every method,
keeps the numerics that must stay float32 (codes, BNS statistics, losses) and stays close to the exact mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dfq.generators import BNStatsLoss
from dfq.quant import ActMode, ActQuantizer, QuantSpec
from dfq.testing import tiny_config, tiny_game, tiny_trainer


@pytest.mark.parametrize("method", ["gdfq", "zaq", "adasg", "adadfq"])
def test_fast_mode_runs_every_method_to_a_finite_model(method, tmp_path):
    student, summary = tiny_trainer(tiny_config(method, train__fast=True), run_dir=tmp_path).run()
    assert summary["epochs"] == 2
    assert all(torch.isfinite(t).all() for t in student.state_dict().values() if t.is_floating_point())


def test_fast_mode_resumes_bit_identically(tmp_path):
    config = tiny_config("adadfq", train__fast=True, train__epochs=3)
    reference, _ = tiny_trainer(config, run_dir=tmp_path / "a").run()
    part = tiny_trainer(config, run_dir=tmp_path / "b")
    part.train_epoch()
    part.train_epoch()
    resumed, _ = tiny_trainer(config, run_dir=tmp_path / "b", global_seed=999).run(resume=True)
    ref, got = reference.state_dict(), resumed.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_fast_iteration_is_close_to_the_exact_one():
    """The same state and batch in both modes: the losses agree to bfloat16 precision, not exactly."""
    logs = {}
    for fast in (False, True):
        game = tiny_game(tiny_config("gdfq", train__fast=fast, train__warmup_epochs=0, train__batch_size=8))
        game.iteration(True)  # observe ranges once
        logs[fast] = game.iteration(True)
    for key in ("g_loss", "q_loss", "g_bns"):
        exact, fast = float(logs[False][key]), float(logs[True][key])
        assert fast == pytest.approx(exact, rel=0.1), key
        assert fast != exact, key  # autocast did run
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
    inputs = []
    net[1].register_forward_hook(lambda _m, args, _out: inputs.append(args[0]))
    with BNStatsLoss(net) as bns, torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
        loss = bns.per_layer()["1"]
    assert inputs[0].dtype == torch.bfloat16  # the layer's input is bfloat16 ...
    var, mean = torch.var_mean(inputs[0].float(), dim=(0, 2, 3), correction=0)  # ... its statistics float32
    want = F.mse_loss(mean, net[1].running_mean) + F.mse_loss(var, net[1].running_var)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
