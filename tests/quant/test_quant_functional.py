"""Numerics of the fake-quantization primitives against references on tiny tensors."""

import pytest
import torch

from dfq.quant import (
    QuantSpec,
    WeightQuantizer,
    choose_qparams,
    dequantize_affine,
    fake_quantize,
    quantize_affine,
    round_ste,
)
from dfq.quant.functional import bernoulli_mask
from dfq.quant.spec import Granularity

SEED = 123


def paper_quantize(x, lo, hi, k):
    """The papers' quantizer (GDFQ's code), literally: inverse step s, signed range, zp = round(s*lo) + 2^(k-1)."""
    n = 2**k - 1
    s = n / torch.clamp(hi - lo, min=1e-8)
    zp = torch.round(s * lo) + 2 ** (k - 1)
    q = torch.clamp(torch.round(s * x - zp), -(2 ** (k - 1)), 2 ** (k - 1) - 1)
    return (q + zp) / s


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_matches_paper_formula_exactly_on_power_of_two_grid(bits):
    # (hi - lo) = (2^k - 1) * 2^-4: every step of both formulas is exact in float32,
    # so the two conventions must agree bit for bit, ties (round half to even) included.
    step = 2.0**-4
    lo = torch.tensor(-3 * step)
    hi = lo + (2**bits - 1) * step
    x = torch.arange(-40, 80 + 2**bits * 4, dtype=torch.float32) * (step / 4)  # hits every tie
    scale, zp, qmin, qmax = choose_qparams(lo, hi, bits)
    assert torch.equal(fake_quantize(x, scale, zp, qmin, qmax), paper_quantize(x, lo, hi, bits))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matches_paper_formula_on_random_ranges(bits):
    g = torch.Generator().manual_seed(SEED)
    for _ in range(20):
        x = torch.randn(257, generator=g) * 3
        lo, hi = x.min() * 0.8, x.max() * 0.9
        scale, zp, qmin, qmax = choose_qparams(lo, hi, bits)
        ours, ref = fake_quantize(x, scale, zp, qmin, qmax), paper_quantize(x, lo, hi, bits)
        # The two forms differ only by float rounding of 1/scale: equal up to an ulp
        # except where s*x lands within an ulp of a .5 tie (probability ~0 here).
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_round_half_to_even_and_clamp_range():
    scale, zp = torch.tensor(1.0), torch.tensor(0.0)
    x = torch.tensor([-9.0, 0.5, 1.5, 2.5, -0.5, 3.49, 99.0])
    assert quantize_affine(x, scale, zp, -4, 3).tolist() == [-4.0, 0.0, 2.0, 2.0, -0.0, 3.0, 3.0]


def test_post_relu_range_is_unsigned_k_bit():
    scale, zp, qmin, qmax = choose_qparams(torch.tensor(0.0), torch.tensor(1.5), 4)
    assert (qmin, qmax) == (0, 15) and float(zp) == 0.0
    assert float(scale) == pytest.approx(0.1)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_tensor_equals_torch(bits, symmetric):
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(4, 3, 5, 5, generator=g)
    scale, zp, qmin, qmax = choose_qparams(x.min(), x.max(), bits, symmetric)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), qmin, qmax)
    assert torch.equal(fake_quantize(x, scale, zp, qmin, qmax), ref)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_channel_weight_quantizer_equals_torch(bits, symmetric):
    g = torch.Generator().manual_seed(SEED)
    w = torch.randn(6, 3, 3, 3, generator=g)
    wq = WeightQuantizer(QuantSpec(bits, symmetric, Granularity.PER_CHANNEL))
    scale, zp, qmin, qmax = wq.qparams(w)
    ref = torch.fake_quantize_per_channel_affine(w, scale.flatten(), zp.flatten().to(torch.int32), 0, qmin, qmax)
    assert torch.equal(wq(w), ref)


def test_per_channel_is_per_tensor_on_each_channel():
    g = torch.Generator().manual_seed(SEED)
    w = torch.randn(5, 7, generator=g)
    per_channel = WeightQuantizer(QuantSpec(3, granularity=Granularity.PER_CHANNEL))(w)
    per_tensor = WeightQuantizer(QuantSpec(3))
    for c in range(5):
        assert torch.equal(per_channel[c], per_tensor(w[c]))


def test_per_channel_channel_without_zero_in_range():
    # The papers' asymmetric grid does not force 0 into the range: an all-positive channel works.
    w = torch.tensor([[0.5, 1.0, 2.0], [-1.0, 0.0, 3.0]])
    out = WeightQuantizer(QuantSpec(2, granularity=Granularity.PER_CHANNEL))(w)
    assert out[0].min() >= 0.5 - 1e-6 and out[0].max() <= 2.0 + 1e-6
    assert len(out[0].unique()) == 3


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quantize_is_dequantize_of_quantize_and_idempotent(bits):
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(100, generator=g)
    scale, zp, qmin, qmax = choose_qparams(x.min(), x.max(), bits)
    fq = fake_quantize(x, scale, zp, qmin, qmax)
    assert torch.equal(fq, dequantize_affine(quantize_affine(x, scale, zp, qmin, qmax), scale, zp))
    assert torch.equal(fake_quantize(fq, scale, zp, qmin, qmax), fq)
    assert len(fq.unique()) <= 2**bits


def test_straight_through_gradient_is_identity_even_when_clamped():
    x = torch.tensor([-5.0, 0.3, 0.7, 9.0], requires_grad=True)
    scale, zp, qmin, qmax = choose_qparams(torch.tensor(0.0), torch.tensor(1.0), 2)
    fake_quantize(x, scale, zp, qmin, qmax).mul(torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0]
    y = torch.tensor([0.5, 1.5], requires_grad=True)
    round_ste(y).sum().backward()
    assert y.grad.tolist() == [1.0, 1.0]


def test_high_bits_are_near_identity_and_32_is_exact():
    g = torch.Generator().manual_seed(SEED)
    w = torch.randn(8, 4, generator=g)
    assert torch.equal(WeightQuantizer(QuantSpec(32))(w), w)
    w16 = WeightQuantizer(QuantSpec(16, granularity=Granularity.PER_CHANNEL))(w)
    torch.testing.assert_close(w16, w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bad", [0, 1, 9, 12, 64, -4, 4.0, True])
def test_bad_bits_are_a_clear_error(bad):
    from dfq.errors import DFQError

    with pytest.raises(DFQError, match="2 to 8"):
        QuantSpec(bad)


@pytest.mark.parametrize("p", [0.5, 0.25, 0.3, 0.9])
def test_bernoulli_mask_has_the_probability_at_every_byte_of_a_draw(p):
    """Each element True with probability p, independently of where its byte sits in the 64-bit draw (a draw over
    [0, 2^63) would leave the top byte's high bit at 0 and bias every eighth element); 0.3 is no multiple of 1/256."""
    shape = (63, 33, 17)  # 35,343 elements, not a multiple of 8: the last draw is partly used
    mask = bernoulli_mask(shape, p, torch.Generator().manual_seed(SEED))
    assert mask.dtype == torch.bool and mask.shape == shape
    n = mask.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(float(mask.float().mean()) - p) < 5 * sd
    per_byte = mask.flatten()[: n - n % 8].view(-1, 8).float().mean(0)
    assert bool(((per_byte - p).abs() < 5 * sd * 8**0.5).all())


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_bernoulli_mask_follows_its_generator(p):
    a = bernoulli_mask((1000,), p, torch.Generator().manual_seed(1))
    assert torch.equal(a, bernoulli_mask((1000,), p, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, bernoulli_mask((1000,), p, torch.Generator().manual_seed(2)))


def test_bernoulli_mask_at_the_ends_and_below_one_256th():
    assert bool(bernoulli_mask((10,), 1.0).all()) and not bool(bernoulli_mask((10,), 0.0).any())
    assert bool(bernoulli_mask((100_000,), 0.001, torch.Generator().manual_seed(0)).any())  # not rounded to 0
