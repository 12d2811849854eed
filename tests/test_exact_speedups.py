"""Every speed-up that claims exactness gives the same numbers as the straightforward loop."""

from __future__ import annotations

import pytest
import torch
from dfq.engine import Engine

from dfq.config import resolve_config
from dfq.generators import create_generator, nets
from dfq.generators.bns import channel_mean_var
from dfq.generators.nets import upsample_conv
from dfq.models import create_model
from dfq.quant import calibrate, quant_disabled
from dfq.quant.functional import choose_qparams, dequantize_affine, fake_quantize, quantize_affine


def _engine(method: str, shared: bool) -> Engine:
    torch.manual_seed(0)
    config = resolve_config(None, {"method": method, "seed": 3, "train.batch_size": 6})
    e = Engine(config, create_model("resnet20a_cifar10"), num_classes=10, input_size=(3, 32, 32), progress=False)
    calibrate(e.student, [torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))])
    e.share_student_forward = shared
    return e


@pytest.mark.parametrize("method", ["adadfq", "adasg"])
def test_shared_student_forward_equals_two_forwards(method):
    fast, slow = _engine(method, True), _engine(method, False)
    assert fast._can_share_student_forward(True) and not slow._can_share_student_forward(True)
    for _ in range(3):
        logs_fast, logs_slow = fast._iteration(True), slow._iteration(True)
        assert logs_fast.keys() == logs_slow.keys()
        for k in logs_fast:
            assert torch.equal(logs_fast[k], logs_slow[k]), k
    for name, a, b in (("Q", fast.student, slow.student), ("G", fast.generator, slow.generator)):
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(va, vb), f"{name} {k}"
    for k, v in slow.q_opt.state_dict()["state"].items():
        assert torch.equal(fast.q_opt.state_dict()["state"][k]["momentum_buffer"], v["momentum_buffer"])


def test_not_shared_while_observing_ranges():
    e = _engine("adadfq", True)
    from dfq.quant import set_act_mode

    set_act_mode(e.student, "observe")
    assert not e._can_share_student_forward(True)
    assert not e._can_share_student_forward(False)  # warm-up: no Q step at all


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
def test_channels_last_engine_equals_contiguous_engine():
    """The engine trains G, P and Q in channels-last; a contiguous-format copy follows it to float rounding.

    Fake quantization is off here: reordered float sums move values by an ulp, which a quantizer turns into a
    whole code where a value sits on a code boundary (as a change of thread count does). The quantizers' own
    speed-up is exact (test_in_place_fake_quantize_equals_quantize_then_dequantize). GDFQ, because with Q = P
    AdaDFQ's disagreement is 0/0 and amplifies any ulp.
    """
    optimised = _engine("gdfq", True)
    plain = _engine("gdfq", True)
    for model in (plain.teacher, plain.student, plain.generator):
        model.to(memory_format=torch.contiguous_format)
    conv = next(m for m in optimised.student.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with quant_disabled(optimised.student), quant_disabled(plain.student):
        for i in range(3):
            a, b = optimised._iteration(True), plain._iteration(True)
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
            if i == 0:  # G's first gradients (later, Adam's normalisation magnifies ulps on near-zero gradients)
                scale = max(float(p.grad.abs().max()) for p in plain.generator.parameters())
                pairs = zip(optimised.generator.named_parameters(), plain.generator.parameters(), strict=True)
                for (k, pa), pb in pairs:
                    torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-3, atol=1e-5 * scale, msg=f"G {k}")
    for (k, va), vb in zip(optimised.student.state_dict().items(), plain.student.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=f"Q {k}")
