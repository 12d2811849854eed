"""Learned quantization: stored weight grids, AdaRound rounding, LSQ and QDrop, stored scales in checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from recon_nets import MODEL, SHAPE, _gen, _stored, _tiny, _weight_layers
from torch import nn

from dfq.checkpoint import load_quantized, save_quantized
from dfq.config import resolve_config
from dfq.errors import DFQError
from dfq.models import create_model
from dfq.quant import ActMode, ActQuantizer, Granularity, QuantConfig, QuantSpec, calibrate, quantize_model
from dfq.quant.api import _weight_quantizer
from dfq.quant.quantizer import WeightQuantizer

# --------------------------------------------------------------------------- 1. stored weight grid

SPECS = {
    "asym-channel": QuantSpec(4, False, Granularity.PER_CHANNEL),
    "asym-tensor": QuantSpec(4, False, Granularity.PER_TENSOR),
    "sym-channel": QuantSpec(3, True, Granularity.PER_CHANNEL),
    "sym-tensor": QuantSpec(4, True, Granularity.PER_TENSOR),
    "deploy-channel": QuantSpec(4, True, Granularity.PER_CHANNEL, deploy=True),
}


def _stored_quantizer(spec: QuantSpec, w: torch.Tensor) -> WeightQuantizer:
    shape = (w.shape[0],) + (1,) * (w.dim() - 1) if spec.granularity is Granularity.PER_CHANNEL else ()
    wq = WeightQuantizer(spec, stored_shape=shape)
    wq.store(w)
    return wq


@pytest.mark.parametrize("name", list(SPECS))
def test_stored_grid_equals_the_minmax_quantizer(name: str) -> None:
    """store(w) keeps the min/max grid of w in buffers: same output, but no longer following the weights."""
    spec = SPECS[name]
    w = torch.randn(6, 3, 3, 3, generator=_gen(1))
    minmax, stored = WeightQuantizer(spec), _stored_quantizer(spec, w)
    assert torch.equal(stored(w), minmax(w))
    assert set(stored.state_dict()) == {"scale", "zero_point", "code_range"}
    assert not minmax.state_dict()
    expected_shape = (6, 1, 1, 1) if spec.granularity is Granularity.PER_CHANNEL else ()
    assert stored.scale.shape == stored.zero_point.shape == expected_shape
    assert stored.code_range.tolist() == list(minmax.minmax_qparams(w)[2:])
    # the grid is stored: doubled weights are clipped to it, the min/max quantizer rescales
    assert not torch.equal(stored(2 * w), minmax(2 * w))
    assert float((stored(2 * w) - 2 * w).abs().max()) > float((minmax(2 * w) - 2 * w).abs().max())


def test_deploy_stored_grid_has_signed_codes_for_positive_weights() -> None:
    """Deploy weights are stored as int8: even all-positive weights get the signed narrow grid, zero point 0."""
    w = torch.rand(4, 3, 3, 3, generator=_gen(2)) + 0.1
    wq = _stored_quantizer(SPECS["deploy-channel"], w)
    assert wq.code_range.tolist() == [-7, 7]
    assert torch.equal(wq.zero_point, torch.zeros(4, 1, 1, 1))
    codes = wq(w) / wq.scale
    assert torch.equal(codes, codes.round())
    assert float(codes.min()) >= 0 and float(codes.max()) == 7


def test_quantize_model_with_stored_scales_matches_minmax_and_saves_the_grid() -> None:
    """weight_scales="stored" starts from the min/max grid (same Q output) and puts the grid in the state dict."""
    model = _tiny()
    x = torch.randn(4, *SHAPE, generator=_gen(3))
    q_minmax = quantize_model(model, QuantConfig(wbits=4, abits=4))
    q_stored = quantize_model(model, _stored())
    calibrate(q_minmax, [x])
    calibrate(q_stored, [x])
    with torch.no_grad():
        assert torch.equal(q_stored(x), q_minmax(x))
    state = q_stored.state_dict()
    for key in ("scale", "zero_point", "code_range"):
        assert f"conv1.weight_quantizer.{key}" in state
        assert f"fc.weight_quantizer.{key}" in state
    assert not any("weight_quantizer" in k for k in q_minmax.state_dict())
    for layer in _weight_layers(q_stored):
        assert torch.equal(layer.weight_quantizer.scale, layer.weight_quantizer.minmax_qparams(layer.weight)[0])
    assert not _weight_quantizer(QuantSpec(32), model.conv1.weight, stored=True).stored  # no grid at 32 bits
    with pytest.raises(DFQError, match="weight_scales"):
        QuantConfig(weight_scales="learned")


# --------------------------------------------------------------------------- 2. learned rounding


def _rounding_setup(name: str = "asym-channel", seed: int = 4) -> tuple[WeightQuantizer, nn.Parameter, torch.Tensor]:
    spec = SPECS[name]
    weight = nn.Parameter(torch.randn(6, 3, 3, 3, generator=_gen(seed)))
    wq = _stored_quantizer(spec, weight.detach())
    nearest = WeightQuantizer(spec)(weight.detach())
    return wq, weight, nearest


@pytest.mark.parametrize("name", list(SPECS))
def test_begin_rounding_starts_at_nearest_rounding(name: str) -> None:
    """At the start the hard rounding is round-to-nearest; the soft one lies between floor and ceil."""
    wq, weight, nearest = _rounding_setup(name)
    params = wq.begin_rounding(weight)
    assert [p is wq.alpha for p in params] == [True, False] and params[1] is wq.step
    assert wq.soft_rounding
    wq.soft_rounding = False
    with torch.no_grad():
        assert torch.equal(wq(weight), nearest)
        wq.soft_rounding = True
        soft = wq(weight)
    scale, zp, qmin, qmax = wq.scale, wq.zero_point, int(wq.code_range[0]), int(wq.code_range[1])
    base = torch.floor(weight.detach() / scale)
    floor = (torch.clamp(base + zp, qmin, qmax) - zp) * scale
    ceil = (torch.clamp(base + 1 + zp, qmin, qmax) - zp) * scale
    assert bool((soft >= floor - 1e-6).all() and (soft <= ceil + 1e-6).all())
    assert not torch.equal(soft, nearest)  # really soft


@pytest.mark.parametrize("name", list(SPECS))
def test_begin_rounding_from_a_start_rounds_as_the_start_does(name: str) -> None:
    """From ``start`` the hard rounding is ``start``'s own rounding on the grid, whatever the float weight; each
    weight's two choices are the grid points around its start value."""
    wq, weight, nearest = _rounding_setup(name)
    scale = wq.scale.clone()
    start = weight.detach() + torch.randn(weight.shape, generator=_gen(1)) * 1.5 * scale
    with torch.no_grad():
        wanted = wq(start)  # the start's nearest rounding on the stored grid
    wq.begin_rounding(weight, start)
    wq.soft_rounding = False
    with torch.no_grad():
        assert torch.equal(wq(weight), wanted) and not torch.equal(wanted, nearest)
        wq.soft_rounding = True
        soft = wq(weight)
    zp, qmin, qmax = wq.zero_point, int(wq.code_range[0]), int(wq.code_range[1])
    base = torch.floor(start / scale)
    floor = (torch.clamp(base + zp, qmin, qmax) - zp) * scale
    ceil = (torch.clamp(base + 1 + zp, qmin, qmax) - zp) * scale
    assert bool((soft >= floor - 1e-6).all() and (soft <= ceil + 1e-6).all())


def test_rounding_loss_is_zero_at_hard_values_and_maximal_at_one_half() -> None:
    """AdaRound's regulariser: 0 when every h is 0 or 1, one per element at h = 0.5, in between otherwise."""
    wq, weight, _ = _rounding_setup()
    wq.begin_rounding(weight)
    n = weight.numel()
    with torch.no_grad():
        for beta in (2.0, 20.0):
            wq.alpha.fill_(10.0)  # h = 1
            assert float(wq.rounding_loss(beta)) == 0.0
            wq.alpha.fill_(-10.0)  # h = 0
            assert float(wq.rounding_loss(beta)) == 0.0
            wq.alpha.copy_(torch.sign(torch.randn(weight.shape, generator=_gen(5))) * 10)  # a mix of 0 and 1
            assert float(wq.rounding_loss(beta)) == 0.0
            wq.alpha.fill_(0.0)  # h = 0.5
            assert float(wq.rounding_loss(beta)) == pytest.approx(n)
            wq.alpha.copy_(torch.randn(weight.shape, generator=_gen(6)))
            assert 0.0 < float(wq.rounding_loss(beta)) < n


def test_rounding_gradients_reach_alpha_and_step() -> None:
    """The reconstruction loss trains both the rounding variables and the step."""
    wq, weight, _ = _rounding_setup()
    alpha, step = wq.begin_rounding(weight)
    wq.train()
    (wq(weight).pow(2).sum() + wq.rounding_loss(4.0)).backward()
    assert alpha.grad is not None and float(alpha.grad.abs().sum()) > 0
    assert step.grad is not None and float(step.grad.abs().sum()) > 0
    assert weight.grad is None  # the weight itself is not trained


@pytest.mark.parametrize("name", list(SPECS))
def test_end_rounding_writes_on_grid_weights_and_the_learned_step(name: str) -> None:
    """end_rounding: weight on the stored grid exactly, scale = learned step, transient parameters gone."""
    wq, weight, _ = _rounding_setup(name)
    wq.begin_rounding(weight)
    base = wq._base.clone()
    with torch.no_grad():
        wq.alpha.fill_(1.0)  # every h >= 0.5: hard rounding is the ceiling
        new_step = wq.step * 1.1
        wq.step.copy_(new_step)
    wq.train()
    wq.end_rounding(weight)
    assert torch.equal(wq.scale, new_step)
    zp, qmin, qmax = wq.zero_point, int(wq.code_range[0]), int(wq.code_range[1])
    assert torch.equal(weight.detach(), (torch.clamp(base + 1 + zp, qmin, qmax) - zp) * new_step)
    assert torch.equal(wq(weight.detach()), weight.detach())
    assert not wq.soft_rounding and wq.alpha is None
    assert [n for n, _ in wq.named_parameters()] == []
    assert not hasattr(wq, "step") and not hasattr(wq, "_base")
    assert set(wq.state_dict()) == {"scale", "zero_point", "code_range"}


def test_begin_rounding_needs_a_stored_grid() -> None:
    """The min/max quantizer has no grid to learn: a clear error, not a silent no-op."""
    w = nn.Parameter(torch.randn(4, 3, 3, 3))
    with pytest.raises(DFQError, match="stored"):
        WeightQuantizer(SPECS["asym-channel"]).begin_rounding(w)


def test_end_rounding_with_a_negative_step_stays_on_the_stored_grid() -> None:
    """The scale is taken as |step|; the written weight must then be on that grid too."""
    wq, weight, _ = _rounding_setup("asym-channel")
    wq.begin_rounding(weight)
    with torch.no_grad():
        wq.step.neg_()
    wq.end_rounding(weight)
    assert torch.equal(wq(weight.detach()), weight.detach())


# --------------------------------------------------------------------------- 3. LSQ and QDrop

LSQ_CASES = {
    "asymmetric": (QuantSpec(4), False),
    "symmetric-unsigned": (QuantSpec(4, symmetric=True), True),
    "symmetric-signed": (QuantSpec(4, symmetric=True), False),
    "deploy": (QuantSpec(4, symmetric=True, deploy=True), False),
    "deploy-unsigned": (QuantSpec(4, symmetric=True, deploy=True), True),
}


def _calibrated(case: str) -> tuple[ActQuantizer, torch.Tensor]:
    spec, relu = LSQ_CASES[case]
    x = torch.randn(4, 6, 5, 5, generator=_gen(7)) * 1.3 + 0.2
    x = x.relu() if relu else x
    aq = ActQuantizer(spec, observer="minmax")
    aq.observe(x)
    aq.set_mode(ActMode.FROZEN)
    return aq, x


@pytest.mark.parametrize("case", list(LSQ_CASES))
def test_lsq_without_updates_changes_nothing(case: str) -> None:
    """begin_learning/end_learning with no step taken: same output in LEARNED mode, same grid afterwards."""
    aq, x = _calibrated(case)
    scale, zp, qmin, qmax = aq.qparams()
    frozen = aq(x)
    aq.begin_learning()
    assert aq.get_mode() is ActMode.LEARNED
    aq.eval()
    with torch.no_grad():
        assert torch.equal(aq(x), frozen)
    aq.end_learning()
    assert aq.get_mode() is ActMode.FROZEN
    scale2, zp2, qmin2, qmax2 = aq.qparams()
    torch.testing.assert_close(scale2, scale, rtol=1e-6, atol=0)
    assert torch.equal(zp2, zp) and (qmin2, qmax2) == (qmin, qmax)
    assert torch.equal(aq(x), frozen)
    assert not list(aq.parameters()) and not hasattr(aq, "step")


@pytest.mark.parametrize("case", ["asymmetric", "deploy"])
def test_lsq_end_learning_keeps_a_learned_step(case: str) -> None:
    """A changed step becomes the frozen quantizer's step (the deploy tie margin included)."""
    aq, x = _calibrated(case)
    zp = aq.qparams()[1]
    step = aq.begin_learning()
    with torch.no_grad():
        step.mul_(0.8)
        learned = aq(x)
    aq.end_learning()
    torch.testing.assert_close(aq.qparams()[0], step.detach(), rtol=1e-6, atol=0)
    assert torch.equal(aq.qparams()[1], zp)
    torch.testing.assert_close(aq(x), learned)


def test_lsq_gradient_reaches_the_step() -> None:
    """The step is trainable (LSQ's scaled gradient), the input keeps its straight-through gradient."""
    aq, x = _calibrated("asymmetric")
    x = x.clone().requires_grad_(True)
    step = aq.begin_learning()
    aq.train()
    aq(x).pow(2).sum().backward()
    assert step.grad is not None and float(step.grad.abs()) > 0
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_qdrop_keeps_everything_in_float_at_probability_one_only_in_training() -> None:
    """drop_prob=1: training passes the input through unchanged; evaluation still quantizes."""
    aq, x = _calibrated("asymmetric")
    frozen = aq(x)
    aq.begin_learning()
    aq.drop_prob = 1.0
    aq.train()
    with torch.no_grad():
        assert torch.equal(aq(x), x)
        aq.eval()
        assert torch.equal(aq(x), frozen)
        aq.train()
        aq.drop_prob = 0.5
        mixed = aq(x)
    from_float, from_q = mixed == x, mixed == frozen
    assert bool((from_float | from_q).all())
    assert 0.2 < float((from_float & ~from_q).float().mean()) < 0.8


def test_begin_learning_needs_a_calibrated_quantizer() -> None:
    """An uncalibrated range has no step to start from."""
    with pytest.raises(DFQError, match="calibrate"):
        ActQuantizer(QuantSpec(4)).begin_learning()


# --------------------------------------------------------------------------- 4. checkpoints


def _changed_scales(q: nn.Module) -> None:
    with torch.no_grad():
        for i, layer in enumerate(_weight_layers(q)):
            layer.weight_quantizer.scale.mul_(0.7 + 0.05 * i)


def test_stored_scales_round_trip_through_the_state_dict() -> None:
    """A fresh quantize_model + load_state_dict (what load_quantized does) restores changed stored scales."""
    torch.manual_seed(0)
    model = create_model(MODEL)
    x = torch.randn(2, 3, 32, 32, generator=_gen(8))
    q = quantize_model(model, _stored())
    calibrate(q, [x])
    _changed_scales(q)
    torch.manual_seed(1)
    fresh = quantize_model(create_model(MODEL), _stored())
    fresh.load_state_dict(q.state_dict(), strict=True)
    for a, b in zip(_weight_layers(q), _weight_layers(fresh), strict=True):
        assert torch.equal(a.weight_quantizer.scale, b.weight_quantizer.scale)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), q.eval()(x))


def test_stored_scales_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    """save_quantized/load_quantized of a model whose stored scales were changed restores them exactly."""
    torch.manual_seed(0)
    model = create_model(MODEL)
    x = torch.randn(2, 3, 32, 32, generator=_gen(8))
    config = resolve_config(None, {"method": "recon", "quant.wbits": 4, "quant.abits": 4})
    q = quantize_model(model, config.quant)
    calibrate(q, [x])
    _changed_scales(q)
    save_quantized(tmp_path / "model.pt", q, config)
    loaded, loaded_config = load_quantized(tmp_path / "model.pt")
    assert loaded_config.quant.weight_scales == "stored"
    for a, b in zip(_weight_layers(q), _weight_layers(loaded), strict=True):
        assert torch.equal(a.weight_quantizer.scale, b.weight_quantizer.scale)
    with torch.no_grad():
        assert torch.equal(loaded(x), q.eval()(x))


@pytest.mark.parametrize("method", ["zeroq", "recon"])
def test_run_config_round_trips_through_its_dict(method: str) -> None:
    """model.pt and config.yaml store RunConfig.to_dict() (recon section included, whatever the method)."""
    config = resolve_config(None, {"method": method})
    assert resolve_config(config.to_dict()) == config
    assert resolve_config(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


def test_recon_beta_can_be_set_in_a_preset() -> None:
    """A YAML preset writes beta as a list; it becomes the (start, end) tuple of floats."""
    assert resolve_config({"method": {"name": "recon", "beta": [10, 1]}}).method.beta == (10.0, 1.0)
