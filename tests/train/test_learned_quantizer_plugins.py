"""The learned-quantizer plug-ins: LSQ's learned steps and AdaRound's learned rounding, by hand and in training."""

from __future__ import annotations

import pytest
import torch
from plugin_helpers import _lsq_trainer, assert_same_states, hand_outputs, learned_keys, plugin
from torch import nn
from torch.testing import assert_close

from dfq.errors import DFQError
from dfq.methods import Outputs
from dfq.quant import ActMode, act_quantizers, set_act_mode, weight_quantizers
from dfq.quant.functional import lsq_fake_quantize, round_ste
from dfq.testing import tiny_config, tiny_game, tiny_trainer
from dfq.train import read_train_checkpoint
from dfq.train.plugins import LearnedQuantizers


def act_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    return {n: (float(q.lo), float(q.hi)) for n, q in act_quantizers(model)}


def act_modes(model: nn.Module) -> set[ActMode]:
    return {q.get_mode() for _, q in act_quantizers(model)}


# ============================================================== LSQ
def test_lsq_fake_quantize_by_hand():
    s, zp, qmin, qmax, g = 0.5, 1.0, 0, 7, 0.25
    x_values = [-1.2, 0.26, 0.74, 1.9, 3.5]
    # x/s + zp = [-1.4, 1.52, 2.48, 4.8, 8.0] -> round [-1, 2, 2, 5, 8] -> clamp [0, 2, 2, 5, 7]
    expected_out = torch.tensor([-0.5, 0.5, 0.5, 2.0, 3.0])
    expected_dx = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0])
    # LSQ: d out / d s = round(x/s) - x/s inside, qmin - zp / qmax - zp at the clamps; times grad_scale
    expected_ds = g * torch.tensor([qmin - zp, 2 - 1 - 0.52, 2 - 1 - 1.48, 5 - 1 - 3.8, qmax - zp])
    for divide in (False, True):
        x = torch.tensor(x_values, requires_grad=True)
        step = torch.full((5,), s, requires_grad=True)  # one step per element: the gradient per element
        out = lsq_fake_quantize(x, step, torch.tensor(zp), qmin, qmax, g, divide)
        ref = (torch.clamp(torch.round(x.detach() / s + zp), qmin, qmax) - zp) * s
        assert torch.equal(out.detach(), expected_out) and torch.equal(out.detach(), ref)
        out.sum().backward()
        assert torch.equal(x.grad, expected_dx)
        assert_close(step.grad, expected_ds)
    # A scalar step gets the sum.
    x = torch.tensor(x_values)
    step = torch.tensor(s, requires_grad=True)
    lsq_fake_quantize(x, step, torch.tensor(zp), qmin, qmax, g).sum().backward()
    assert_close(step.grad, expected_ds.sum())


def _lsq_reference(x, step, zp, qmin, qmax, g, divide, keep):
    """LSQ composed of autograd's own operations (the step's gradient scaled by the detach trick, the rounding's
    straight-through gradient, clamp's mask), QDrop as a select."""
    step = step * g + (step - step * g).detach()
    divided = x / step if divide else x * (1.0 / step)
    out = (torch.clamp(round_ste(divided + zp), qmin, qmax) - zp) * step
    return out if keep is None else torch.where(keep, x, out)


@pytest.mark.parametrize("divide", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("drop", [False, True])
def test_lsq_fake_quantize_matches_autograd_of_the_composed_operations(divide, per_channel, drop):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 5, 5, generator=gen) * 2).requires_grad_(True)
    step = (torch.rand(4, 1, 1, 1, generator=gen) * 0.3 + 0.2) if per_channel else torch.tensor(0.37)
    step.requires_grad_(True)
    zp, qmin, qmax, g = torch.tensor(3.0), 0, 15, 0.1
    keep = torch.rand(x.shape, generator=gen) < 0.5 if drop else None
    weights = torch.randn(x.shape, generator=gen)
    out = lsq_fake_quantize(x, step, zp, qmin, qmax, g, divide, keep)
    grads = torch.autograd.grad((out * weights).sum(), [x, step])
    x_ref, step_ref = x.detach().clone().requires_grad_(True), step.detach().clone().requires_grad_(True)
    ref = _lsq_reference(x_ref, step_ref, zp, qmin, qmax, g, divide, keep)
    grads_ref = torch.autograd.grad((ref * weights).sum(), [x_ref, step_ref])
    assert_close(out, ref, rtol=0, atol=1e-6)  # equal up to the last bit of the step in the forward
    assert torch.equal(grads[0] != 0, grads_ref[0] != 0)  # the straight-through mask; QDrop's kept elements pass
    assert_close(grads[0], grads_ref[0], rtol=1e-6, atol=0)  # the reference multiplies by step and 1 / step
    assert_close(grads[1], grads_ref[1], rtol=1e-5, atol=1e-6)  # LSQ's step gradient, summed to the step's shape
    assert grads[1].shape == step.shape


def test_lsq_plugin_learns_steps_then_freezes_them():
    trainer = _lsq_trainer()
    game = trainer.game
    learned, config = plugin(game, LearnedQuantizers), game.config.plugins
    trainer.train_epoch()
    assert learned.opt is None and act_modes(game.student) == {ActMode.OBSERVE}
    ranges_before = act_ranges(game.student)
    wqs = list(weight_quantizers(game.student))
    assert len(wqs) == 4 and all(wq.stored for _, wq in wqs)
    minmax_scales = [wq.minmax_qparams(layer.weight)[0].clone() for layer, wq in wqs]
    for (_, wq), s in zip(wqs, minmax_scales, strict=True):
        assert torch.equal(wq.scale, s)  # the stored grid starts as the min/max grid
    weights_before = [layer.weight.detach().clone() for layer, _ in wqs]
    observed_steps = [q.qparams()[0].clone() for _, q in act_quantizers(game.student)]

    trainer.train_epoch()
    aqs = [q for _, q in act_quantizers(game.student)]
    assert act_modes(game.student) == {ActMode.LEARNED}
    assert learned.opt is not None and game.student_optimizers() == [game.q_opt, learned.opt]
    groups = learned.opt.param_groups
    assert [g["lr"] for g in groups] == [config.lr_astep, config.lr_wstep]
    assert [id(p) for p in groups[0]["params"]] == [id(q.step) for q in aqs]
    assert [id(p) for p in groups[1]["params"]] == [id(wq.step) for _, wq in wqs]
    assert all(wq.learns_step for _, wq in wqs)
    assert len(learned_keys(game.student)) == len(aqs) + len(wqs)
    assert act_ranges(game.student) == ranges_before  # the ranges wait for the end
    # The weights keep training through the rounding's straight-through gradient.
    assert any(not torch.equal(layer.weight, w) for (layer, _), w in zip(wqs, weights_before, strict=True))
    # The act steps moved away from the observed grid, and qparams (the deploy bias grid's source) follows them.
    assert all(torch.equal(q.step.detach().abs(), q.qparams()[0]) for q in aqs)
    assert any(not torch.equal(q.step.detach(), s) for q, s in zip(aqs, observed_steps, strict=True))

    trainer.train_epoch()
    game.finish()
    assert learned.opt is None and game.student_optimizers() == [game.q_opt]
    assert act_modes(game.student) == {ActMode.FROZEN}
    assert all(not hasattr(q, "step") for q in aqs)
    assert learned_keys(game.student) == []
    ranges_after = act_ranges(game.student)
    assert ranges_after.keys() == ranges_before.keys()
    assert all(ranges_after[n] != ranges_before[n] for n in ranges_before)
    for (_, wq), s in zip(wqs, minmax_scales, strict=True):
        assert wq.stored and not wq.learns_step and not hasattr(wq, "step")
        assert not torch.equal(wq.scale, s)
        assert (wq.scale > 0).all()
    game.finish()  # idempotent
    assert learned_keys(game.student) == []


def test_lsq_end_learning_keeps_the_learned_grid():
    """The frozen act range reproduces the learned step exactly (qparams gives the step back)."""
    trainer = _lsq_trainer()
    trainer.train_epoch()
    trainer.train_epoch()
    game = trainer.game
    aqs = [q for _, q in act_quantizers(game.student)]
    learned = [tuple(t.clone() for t in q.qparams()[:2]) for q in aqs]  # the learned step, its zero point
    wqs = list(weight_quantizers(game.student))
    wsteps = [wq.step.detach().abs().clone() for _, wq in wqs]
    game.finish()
    for q, (step, zp) in zip(aqs, learned, strict=True):
        scale, zero_point, _, _ = q.qparams()
        assert_close(scale, step)
        assert torch.equal(zero_point, zp)
    for (_, wq), step in zip(wqs, wsteps, strict=True):
        assert torch.equal(wq.scale, step)


@pytest.mark.parametrize(("warmup", "observe"), [(2, 1), (1, 2)])
def test_learning_starts_after_warmup_and_observation(warmup, observe, monkeypatch):
    trainer = _lsq_trainer(train__warmup_epochs=warmup, train__observe_epochs=observe, train__iters_per_epoch=1)
    game = trainer.game
    learned, learning = plugin(game, LearnedQuantizers), []
    iteration = game.method.iteration

    def recording(g, train_q):
        learning.append((trainer.state.epoch, learned.opt is not None, act_modes(g.student) == {ActMode.LEARNED}))
        return iteration(g, train_q)

    monkeypatch.setattr(game.method, "iteration", recording)
    trainer.run()
    assert learning == [(0, False, False), (1, False, False), (2, True, True)]


def test_lsq_run_end_to_end_leaves_an_ordinary_model(tmp_path):
    trainer = _lsq_trainer()
    q, _ = trainer.run()
    assert act_modes(q) == {ActMode.FROZEN}
    assert learned_keys(q) == []
    assert plugin(trainer.game, LearnedQuantizers).opt is None
    # The last checkpoint was written while learning: it holds the learned parameters and their optimizer.
    saved = tiny_trainer(tiny_config("gdfq", train__epochs=3, plugins__lsq=True), run_dir=tmp_path)
    saved.run()
    ckpt = read_train_checkpoint(tmp_path)
    assert ckpt["qp_opt"] is not None
    assert any(k.endswith(".step") for k in ckpt["student"])
    assert_same_states(trainer, saved)


# ============================================================== AdaRound
def _ada_trainer(method="gdfq", **overrides):
    return tiny_trainer(tiny_config(method, train__epochs=3, plugins__adaround=True, **overrides))


def _learning_trainer(**overrides):
    """An AdaRound trainer after epoch 0, its ranges frozen and the rounding just begun (what epoch 1 starts with)."""
    trainer = _ada_trainer(**overrides)
    trainer.train_epoch()
    set_act_mode(trainer.game.student, ActMode.FROZEN)
    plugin(trainer.game, LearnedQuantizers).begin_epoch(1, lr_scale=1.0)
    return trainer


def test_adaround_learns_rounding_not_weights():
    trainer = _learning_trainer()
    game = trainer.game
    learned, config = plugin(game, LearnedQuantizers), game.config.plugins
    wqs = list(weight_quantizers(game.student))
    groups = learned.opt.param_groups
    assert [g["lr"] for g in groups] == [config.lr_wstep, config.lr_round]
    assert [id(p) for p in groups[0]["params"]] == [id(wq.step) for _, wq in wqs]
    assert [id(p) for p in groups[1]["params"]] == [id(wq.alpha) for _, wq in wqs]
    assert act_modes(game.student) == {ActMode.FROZEN}  # adaround alone: act steps stay observed
    weights = [layer.weight.detach().clone() for layer, _ in wqs]
    alphas = [wq.alpha.detach().clone() for _, wq in wqs]
    steps = [wq.step.detach().clone() for _, wq in wqs]
    assert "q_round" in game.iteration(True)
    trainer.train_epoch()
    for (layer, _), before in zip(wqs, weights, strict=True):
        assert layer.weight.grad is None
        assert torch.equal(layer.weight, before)
    assert all(not torch.equal(wq.alpha, a) for (_, wq), a in zip(wqs, alphas, strict=True))
    assert any(not torch.equal(wq.step, s) for (_, wq), s in zip(wqs, steps, strict=True))


def test_adaround_rounding_loss_by_hand():
    trainer = _learning_trainer(train__iters_per_epoch=3, plugins__beta=[20.0, 2.0], plugins__round_weight=0.3)
    game = trainer.game
    learned = plugin(game, LearnedQuantizers)
    with torch.no_grad():  # rounding variables away from their start, so the regulariser is not trivial
        for _, wq in weight_quantizers(game.student):
            wq.alpha.add_(torch.randn_like(wq.alpha))

    def hand(beta):
        total, count = torch.tensor(0.0), 0
        for _, wq in weight_quantizers(game.student):
            h = torch.clamp(torch.sigmoid(wq.alpha.detach()) * 1.2 - 0.1, 0, 1)
            total = total + (1 - (2 * h - 1).abs() ** beta).sum()
            count += wq.alpha.numel()
        return total / count

    out, _ = hand_outputs([True] * 8)
    # Learning from epoch 1 to 3 of 3 iterations: global iterations 3 to 9, beta linear from 20 to 2.
    for epoch, iteration, beta in [(1, 0, 20.0), (2, 1, 8.0), (1, 2, 20.0 - 18.0 * 2 / 6), (3, 0, 2.0)]:
        trainer.state.epoch, trainer.state.iteration = epoch, iteration
        done = (epoch * 3 + iteration - 3) / 6
        assert beta == pytest.approx(20.0 + (2.0 - 20.0) * done)
        assert_close(learned.terms(out)["round"], 0.3 * hand(beta))
    trainer.state.epoch, trainer.state.iteration = 2, 1
    losses = game.student_losses(out)
    assert_close(losses["round"], 0.3 * hand(8.0))
    method_loss = game.method.student_loss(Outputs(out.x, out.y, out.p_logits, out.q_logits))["loss"]
    assert_close(losses["loss"], method_loss + losses["round"])
    # Before learning begins there is no rounding term.
    assert "round" not in _ada_trainer().game.student_losses(hand_outputs([True] * 8)[0])


def test_adaround_ends_on_the_stored_grid():
    trainer = _ada_trainer()
    for _ in range(3):
        trainer.train_epoch()
    game = trainer.game
    x = game.fresh_batch().x
    wqs = list(weight_quantizers(game.student))
    for _, wq in wqs:
        assert wq.soft_rounding  # learning uses the soft rounding ...
        wq.soft_rounding = False  # ... and Q ends with the hard one
    with torch.no_grad():
        before = game.student(x)
    game.finish()
    assert learned_keys(game.student) == []
    for layer, wq in wqs:
        assert wq.alpha is None and not hasattr(wq, "step") and not hasattr(wq, "_base")
        codes = layer.weight.detach() / wq.scale
        assert_close(codes, codes.round(), rtol=0, atol=1e-4)
        codes = codes.round() + wq.zero_point
        qmin, qmax = wq.code_range.tolist()
        assert codes.min() >= qmin and codes.max() <= qmax
        # the fake-quantized weight is the weight itself
        assert_close(wq(layer.weight.detach()), layer.weight.detach(), rtol=0, atol=1e-6)
    with torch.no_grad():
        after = game.student(x)
    assert_close(after, before, rtol=1e-4, atol=1e-4)  # the rounding fixed is the rounding Q used


def test_adaround_rounding_learns_from_the_task_loss():
    game = _learning_trainer(plugins__round_weight=0.0).game
    batch, _ = game.generator_step()
    game.student_step(batch, True)
    grads = [wq.alpha.grad for _, wq in weight_quantizers(game.student)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_learned_quantizers_need_something_to_learn():
    """Refused with a clear error when the game is built, not with an optimizer's ValueError mid-run."""
    with pytest.raises(DFQError, match="no quantized weights"):
        tiny_game(tiny_config("gdfq", train__epochs=3, plugins__adaround=True, quant__wbits=32))
    with pytest.raises(DFQError, match="no quantized weights or activations"):
        tiny_game(tiny_config("gdfq", train__epochs=3, plugins__lsq=True, quant__wbits=32, quant__abits=32))
    tiny_game(tiny_config("gdfq", train__epochs=3, plugins__lsq=True, quant__wbits=32))  # act steps alone are fine
