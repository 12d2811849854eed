"""GPTQ (Frantar et al., ICLR 2023) on a synthesized pool as method ``gptq``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfq
import dfq.testing
from dfq.errors import DFQError
from dfq.methods import GPTQConfig
from dfq.methods.gptq import gptq_codes, gptq_quantize, gptq_round, layer_hessian
from dfq.quant import quantize_model
from dfq.quant.api import act_quantizers, weight_quantizers
from dfq.quant.clip import init_grids

QMIN, QMAX = -8, 7
FAST = {"num_samples": 8, "synth_batch": 8, "synth_steps": 2}


def _obq_reference(w, h, scale, zp, damp, act_order):
    """Optimal Brain Quantization one column at a time on the explicit inverse Hessian (Frantar and Alistarh 2022,
    eq. 3 and the removal of a quantized column from ``H⁻¹`` by Gaussian elimination): no Cholesky factor, no
    blocks, a different route to what GPTQ computes."""
    d = w.shape[1]
    order = sorted(range(d), key=lambda i: -float(h[i, i])) if act_order else list(range(d))
    hinv = torch.linalg.inv(h + damp * h.diagonal().mean() * torch.eye(d, dtype=h.dtype))
    w, codes = w.clone(), torch.zeros_like(w)
    for i in order:
        codes[:, i] = torch.clamp(torch.round(w[:, i] / scale + zp), QMIN, QMAX)
        err = (w[:, i] - (codes[:, i] - zp) * scale) / hinv[i, i]
        w -= err[:, None] * hinv[i][None, :]
        hinv = hinv - torch.outer(hinv[:, i], hinv[i]) / hinv[i, i]
    return codes


def _problem(groups: int, rows: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, d, 4 * d, generator=g, dtype=torch.float64)
    x = x + torch.randn(groups, d, 1, generator=g, dtype=torch.float64) * x[:, :1]  # correlated inputs
    w = torch.randn(groups, rows, d, generator=g, dtype=torch.float64)
    scale = w.abs().amax(-1) / 7
    return w, x @ x.transpose(1, 2), scale, torch.zeros_like(scale), x


@pytest.mark.parametrize("act_order", [False, True])
def test_codes_match_optimal_brain_quantization_column_by_column(act_order: bool) -> None:
    w, h, scale, zp, _ = _problem(groups=2, rows=3, d=7)
    codes = gptq_codes(w, h, scale, zp, QMIN, QMAX, damp=0.01, block=3, act_order=act_order)  # lazy blocks of 3
    for g in range(2):
        expected = _obq_reference(w[g], h[g], scale[g], zp[g], 0.01, act_order)
        assert torch.equal(codes[g], expected)


def test_block_size_does_not_change_the_codes() -> None:
    w, h, scale, zp, _ = _problem(groups=1, rows=4, d=10, seed=1)
    runs = [gptq_codes(w, h, scale, zp, QMIN, QMAX, block=b) for b in (1, 4, 128)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_output_error_below_nearest_rounding() -> None:
    w, h, scale, zp, x = _problem(groups=1, rows=16, d=24, seed=2)
    s = scale[..., None]
    nearest = torch.clamp(torch.round(w / s), QMIN, QMAX) * s
    gptq = gptq_codes(w, h, scale, zp, QMIN, QMAX) * s
    assert torch.all(gptq >= QMIN * s - 1e-12) and torch.all(gptq <= QMAX * s + 1e-12)
    err = {k: float(((v - w) @ x).pow(2).sum()) for k, v in {"nearest": nearest, "gptq": gptq}.items()}
    assert err["gptq"] < 0.5 * err["nearest"], err


def test_an_input_that_is_always_zero_keeps_no_weight() -> None:
    w, h, scale, zp, _ = _problem(groups=1, rows=3, d=5, seed=3)
    h[:, 2, :] = 0
    h[:, :, 2] = 0
    codes = gptq_codes(w, h, scale, zp, QMIN, QMAX)
    assert torch.equal(codes[0, :, 2], torch.zeros(3, dtype=codes.dtype))


def test_nan_or_a_hessian_without_cholesky_factor_is_one_clear_error() -> None:
    w, h, scale, zp, _ = _problem(groups=1, rows=2, d=4, seed=4)
    h[0, 1, 1] = float("nan")
    with pytest.raises(DFQError, match="NaN/Inf"):
        gptq_codes(w, h, scale, zp, QMIN, QMAX)
    with pytest.raises(DFQError, match=r"not positive definite.*raise method\.damp"):
        gptq_codes(w, -torch.eye(4, dtype=torch.float64)[None], scale, zp, QMIN, QMAX)


class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("name", ["conv1", "conv2", "fc"])
def test_hessian_is_the_layer_inputs_gram_matrix_per_group(name: str) -> None:
    """For any weight ``V``, ``Σ_g tr(V_g H_g V_gᵀ)`` is the squared norm of the layer's output with ``V`` on the
    inputs Q gives it: the patches are laid out as the weight's rows read them, one Hessian per group."""
    q = quantize_model(_Grouped().eval(), dfq.QuantConfig(wbits=4, abits=4)).eval()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    dfq.quant.calibrate(q, [x])
    layer = getattr(q, name)
    seen = []
    if layer.input_quantizer is None:  # what the layer computes on: its input, on the input grid where it has one
        handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    else:
        handle = layer.input_quantizer.register_forward_hook(lambda m, a, out: seen.append(out))
    q(x)
    handle.remove()
    h = layer_hessian(q, layer, x, batch_size=4)  # two chunks, summed
    v = torch.randn_like(layer.weight, dtype=torch.float64)
    inputs = seen[0].double()
    if name == "fc":
        out = F.linear(inputs, v)
    else:
        out = F.conv2d(inputs, v, stride=layer.stride, padding=layer.padding, groups=layer.groups)
    vg = v.reshape(h.shape[0], -1, h.shape[1])
    assert torch.allclose((vg @ h * vg).sum(), out.pow(2).sum(), rtol=1e-9)


def _first_layer_error(keys: dict, **quant) -> tuple[float, torch.Tensor]:
    """Output error ``Σ (w-ŵ)ᵀ H (w-ŵ)`` of conv1 (whose inputs do not depend on the other layers) and its grid."""
    teacher, x = _Grouped().eval(), torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    config = dfq.QuantConfig(wbits=3, abits=8, weight_scales="stored", **quant)
    q = gptq_quantize(teacher, config, GPTQConfig(synth_batch=8, **keys), x, progress=False)
    wq = q.conv1.weight_quantizer
    assert torch.equal(wq(q.conv1.weight), q.conv1.weight)  # on the grid it stores
    h = layer_hessian(q, q.conv1, x, 8)
    diff = (q.conv1.weight - teacher.conv1.weight).detach().double().reshape(1, 4, -1)
    return float((diff @ h * diff).sum()), wq.scale.clone()


@pytest.mark.parametrize("quant", [{}, {"protocol": "paper", "weight_granularity": "per_tensor"}])
def test_grid_search_keeps_the_grid_with_the_least_output_error(quant: dict) -> None:
    torch.manual_seed(0)
    plain, plain_grid = _first_layer_error({}, **quant)
    searched, searched_grid = _first_layer_error({"grid_search": True}, **quant)
    assert searched_grid.shape == plain_grid.shape and not torch.equal(searched_grid, plain_grid)
    assert searched <= plain * (1 + 1e-9), (searched, plain)


@pytest.mark.parametrize(("protocol", "keys", "abits"), [("paper", {}, 8), ("deploy", {}, 8),
                                                         ("deploy", {"grid_search": True}, 8),
                                                         ("deploy", {"act_search": True}, 4)])  # fmt: skip
def test_q_is_on_its_grids_and_exports(protocol: str, keys: dict, abits: int, tmp_path) -> None:
    r = dfq.quantize(dfq.testing.tiny_classifier(), dfq.QuantConfig(protocol=protocol, wbits=4, abits=abits),
                     GPTQConfig(**FAST, **keys), example_inputs=torch.zeros(1, *dfq.testing.INPUT_SIZE),
                     progress=False)  # fmt: skip
    assert r.method_name == "gptq" and r.quant.weight_scales == "stored" and r.summary["gptq_s"] > 0
    layers = list(weight_quantizers(r.model))
    assert len(layers) == 4
    for layer, wq in layers:
        assert torch.equal(wq(layer.weight).detach(), layer.weight.detach())  # on the grid: the forward keeps it
    if protocol == "deploy":
        dfq.export_onnx(r, tmp_path / "q.onnx", verify=[torch.randn(8, *dfq.testing.INPUT_SIZE)])
        assert (tmp_path / "q.onnx").is_file()


def test_act_search_lowers_the_output_error_on_the_pool() -> None:
    """The searched activation ranges leave Q's logits closer to P's on the pool than the least-error ones do; the
    8-bit sites keep their ranges."""
    torch.manual_seed(0)
    teacher, x = _Grouped().eval(), torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    quant = dfq.QuantConfig(wbits=4, abits=4, weight_scales="stored")
    runs = {}
    for search in (False, True):
        q = gptq_quantize(teacher, quant, GPTQConfig(synth_batch=8, act_search=search), x, progress=False)
        with torch.no_grad():
            error = float((q(x) - teacher(x)).pow(2).sum())
        runs[search] = error, {n: (aq.spec.bits, float(aq.lo), float(aq.hi)) for n, aq in act_quantizers(q)}
    assert runs[True][0] < runs[False][0], runs
    ranges = runs[False][1], runs[True][1]
    assert any(ranges[0][n] != ranges[1][n] for n in ranges[0] if ranges[0][n][0] < 8)
    assert all(ranges[0][n] == ranges[1][n] for n in ranges[0] if ranges[0][n][0] >= 8)


def test_gptq_round_returns_the_compensated_weights_it_rounded() -> None:
    """Each layer's compensated weights round, on its grid, to the weights GPTQ wrote; they differ from P's (the
    errors of the columns rounded before were spread over them)."""
    teacher, x = _Grouped().eval(), torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    q = quantize_model(teacher, dfq.QuantConfig(wbits=3, abits=8, weight_scales="stored")).eval()
    init_grids(q, x, 8)
    starts = gptq_round(q, x, GPTQConfig(synth_batch=8), progress=False)
    floats = dict(teacher.named_modules())
    assert len(starts) == 3
    with torch.no_grad():
        for name, layer in q.named_modules():
            if layer in starts:
                assert torch.equal(layer.weight_quantizer(starts[layer]), layer.weight)
                assert not torch.allclose(starts[layer], floats[name].weight)


def test_refuses_minmax_weight_scales() -> None:
    with pytest.raises(DFQError, match="weight_scales to stored"):
        dfq.quantize(dfq.testing.tiny_classifier(), dfq.QuantConfig(weight_scales="minmax"), GPTQConfig(**FAST),
                     example_inputs=torch.zeros(1, *dfq.testing.INPUT_SIZE), progress=False)  # fmt: skip


@pytest.mark.parametrize("key", ["num_samples", "synth_batch", "synth_steps", "block"])
def test_config_validation(key: str) -> None:
    with pytest.raises(DFQError, match=rf"gptq\.{key} must be >= 1, got 0"):
        GPTQConfig(**{key: 0})
    with pytest.raises(DFQError, match=r"gptq\.damp must be > 0"):
        GPTQConfig(damp=0)
