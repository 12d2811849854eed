"""Property-based tests (hypothesis) of the quantizer: grid, clamp range, monotonicity, error bound,
idempotence, per-channel = per-tensor on each channel, and the activation range observers.

Inputs are small float32 tensors with |x| <= 1e3, every bit-width from 2 to 8, symmetric and
asymmetric grids, per-tensor and per-channel. Exact-equality properties are asserted exactly; the
ones that read values back through float32 arithmetic use tolerances derived in each test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dfq.quant import ActQuantizer, QuantSpec
from dfq.quant.functional import fake_quantize
from dfq.quant.quantizer import STEP_FLOOR, WeightQuantizer
from dfq.quant.spec import Granularity

EPS32 = float(np.finfo(np.float32).eps)

# Modest example counts: these run next to long benchmarks on two cores.
SETTINGS = settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)

BITS = st.integers(2, 8)
VALUES = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
# Per-tensor: any small shape. Per-channel: axis 0 is the channel (C, ...), as for conv/linear weights.
TENSORS = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5), elements=VALUES)
WEIGHTS = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=5), elements=VALUES)


@st.composite
def cases(draw: st.DrawFn) -> tuple[torch.Tensor, WeightQuantizer]:
    """A tensor and a weight quantizer for it: bits 2-8, symmetric or not, per-tensor or per-channel."""
    per_channel = draw(st.booleans())
    x = torch.from_numpy(draw(WEIGHTS if per_channel else TENSORS))
    granularity = Granularity.PER_CHANNEL if per_channel else Granularity.PER_TENSOR
    return x, WeightQuantizer(QuantSpec(draw(BITS), draw(st.booleans()), granularity))


def _rows(t: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """One row per channel (per-channel) or a single row (per-tensor)."""
    return t.reshape(t.shape[0], -1) if per_channel else t.reshape(1, -1)


def _per_channel(wq: WeightQuantizer) -> bool:
    return wq.spec.granularity is Granularity.PER_CHANNEL


def _well_conditioned(zp: torch.Tensor, qmin: int, qmax: int) -> bool:
    """Every code minus the zero point stays below 2^13 in magnitude.

    Reading a grid value back as ``y / scale + zp`` carries a relative error of one float32 rounding
    of ``y``, i.e. up to ``|q - zp| * 2^-24`` grid steps; below 2^13 that is under 1e-3 of a step.
    Tensors whose range is tiny next to their magnitude (e.g. constant non-zero tensors) have zero
    points around 1e10 and are excluded: their grid is finer than float32 can represent.
    """
    return max(float((qmin - zp).abs().max()), float((qmax - zp).abs().max())) <= 2**13


# --------------------------------------------------------------------------- fake quantization


@SETTINGS
@given(cases())
def test_fake_quantization_is_idempotent_on_its_grid(case: tuple[torch.Tensor, WeightQuantizer]) -> None:
    x, wq = case
    scale, zp, qmin, qmax = wq.qparams(x)
    y = fake_quantize(x, scale, zp, qmin, qmax)
    assert torch.equal(y, wq(x))  # the module is fake_quantize with its own qparams
    assert torch.equal(fake_quantize(y, scale, zp, qmin, qmax), y)


@SETTINGS
@given(cases())
def test_outputs_lie_on_the_grid_with_at_most_2_to_the_bits_levels(case: tuple[torch.Tensor, WeightQuantizer]) -> None:
    x, wq = case
    scale, zp, qmin, qmax = wq.qparams(x)
    y = wq(x)
    levels = 2**wq.spec.bits
    for row in _rows(y, _per_channel(wq)):
        assert row.unique().numel() <= levels
    assume(_well_conditioned(zp, qmin, qmax))
    codes = y.double() / scale.double() + zp.double()
    assert float((codes - codes.round()).abs().max()) <= 1e-3
    assert float(codes.min()) >= qmin - 1e-3
    assert float(codes.max()) <= qmax + 1e-3


@SETTINGS
@given(cases())
def test_outputs_stay_inside_the_clamp_range(case: tuple[torch.Tensor, WeightQuantizer]) -> None:
    x, wq = case
    scale, zp, qmin, qmax = wq.qparams(x)
    y = wq(x)
    # The bounds computed with the same float32 operations as dequantize_affine(): exact, no tolerance needed.
    low = ((qmin - zp) * scale).expand_as(y)
    high = ((qmax - zp) * scale).expand_as(y)
    assert bool((y >= low).all()) and bool((y <= high).all())


@SETTINGS
@given(cases())
def test_fake_quantization_is_monotonic(case: tuple[torch.Tensor, WeightQuantizer]) -> None:
    x, wq = case
    per_channel = _per_channel(wq)
    # Sorting within each channel keeps every channel's min/max, hence the grid.
    x_sorted = _rows(x, per_channel).sort(dim=1).values.reshape(x.shape)
    y = _rows(wq(x_sorted), per_channel)
    assert bool((y[:, 1:] >= y[:, :-1]).all())


@SETTINGS
@given(cases())
def test_error_is_at_most_half_a_step_inside_the_range(case: tuple[torch.Tensor, WeightQuantizer]) -> None:
    x, wq = case
    scale, _, _, _ = wq.qparams(x)
    # Weight ranges are the tensor's own min/max, so every element is inside the range.
    error = (wq(x) - x).abs()
    # Float32 slack: a thousandth of a step, plus a few roundings of |x| (products x * (1/scale) and
    # (q - zp) * scale); the second term dominates only for ill-conditioned (near-constant) tensors.
    tolerance = scale * (0.5 + 1e-3) + 8 * EPS32 * x.abs()
    assert bool((error <= tolerance).all()), float((error - tolerance).max())


@SETTINGS
@given(WEIGHTS, BITS, st.booleans())
def test_per_channel_equals_per_tensor_on_each_channel(w: np.ndarray, bits: int, symmetric: bool) -> None:
    x = torch.from_numpy(w)
    per_channel = WeightQuantizer(QuantSpec(bits, symmetric, Granularity.PER_CHANNEL))(x)
    per_tensor = WeightQuantizer(QuantSpec(bits, symmetric, Granularity.PER_TENSOR))
    any_negative = bool((x < 0).any())
    largest = float(x.abs().reshape(x.shape[0], -1).amax(1).max())
    for c in range(x.shape[0]):
        if symmetric and any_negative and bool((x[c] >= 0).all()):
            # One integer type per tensor: once any channel is negative, every channel of a symmetric
            # per-channel weight uses the signed grid, where this channel alone would get the unsigned one.
            continue
        if symmetric and float(x[c].abs().max()) < largest * STEP_FLOOR / 2:  # a superset of the dead channels
            continue  # dead next to live channels: the floor step (tests/export/test_dead_channels_and_shortcuts.py)
        assert torch.equal(per_channel[c], per_tensor(x[c])), c


def test_symmetric_per_channel_uses_one_signed_grid_for_all_channels() -> None:
    """The exception to the property above, pinned: a non-negative channel next to a negative one."""
    x = torch.tensor([[0.0, 0.3, 1.0], [-1.0, 0.2, 0.5]])
    per_channel = WeightQuantizer(QuantSpec(2, True, Granularity.PER_CHANNEL))(x)
    alone = WeightQuantizer(QuantSpec(2, True))(x[0])
    assert per_channel[0].tolist() == [0.0, 0.0, 1.0]  # signed narrow 2-bit grid {-1, 0, 1}
    assert alone.tolist() == pytest.approx([0.0, 1 / 3, 1.0])  # unsigned 2-bit grid {0, 1/3, 2/3, 1}


# --------------------------------------------------------------------------- activation observers

MAXIMA = st.floats(2**-10, 1e3, allow_nan=False, width=32)
MINIMA = st.floats(-1e3, 0.0, allow_nan=False, width=32)
SEQUENCES = st.lists(st.tuples(MINIMA, MAXIMA), min_size=1, max_size=40)


def _observe(observer: str, batches: list[tuple[float, float]]) -> ActQuantizer:
    q = ActQuantizer(QuantSpec(4), observer=observer)
    for lo, hi in batches:
        q.observe(torch.tensor([lo, (lo + hi) / 2, hi], dtype=torch.float32))
    return q


@SETTINGS
@given(MINIMA, MAXIMA)
def test_ema_range_after_one_update_is_the_batch_range(lo: float, hi: float) -> None:
    q = _observe("ema", [(lo, hi)])
    # Bias correction divides 0.1 * m by 1 - 0.9, both rounded to float32: equal up to ~1 ulp.
    assert float(q.hi) == pytest.approx(hi, rel=1e-6)
    assert float(q.lo) == pytest.approx(lo, rel=1e-6, abs=1e-30)
    assert int(q.num_updates) == 1


@SETTINGS
@given(SEQUENCES)
def test_ema_range_is_the_bias_corrected_moving_average(batches: list[tuple[float, float]]) -> None:
    q = _observe("ema", batches)
    raw_lo = raw_hi = 0.0
    for lo, hi in batches:
        raw_lo, raw_hi = 0.9 * raw_lo + 0.1 * lo, 0.9 * raw_hi + 0.1 * hi
    correction = 1 - 0.9 ** len(batches)
    assert float(q.hi) == pytest.approx(raw_hi / correction, rel=1e-5)
    assert float(q.lo) == pytest.approx(raw_lo / correction, rel=1e-5, abs=1e-6)


@SETTINGS
@given(SEQUENCES)
def test_minmax_range_is_the_running_extreme(batches: list[tuple[float, float]]) -> None:
    q = _observe("minmax", batches)
    assert float(q.hi) == max(float(np.float32(hi)) for _, hi in batches)
    assert float(q.lo) == min(float(np.float32(lo)) for lo, _ in batches)


def _paper_update(batches: list[tuple[float, float]], beta: float = 0.9) -> tuple[float, float]:
    """The papers' EMA update (GDFQ's official code) in float64: the corrected value is stored and corrected again."""
    x_min = x_max = 0.0
    beta_t = 1.0
    for lo, hi in batches:
        beta_t = beta_t * beta
        x_min = (beta * x_min + (1 - beta) * lo) / (1 - beta_t)
        x_max = (beta * x_max + (1 - beta) * hi) / (1 - beta_t)
    return x_min, x_max


@SETTINGS
@given(SEQUENCES)
def test_paper_observer_matches_the_published_update(batches: list[tuple[float, float]]) -> None:
    q = _observe("paper", batches)
    x_min, x_max = _paper_update(batches)
    assert float(q.hi) == pytest.approx(x_max, rel=1e-5)
    # Minima are <= 0, so no cancellation: the same relative accuracy (abs for all-zero minima).
    assert float(q.lo) == pytest.approx(x_min, rel=1e-5, abs=1e-6)
