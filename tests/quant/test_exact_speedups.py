"""Every speed-up that claims exactness gives the same numbers as the straightforward loop."""

from __future__ import annotations

import pytest
import torch

from dfq.generators import create_generator, nets
from dfq.generators.bns import channel_mean_var
from dfq.generators.nets import upsample_conv
from dfq.quant import calibrate, quant_disabled, set_act_mode
from dfq.quant.functional import choose_qparams, dequantize_affine, fake_quantize, quantize_affine
from dfq.testing import INPUT_SIZE, tiny_config, tiny_game


def _game(method: str, batch_size: int = 6):
    """A game in its steady state (ranges frozen), built the same way each time."""
    game = tiny_game(tiny_config(method, train__batch_size=batch_size))
    calibrate(game.student, [torch.randn(batch_size, *INPUT_SIZE, generator=torch.Generator().manual_seed(1))])
    return game


@pytest.mark.parametrize("method", ["adadfq", "adasg"])
def test_shared_student_forward_equals_two_forwards(method):
    """AdaSG/AdaDFQ's iteration shares one Q forward between the G step and the Q step: exactly the G step then
    the Q step on its batch (logs, both models' states, the optimizers' states)."""
    shared, two = _game(method), _game(method)
    assert shared.shares_forward(True) and two.shares_forward(True)
    for _ in range(3):
        logs_shared = shared.shared_step()
        batch, g_losses = two.generator_step()
        logs_two = two.logs(g_losses, two.student_step(batch, True))
        assert logs_shared.keys() == logs_two.keys()
        for k in logs_shared:
            assert torch.equal(logs_shared[k], logs_two[k]), k
    for name in ("student", "generator"):
        a, b = getattr(shared, name).state_dict(), getattr(two, name).state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name} {k}"
    for opt in ("q_opt", "g_opt"):
        a, b = getattr(shared, opt).state_dict()["state"], getattr(two, opt).state_dict()["state"]
        assert a.keys() == b.keys()
        for k in a:
            for key, value in a[k].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[k][key])), (opt, k, key)


def test_the_iteration_takes_the_shared_step_exactly_when_allowed(monkeypatch):
    game = _game("adadfq")
    taken = []
    shared_step = game.shared_step
    monkeypatch.setattr(game, "shared_step", lambda: taken.append(1) or shared_step())
    game.iteration(True)
    assert taken == [1]
    game.iteration(False)  # warm-up: no Q step to share
    assert taken == [1] and not game.shares_forward(False)
    set_act_mode(game.student, "observe")  # every forward moves the ranges: no forward may be skipped
    assert not game.shares_forward(True)
    game.iteration(True)
    assert taken == [1]
    assert not _game("gdfq").shares_forward(True)  # GDFQ's G step does not run Q


# ---------------------------------------------------------------- the generators' upsample + conv
def _reference_upsample_conv(x, conv):
    return conv(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_upsample_conv_is_upsample_then_conv(channels_last, bias):
    """The polyphase form is the same linear map: equal in float64 to rounding, gradients included."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 4, 3, padding=1, bias=bias).double()
    x = torch.randn(3, 5, 6, 7, dtype=torch.float64)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    outs = []
    for f in (upsample_conv, _reference_upsample_conv):
        conv.zero_grad()
        xi = x.clone().requires_grad_()
        y = f(xi, conv)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad, conv.weight.grad.clone(), None if conv.bias is None else conv.bias.grad))
    for got, want in zip(*outs, strict=True):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert outs[0][0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("name", ["cifar", "imagenet", "unconditional"])
def test_generators_equal_their_upsample_formulation(name, monkeypatch):
    """Each generator with the polyphase layers equals the papers' Upsample -> Conv topology."""
    torch.manual_seed(0)
    gen = create_generator(name, 10, 16, 12).double()
    z, y = torch.randn(4, 12, dtype=torch.float64), torch.randint(10, (4,))
    fast = gen(z, y)
    monkeypatch.setattr(nets, "upsample_conv", _reference_upsample_conv)
    torch.testing.assert_close(fast, gen(z, y), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- BNS statistics
def test_channel_mean_var_equals_var_mean_with_gradients():
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(channel_mean_var, (x,))
    g_mean, g_var = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    mean, var = channel_mean_var(x)
    got = torch.autograd.grad((mean * g_mean).sum() + (var * g_var).sum(), x)[0]
    ref_var, ref_mean = torch.var_mean(x, dim=[0, 2, 3], correction=0)
    want = torch.autograd.grad((ref_mean * g_mean).sum() + (ref_var * g_var).sum(), x)[0]
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    x32 = x.detach().float()
    ref_var, ref_mean = torch.var_mean(x32, dim=[0, 2, 3], correction=0)
    torch.testing.assert_close(channel_mean_var(x32), (ref_mean, ref_var), rtol=2e-7, atol=1e-7)


# ---------------------------------------------------------------- fake quantization in place
@pytest.mark.parametrize("divide", [False, True])
def test_in_place_fake_quantize_equals_quantize_then_dequantize(divide):
    torch.manual_seed(0)
    x = torch.randn(64, 16, 8, 8) * 3
    per_channel = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    for lo, hi in ((x.min(), x.max()), per_channel, (torch.tensor(0.0), x.max())):
        scale, zp, qmin, qmax = choose_qparams(lo, hi, 4)
        want = dequantize_affine(quantize_affine(x, scale, zp, qmin, qmax, divide), scale, zp)
        assert torch.equal(fake_quantize(x, scale, zp, qmin, qmax, divide), want)
        xc = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(fake_quantize(xc, scale, zp, qmin, qmax, divide), want)


# ---------------------------------------------------------------- channels-last training
def test_channels_last_game_equals_contiguous_game():
    """The game trains G, P and Q in channels-last; a contiguous-format copy follows it to float rounding.

    Fake quantization is off here: reordered float sums move values by an ulp, which a quantizer turns into a
    whole code where a value sits on a code boundary (as a change of thread count does). The quantizers' own
    speed-up is exact (test_in_place_fake_quantize_equals_quantize_then_dequantize). GDFQ, because with Q = P
    AdaDFQ's disagreement is 0/0 and amplifies any ulp.
    """
    optimised, plain = _game("gdfq"), _game("gdfq")
    for model in (plain.teacher, plain.student, plain.generator):
        model.to(memory_format=torch.contiguous_format)
    conv = next(m for m in optimised.student.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with quant_disabled(optimised.student), quant_disabled(plain.student):
        for i in range(3):
            a, b = optimised.iteration(True), plain.iteration(True)
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
            if i == 0:  # G's first gradients (later, Adam's normalisation magnifies ulps on near-zero gradients)
                scale = max(float(p.grad.abs().max()) for p in plain.generator.parameters())
                pairs = zip(optimised.generator.named_parameters(), plain.generator.parameters(), strict=True)
                for (k, pa), pb in pairs:
                    torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-3, atol=1e-5 * scale, msg=f"G {k}")
    for (k, va), vb in zip(optimised.student.state_dict().items(), plain.student.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=f"Q {k}")
