"""Learned quantization (stored weight grids, AdaRound, LSQ, QDrop) and the post-training method ``recon``."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import dfq
from dfq.checkpoint import load_quantized, save_quantized
from dfq.cli import main
from dfq.config import resolve_config
from dfq.errors import DFQError
from dfq.generators import lowpass, synthesize_pool
from dfq.generators.synthesis import _Swing
from dfq.methods.recon import ReconConfig, init_grids, reconstruct, reconstruct_unit, units
from dfq.models import create_model
from dfq.quant import (
    ActMode,
    ActQuantizer,
    Granularity,
    QuantConfig,
    QuantSpec,
    act_quantizers,
    calibrate,
    quant_disabled,
    quantize_model,
)
from dfq.quant.api import _weight_quantizer
from dfq.quant.quantizer import WeightQuantizer
from dfq.testing import ChainedSumsNet

MODEL = "resnet20a_cifar10"
SHAPE = (3, 8, 8)
TINY = ReconConfig(num_samples=16, synth_batch=16, synth_steps=3, iters=5, batch_size=8)
EXAMPLE = torch.zeros(1, *SHAPE)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- tiny models


class Block(nn.Module):
    """A residual block: identity shortcut, or a strided 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem, two residual blocks (the second strided), pooled linear head: 4 recon units on 3x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class Merge(nn.Module):
    """A residual block with two inputs: its skip comes from further back than the previous block."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)) + skip)


class LongSkipNet(nn.Module):
    """stem -> block -> merge(block output, stem output): not a chain of single-input blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.block = Block(8, 8, 1)
        self.merge = Merge(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        z = self.merge(self.block(y), y)
        return self.fc(torch.flatten(self.pool(z), 1))


def _randomize_bns(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms (the default ones make BNS losses trivial)."""
    g = _gen(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(c, generator=g) * 0.3)
                bn.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model.eval()


def _tiny(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    return _randomize_bns(TinyResNet(), seed)


def _stored(**kwargs) -> QuantConfig:
    return QuantConfig(wbits=4, abits=4, weight_scales="stored", **kwargs)


def _weight_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "weight_quantizer", None), WeightQuantizer)]


def _assert_on_stored_grid(model: nn.Module) -> None:
    """Every weight is stored exactly on its quantizer's stored grid (quantizing it changes nothing)."""
    layers = _weight_layers(model)
    assert layers
    for layer in layers:
        wq = layer.weight_quantizer
        assert wq.stored
        with torch.no_grad():
            assert torch.equal(wq(layer.weight), layer.weight)


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


# --------------------------------------------------------------------------- 5. lowpass


def test_lowpass_is_identity_at_a_huge_cutoff() -> None:
    """A Gaussian mask of enormous width is 1 everywhere."""
    x = torch.randn(2, 3, 8, 8, generator=_gen(9))
    torch.testing.assert_close(lowpass(x, 1e6), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cutoff", [0.05, 0.25, 1.0])
def test_lowpass_keeps_a_constant_image(cutoff: float) -> None:
    """The zero frequency passes at any cutoff."""
    x = torch.full((1, 3, 8, 6), 0.7)
    torch.testing.assert_close(lowpass(x, cutoff), x, rtol=0, atol=1e-6)


def test_lowpass_removes_a_checkerboard() -> None:
    """The Nyquist-frequency checkerboard (what strided convolutions let synthesis exploit) is filtered out."""
    i = torch.arange(8)
    board = ((i[:, None] + i[None, :]) % 2 * 2 - 1).float().expand(1, 3, 8, 8)
    kept = float(lowpass(board, 0.25).pow(2).sum() / board.pow(2).sum())
    assert kept < 0.1
    smooth = torch.linspace(-1, 1, 8)[None, :].expand(1, 3, 8, 8)
    assert float(lowpass(board + smooth, 0.25).sub(board + smooth).pow(2).sum()) > 0.9 * float(board.pow(2).sum())


# --------------------------------------------------------------------------- 6. swing convolution


def test_swing_hooks_only_strided_convolutions_and_removes_them() -> None:
    """Only convolutions with a stride > 1 get a pre-hook, and only inside the block."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, stride=(1, 2)),
        nn.Linear(2, 2),
    )  # fmt: skip
    _, strided, half, _ = model
    swing = _Swing(model, _gen())
    assert swing.convs == [strided, half]
    with swing:
        assert [len(m._forward_pre_hooks) for m in model] == [0, 1, 1, 0]
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"), _Swing(model, _gen()):
        raise RuntimeError("boom")
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_swing_shifts_by_at_most_one_pixel_with_reflect_padding() -> None:
    """The hooked input is the reflect-padded input cropped at a random offset in {0, 1, 2}^2, same shape."""
    conv = nn.Conv2d(3, 4, 3, stride=2)
    swing = _Swing(conv, _gen(10))
    x = torch.randn(2, 3, 7, 9, generator=_gen(11))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    seen = set()
    for _ in range(40):
        (shifted,) = swing._hook(conv, (x,))
        assert shifted.shape == x.shape
        offsets = [(dy, dx) for dy in range(3) for dx in range(3)
                   if torch.equal(shifted, padded[:, :, dy : dy + 7, dx : dx + 9])]  # fmt: skip
        assert len(offsets) == 1
        seen.add(offsets[0])
    assert len(seen) >= 4  # random, not a fixed shift
    with swing:
        assert conv(x).shape == (2, 4, 3, 4)


# --------------------------------------------------------------------------- synthesis


def test_synthesize_returns_the_pool_and_leaves_the_teacher_alone() -> None:
    """num_samples images in batches (the last one partial); P's state, grads and hooks are untouched."""
    teacher = _tiny()
    teacher.fc.bias.requires_grad_(False)
    before = copy.deepcopy(teacher.state_dict())
    pool = synthesize_pool(teacher, SHAPE, 10, batch=4, steps=2, lowpass=0.5, generator=_gen(), progress=False)
    assert pool.shape == (10, *SHAPE) and not pool.requires_grad and bool(torch.isfinite(pool).all())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n for n, p in teacher.named_parameters() if not p.requires_grad} == {"fc.bias"}
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in teacher.modules())


# --------------------------------------------------------------------------- 7. units


def test_units_of_resnet20_chain_to_the_whole_model() -> None:
    """resnet20: stem, 9 blocks, head = 11 units; running them in turn is exactly Q."""
    torch.manual_seed(0)
    q = quantize_model(create_model(MODEL), _stored()).eval()
    x = torch.randn(2, 3, 32, 32, generator=_gen(12))
    calibrate(q, [x])
    chain = units(q)
    assert len(chain) == 11
    modules = {id(m) for m in q.modules()}
    assert all(id(layer) in modules for unit in chain for layer in _weight_layers(unit))  # shared, not copies
    assert sum(len(_weight_layers(u)) for u in chain) == len(_weight_layers(q))
    with torch.no_grad():
        y = x
        for unit in chain:
            y = unit(y)
        assert torch.equal(y, q(x))


def _cut(model: nn.Module) -> tuple[list[nn.Module], torch.Tensor, torch.Tensor]:
    """Q of ``model`` calibrated and cut into units; the units run in turn, and Q itself, on the same inputs."""
    torch.manual_seed(0)
    q = quantize_model(model.eval(), _stored())
    calibrate(q, [torch.randn(4, *SHAPE, generator=_gen(3))])
    chain = units(q)
    x = torch.randn(3, *SHAPE, generator=_gen(4))
    y = x
    for unit in chain:
        y = unit(y)
        assert isinstance(y, torch.Tensor)  # never a tuple between units
    return chain, y, q(x)


def test_units_of_a_skip_across_blocks_cut_where_one_tensor_is_live() -> None:
    """A skip from two blocks back is no chain of blocks; the dataflow cut keeps the skip inside one unit."""
    chain, y, expected = _cut(LongSkipNet())
    assert len(chain) == 3 and torch.equal(y, expected)  # stem, block + merge (the skip is live across it), head


class _Vgg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())  # fmt: skip
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class _Dense(nn.Module):
    """Two densely connected layers (DenseNet's concatenations) and a 1x1 transition."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(7, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c3, self.b3 = nn.Conv2d(11, 6, 1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, F.relu(self.b1(self.c1(x)))], 1)
        x = torch.cat([x, F.relu(self.b2(self.c2(x)))], 1)
        return self.fc(F.relu(self.b3(self.c3(x))).mean((2, 3)))


@pytest.mark.parametrize(("model", "expected"), [(_Vgg, 3), (_Dense, 4)])
def test_units_of_chains_and_concatenations_hold_one_weighted_layer_each(model: type, expected: int) -> None:
    """Without residual blocks the model is not one unit (as it used to be): one weighted layer per unit."""
    chain, y, reference = _cut(model())
    assert len(chain) == expected and torch.equal(y, reference)
    weighted = [sum(isinstance(m, nn.Conv2d | nn.Linear) for m in unit.modules()) for unit in chain]
    assert weighted == [1] * expected


def test_units_of_chained_residuals_are_the_blocks_with_their_sum_grids() -> None:
    """Under the deploy protocol each sum has its own grid, inside its block's unit: recon learns its step there."""
    chain, y, reference = _cut(ChainedSumsNet())
    assert len(chain) == 5 and torch.equal(y, reference)  # stem, three blocks, head
    sums = [[n for n, m in unit.named_modules() if isinstance(m, ActQuantizer) and n.endswith("add_out")]
            for unit in chain[1:4]]  # fmt: skip
    assert all(len(s) == 1 for s in sums), sums


# --------------------------------------------------------------------------- 8. initial grids


@pytest.mark.parametrize("protocol", ["paper", "deploy"])
def test_init_grids_only_lowers_the_quantization_error(protocol: str) -> None:
    """The clip search starts at the min/max range: activation errors on the pool and weight scales only shrink."""
    pool = torch.randn(16, *SHAPE, generator=_gen(13))
    q = quantize_model(_tiny(), _stored(protocol=protocol)).eval()
    plain = copy.deepcopy(q)
    calibrate(plain, [pool])
    init_grids(q, pool, batch_size=len(pool))
    assert all(aq.get_mode() is ActMode.FROZEN for _, aq in act_quantizers(q))

    shrunk = False
    for a, b in zip(_weight_layers(q), _weight_layers(plain), strict=True):
        assert bool((a.weight_quantizer.scale <= b.weight_quantizer.scale).all())
        shrunk |= bool((a.weight_quantizer.scale < b.weight_quantizer.scale).any())
    assert shrunk

    # Each activation range against its min/max calibration, on the inputs the clip search saw
    # (the clipped weights, the unclipped activation ranges).
    reference = copy.deepcopy(q)
    for (_, r), (_, p) in zip(act_quantizers(reference), act_quantizers(plain), strict=True):
        r.lo.copy_(p.lo)
        r.hi.copy_(p.hi)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [aq.register_forward_pre_hook(lambda m, args, n=n: inputs.__setitem__(n, args[0]))
             for n, aq in act_quantizers(reference)]  # fmt: skip
    with torch.no_grad():
        reference(pool)
    for h in hooks:
        h.remove()
    lowered = 0
    for (name, aq), (_, ref) in zip(act_quantizers(q), act_quantizers(reference), strict=True):
        x = inputs[name]
        with torch.no_grad():
            err, ref_err = float((aq(x) - x).pow(2).sum()), float((ref(x) - x).pow(2).sum())
        assert err <= ref_err, name
        lowered += err < ref_err
    assert lowered >= 3


# --------------------------------------------------------------------------- 9. one unit


def _first_block() -> tuple[nn.Module, torch.Tensor, nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A calibrated stored-grid Q of the tiny net, its pool, its first block and that block's (x_q, x_fp, y_fp)."""
    pool = torch.randn(16, *SHAPE, generator=_gen(14))
    q = quantize_model(_tiny(), _stored()).eval()
    for p in q.parameters():
        p.requires_grad_(False)
    calibrate(q, [pool])
    stem, block, *_ = units(q)
    with torch.no_grad():
        x_q = stem(pool)
        with quant_disabled(q):
            x_fp = stem(pool)
            y_fp = block(x_fp)
    return q, pool, block, (x_q, x_fp, y_fp)


def test_reconstruct_unit_leaves_an_ordinary_quantized_unit() -> None:
    """After fitting a block: finite loss, weights on their (learned) grids, quantizers frozen, nothing transient."""
    q, pool, block, data = _first_block()
    before = {k: v.clone() for k, v in q.state_dict().items() if not k.startswith("layer.0.")}
    loss = reconstruct_unit(block, *data, TINY, _gen())
    assert np.isfinite(loss) and loss > 0

    _assert_on_stored_grid(q.layer[0])
    for _, aq in act_quantizers(q.layer[0]):
        assert aq.get_mode() is ActMode.FROZEN and aq.drop_prob == 0.0 and not aq.training
    assert not any(m.training for m in q.modules())
    assert not [n for n, _ in q.named_parameters() if n.endswith(("alpha", "step"))]
    for k, v in q.state_dict().items():  # the other units are untouched
        if k in before:
            assert torch.equal(v, before[k]), k
    with torch.no_grad():  # Q still runs, deterministically
        assert torch.equal(q(pool), q(pool))


@pytest.mark.parametrize("lr_bn", [0.0, 1e-2])
def test_reconstruct_unit_learns_batchnorm_only_when_asked(lr_bn: float) -> None:
    """recon.lr_bn > 0 fits the unit's BatchNorm scales and shifts too (not the output sites inside them, which
    the deploy protocol adds); 0 leaves them as P's."""
    _, _, block, data = _first_block()
    bns = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [p.clone() for m in bns for p in m.parameters(recurse=False)]
    reconstruct_unit(block, *data, ReconConfig(**{**TINY.__dict__, "lr_bn": lr_bn}), _gen())
    after = [p for m in bns for p in m.parameters(recurse=False)]
    assert bns and not any(p.requires_grad for p in after)
    moved = [not torch.equal(a, b) for a, b in zip(after, before, strict=True)]
    assert all(moved) if lr_bn else not any(moved)


# --------------------------------------------------------------------------- 10. end to end


def test_recon_end_to_end_on_a_tiny_residual_net() -> None:
    """dfq.quantize(method="recon"): stored grids, weights on them, summary names the method, seeded."""
    model = _tiny()
    before = copy.deepcopy(model.state_dict())
    result = dfq.quantize(model, QuantConfig(wbits=4, abits=4), TINY, example_inputs=EXAMPLE, progress=False)
    q, summary = result.model, result.summary
    assert summary["method"] == "recon" and (summary["wbits"], summary["abits"]) == (4, 4)
    _assert_on_stored_grid(q)
    assert all(aq.get_mode() is ActMode.FROZEN and aq.drop_prob == 0.0 for _, aq in act_quantizers(q))
    assert not q.training
    assert not [n for n, _ in q.named_parameters() if n.endswith(("alpha", "step"))]
    assert all(p.requires_grad for p in q.parameters())
    x = torch.randn(8, *SHAPE, generator=_gen(15))
    with torch.no_grad():
        out, ref = q(x), model(x)
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    assert not torch.equal(out, ref)  # really quantized
    for k, v in model.state_dict().items():  # P is not modified
        assert torch.equal(v, before[k]), k
    again = dfq.quantize(model, QuantConfig(wbits=4, abits=4), TINY, example_inputs=EXAMPLE, progress=False).model
    for (k, v), (_, w) in zip(q.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


def test_recon_bns_normalized_reaches_the_synthesis() -> None:
    """``method.bns_normalized`` changes the pool (the same seed otherwise), and so Q."""
    kwargs = {"batch": 4, "steps": 3, "progress": False}
    plain = synthesize_pool(_tiny(), SHAPE, 4, generator=_gen(5), **kwargs)
    assert not torch.equal(plain, synthesize_pool(_tiny(), SHAPE, 4, generator=_gen(5), normalized=True, **kwargs))
    model, quant = _tiny(), QuantConfig(wbits=4, abits=4)
    qs = [dfq.quantize(model, quant, dataclasses.replace(TINY, bns_normalized=flag), example_inputs=EXAMPLE,
                       progress=False).model.state_dict() for flag in (False, True)]  # fmt: skip
    assert any(not torch.equal(qs[0][k], qs[1][k]) for k in qs[0])


def test_recon_spilling_to_mapped_files_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every pool-sized tensor in a memory-mapped file (spill_mb=0), Q is bitwise the one made in memory, and
    no file is left in TMPDIR."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model, quant = _tiny(), QuantConfig(wbits=4, abits=4)
    spilled = dfq.quantize(model, quant, dataclasses.replace(TINY, spill_mb=0), example_inputs=EXAMPLE, progress=False)
    in_memory = dfq.quantize(model, quant, TINY, example_inputs=EXAMPLE, progress=False)
    for (k, v), (_, w) in zip(spilled.model.state_dict().items(), in_memory.model.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    assert not list(tmp_path.glob("dfq-*"))


def test_synthesized_pool_spills_above_its_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool over spill_bytes is backed by an unlinked mapped file; the same pool under it is ordinary memory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    kwargs = {"batch": 4, "steps": 2, "progress": False}
    small = synthesize_pool(_tiny(), SHAPE, 6, generator=_gen(3), spill_bytes=10**9, **kwargs)
    big = synthesize_pool(_tiny(), SHAPE, 6, generator=_gen(3), spill_bytes=0, **kwargs)
    assert small.untyped_storage().filename is None
    assert str(big.untyped_storage().filename).startswith(str(tmp_path))
    assert torch.equal(small, big) and not list(tmp_path.glob("dfq-*"))


def test_reconstruct_fits_p_on_the_images_q_sees_under_a_fixed_input_range() -> None:
    """Under the deploy protocol's fixed input grid, pixels outside the valid range are clipped for P's targets as
    Q's input quantizer clips them: a pool that overshoots the range gives the Q of the pool clipped to it."""
    quant = QuantConfig(wbits=4, abits=4, protocol="deploy", input_range=(-1.0, 1.0), weight_scales="stored")
    pool = 3 * torch.randn(16, *SHAPE, generator=_gen(4))
    assert float((pool.abs() > 1).float().mean()) > 0.5

    def fit(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return reconstruct(_tiny(), quant, TINY, images, generator=_gen(5), progress=False).state_dict()

    for (k, v), (_, w) in zip(fit(pool).items(), fit(pool.clamp(-1, 1)).items(), strict=True):
        assert torch.equal(v, w), k


def test_spilling_where_no_file_can_be_made_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TMPDIR that cannot hold the activations is a DFQError naming the knobs, not an OSError."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with pytest.raises(DFQError, match=r"TMPDIR.*spill_mb"):
        synthesize_pool(_tiny(), SHAPE, 4, batch=4, steps=1, progress=False, generator=_gen(3), spill_bytes=0)


def test_recon_deploy_protocol_keeps_weights_on_the_signed_grid() -> None:
    """Under the deploy protocol recon's learned weights stay on symmetric signed stored grids."""
    q = dfq.quantize(_tiny(), QuantConfig(wbits=4, abits=4, protocol="deploy"), TINY, example_inputs=EXAMPLE,
                     progress=False).model  # fmt: skip
    _assert_on_stored_grid(q)
    for layer in _weight_layers(q):
        wq = layer.weight_quantizer
        assert wq.code_range.tolist() == [-7, 7] and not bool(wq.zero_point.any())


def test_recon_defaults_to_stored_weight_scales() -> None:
    """The recon method's own default; other methods keep the papers' min/max weights."""
    assert resolve_config(None, {"method": "recon"}).quant.weight_scales == "stored"
    assert resolve_config(None, {"method": "zeroq"}).quant.weight_scales == "minmax"
    assert resolve_config({"method": "recon", "quant": {"wbits": 3}}).quant.weight_scales == "stored"


# --------------------------------------------------------------------------- 11. validation


@pytest.mark.parametrize(
    "bad",
    [{"num_samples": 0}, {"iters": 0}, {"synth_batch": 0}, {"batch_size": 0}, {"drop_prob": 1.5},
     {"drop_prob": -0.1}, {"lowpass": 2.0}, {"round_warmup": 1.0}, {"spill_mb": -1}],
)  # fmt: skip
def test_recon_config_rejects_bad_values(bad: dict) -> None:
    """Bad settings are config errors up front, not failures mid-run."""
    with pytest.raises(DFQError, match="recon"):
        ReconConfig(**bad)
    with pytest.raises(DFQError, match="recon"):
        resolve_config(None, {"method": "recon", **{f"method.{k}": v for k, v in bad.items()}})


def test_recon_refuses_minmax_weight_scales() -> None:
    """recon learns weight grids, so forcing the min/max quantizer is an error that names the setting."""
    with pytest.raises(DFQError, match="weight_scales"):
        dfq.quantize(_tiny(), QuantConfig(weight_scales="minmax"), TINY, example_inputs=EXAMPLE, progress=False)
    with pytest.raises(DFQError, match="weight_scales"):
        resolve_config({"method": {"name": "recon"}, "quant": {"weight_scales": "minmax"}})


# --------------------------------------------------------------------------- CLI


def _npz(path: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), labels=np.arange(n) % 10)
    return path


def _cli(*argv: str) -> tuple[int, dict | None]:
    """Run the CLI in-process; (exit code, the last stdout line as JSON when there is one)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(argv))
    lines = out.getvalue().strip().splitlines()
    try:
        return rc, json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return rc, None


@pytest.fixture(scope="module")
def recon_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`dfq quantize --method recon` of a random resnet20, papers' and deploy protocols, with --data."""
    root = tmp_path_factory.mktemp("recon_cli")
    torch.manual_seed(0)
    weights = root / "random.pt"
    torch.save(create_model(MODEL).state_dict(), weights)
    data = _npz(root / "tiny.npz")
    preset = root / "tiny.yaml"
    preset.write_text(yaml.safe_dump({"recon": {"synth_batch": 16, "synth_steps": 2, "iters": 2, "batch_size": 8}}))
    runs = {"data": data}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DFQ_HOME", str(root / "dfq_home"))
        for protocol in ("paper", "deploy"):
            run_dir = root / protocol
            rc, summary = _cli(
                "quantize", MODEL, "--method", "recon", "--wbits", "4", "--abits", "4",
                "--set", "method.num_samples=16",
                "--weights", str(weights), "--config", str(preset), "--protocol", protocol, "--data", str(data),
                "--out", str(run_dir), "--json", "--no-progress",
            )  # fmt: skip
            runs[protocol] = (rc, summary, run_dir)
    return runs


@pytest.mark.parametrize("protocol", ["paper", "deploy"])
def test_cli_quantize_recon(recon_runs: dict, protocol: str) -> None:
    """--method recon runs; --set and a preset in the earlier flat layout reach the method section; stored scales."""
    rc, summary, run_dir = recon_runs[protocol]
    assert rc == 0
    assert summary["method"] == "recon" and (summary["wbits"], summary["abits"]) == (4, 4)
    assert summary["n"] == 8 and 0 <= summary["top1"] <= 100
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["method"]["name"] == "recon" and config["quant"]["protocol"] == protocol
    assert config["quant"]["weight_scales"] == "stored"
    assert config["method"]["num_samples"] == 16
    method = config["method"]
    assert (method["synth_steps"], method["iters"], method["batch_size"], method["synth_batch"]) == (2, 2, 8, 16)
    state = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    assert "layer2.0.conv1.weight_quantizer.scale" in state
    assert json.loads((run_dir / "summary.json").read_text())["top1"] == summary["top1"]


def test_cli_eval_reproduces_the_recon_summary(recon_runs: dict) -> None:
    """dfq eval on the run directory rebuilds Q from its checkpoint and gets the quantize summary's top-1."""
    rc, summary, run_dir = recon_runs["paper"]
    assert rc == 0
    rc, result = _cli("eval", str(run_dir), "--data", str(recon_runs["data"]), "--json", "--no-progress")
    assert rc == 0
    assert result["method"] == "recon"
    assert (result["top1"], result["top5"], result["n"]) == (summary["top1"], summary["top5"], summary["n"])


def test_cli_export_of_a_deploy_recon_run_predicts_as_pytorch(recon_runs: dict, tmp_path: Path) -> None:
    """recon's learned grids are ordinary stored grids: the ONNX export predicts as PyTorch on every image."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    rc, summary, run_dir = recon_runs["deploy"]
    assert rc == 0
    rc, result = _cli("eval", str(run_dir), "--data", str(recon_runs["data"]), "--json", "--no-progress")
    assert rc == 0 and result["top1"] == summary["top1"]
    out = tmp_path / "m.onnx"
    rc, result = _cli("export", str(run_dir), "--out", str(out), "--verify", "--limit", "32", "--json",
                      "--no-progress")  # fmt: skip
    assert rc == 0 and out.is_file()
    assert result["verify"]["top1_agreement"] == 1.0 and result["verify"]["images"] == 32
    # 8-bit residual grids: ONNX Runtime's QLinearConv requantizes in float32 and may round a near-tie code the
    # other way (docs/deployment.md), at most 1 LSB on a few outputs
    sites = result["verify"]["sites"]
    assert all(s["max_lsb"] <= 1.0 + 1e-3 and s["mismatch"] < 1e-3 for s in sites), [s for s in sites if s["mismatch"]]
    assert result["integer_ops"].get("QLinearConv", 0) >= 1


def test_label_weight_pushes_each_image_toward_its_assigned_class() -> None:
    """With recon.label_weight, image i is pushed toward class i mod C (a class-balanced pool)."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    teacher = nn.Sequential(*layers, nn.Linear(4, 3)).eval()
    assigned = {}
    for weight in (0.0, 5.0):
        pool = synthesize_pool(teacher, (3, 8, 8), 6, batch=6, steps=60, label_weight=weight, swing=False,
                               generator=torch.Generator().manual_seed(0), progress=False)  # fmt: skip
        with torch.no_grad():
            assigned[weight] = float(teacher(pool).softmax(1)[torch.arange(6), torch.arange(6) % 3].mean())
    assert assigned[5.0] > assigned[0.0] + 0.05
    with pytest.raises(DFQError, match="label_weight"):
        ReconConfig(label_weight=-1.0)


class _ChannelSplit(nn.Module):
    """ShuffleNet-V2's unit: split the channels, transform one half, concatenate."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = F.relu(self.b1(self.c1(x))).chunk(2, dim=1)
        return self.fc(torch.cat([a, F.relu(self.b2(self.c2(b)))], 1).mean((2, 3)))


def test_units_never_cut_at_a_tuple() -> None:
    """A chunk's result is a tuple read by indexing: no unit may end there (it crashed on shufflenet_v2)."""
    chain, y, expected = _cut(_ChannelSplit())
    assert len(chain) == 3 and torch.equal(y, expected)
