"""Activations beyond the ReLU family: a site after each, squeeze-excitation products, and an exact ONNX export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfq
from dfq.errors import UnsupportedLayerError
from dfq.quant import (
    ActQuantizer,
    QuantActivation,
    QuantBatchNorm2d,
    QuantConfig,
    QuantConv2d,
    calibrate,
    quantize_model,
)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, gate: nn.Module) -> None:
        super().__init__()
        self.reduce, self.expand, self.gate = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1), gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.silu(self.reduce(x.mean((2, 3), keepdim=True)))  # functional: rewritten into a site
        return x * self.gate(self.expand(s))


class MobileNetLike(nn.Module):
    """Every activation kind dfq places a site after, SE gates (Sigmoid and Hardsigmoid), a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        bn = nn.BatchNorm2d
        self.stem, self.bn0, self.act0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), bn(8), nn.Hardswish()
        self.dw, self.bn1, self.act1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), bn(8), nn.SiLU()
        self.se1 = SqueezeExcite(8, nn.Sigmoid())
        self.pw, self.bn2 = nn.Conv2d(8, 16, 1, bias=False), bn(16)
        self.se2 = SqueezeExcite(16, nn.Hardsigmoid())
        self.c3, self.bn3, self.act3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), bn(16), nn.GELU()
        self.c4, self.bn4 = nn.Conv2d(16, 16, 3, padding=1, bias=False), bn(16)
        self.mish, self.elu = nn.Mish(), nn.ELU(0.5)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.dw(self.act0(self.bn0(self.stem(x))))))
        x = self.se2(F.leaky_relu(self.bn2(self.pw(self.se1(x))), 0.1))
        x = self.mish(self.bn4(self.c4(self.act3(self.bn3(self.c3(x)))))) + torch.tanh(x)
        return self.fc(self.elu(x).mean((2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = MobileNetLike()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so folding and signs are exercised
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _kinds(q: nn.Module) -> list[str]:
    return sorted(type(m.act).__name__ for m in q.modules() if isinstance(m, QuantActivation))


def test_every_activation_gets_a_site_signed_where_it_goes_negative() -> None:
    q = quantize_model(_model(), QuantConfig(protocol="deploy", wbits=8, abits=8))
    assert _kinds(q) == sorted(["Hardswish", "SiLU", "SiLU", "SiLU", "Sigmoid", "Hardsigmoid", "LeakyReLU", "GELU",
                                "Mish", "Tanh", "ELU"])  # fmt: skip
    calibrate(q, [torch.randn(16, 3, 8, 8)])
    sites = {type(m.act).__name__: m.act_quantizer.qparams()[2] for m in q.modules() if isinstance(m, QuantActivation)}
    assert sites["Sigmoid"] == 0 and sites["Hardsigmoid"] == 0  # gates are non-negative: unsigned grids
    assert sites["SiLU"] < 0 and sites["Hardswish"] < 0 and sites["LeakyReLU"] < 0  # signed where values go negative
    # the SE products and the pooled features reach their layers through input quantizers
    assert isinstance(q.pw.input_quantizer, ActQuantizer) and isinstance(q.se1.reduce.input_quantizer, ActQuantizer)


def test_papers_protocol_places_the_same_sites() -> None:
    q = quantize_model(_model(), QuantConfig(wbits=4, abits=4))
    assert len(_kinds(q)) == 11 and all(isinstance(m, QuantConv2d) for m in (q.stem, q.dw, q.se1.reduce))


def test_export_runs_the_activations_exactly_between_integer_kernels(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    q = quantize_model(_model(), QuantConfig(protocol="deploy", wbits=8, abits=8))
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    calibrate(q, [x])
    result = dfq.export_onnx(q, tmp_path / "q.onnx", example_inputs=x, verify=list(x.split(16)))
    assert result["integer_ops"].get("QLinearConv", 0) == 9  # every conv: a site before each float activation
    parity = result["verify"]
    assert parity["top1_agreement"] == 1.0
    assert all(s["max_lsb"] <= 1.0 + 1e-3 for s in parity["sites"]), parity["sites"]


def test_zeroq_and_recon_run_end_to_end_on_it() -> None:
    p = _model()
    for method in (dfq.methods.ZeroQConfig(num_samples=4, steps=2),
                   dfq.methods.ReconConfig(num_samples=8, synth_steps=2, iters=2, synth_batch=8)):  # fmt: skip
        result = dfq.quantize(p, QuantConfig(protocol="deploy", wbits=4, abits=8), method,
                              example_inputs=torch.randn(1, 3, 8, 8), progress=False)  # fmt: skip
        out = result.model(torch.randn(2, 3, 8, 8))
        assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_learned_slopes_are_still_refused_by_name() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU(), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(UnsupportedLayerError, match=r"2 \(PReLU\)"):
        quantize_model(model, QuantConfig())


class NormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: BatchNorm's own parameters through F.batch_norm, then drop and act."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.drop, self.act = nn.Identity(), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


class OddNorm(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_norm_act_composites_become_batchnorm_and_a_site(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    p = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), NormAct(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 4)).eval()  # fmt: skip
    p[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(16, 3, 8, 8)
    q = quantize_model(p, QuantConfig(protocol="deploy", wbits=8, abits=8))
    assert isinstance(q[1].bn, QuantBatchNorm2d)  # a plain BatchNorm now, folded into the convolution
    assert isinstance(q[1].act, QuantActivation)
    with torch.no_grad():
        identity = QuantConfig(wbits=32, abits=32, protocol="paper")  # deploy would still quantize the input
        torch.testing.assert_close(quantize_model(p, identity)(x), p(x))  # same function
    calibrate(q, [x])
    result = dfq.export_onnx(q, tmp_path / "n.onnx", example_inputs=x, verify=[x])
    assert result["integer_ops"]["QLinearConv"] == 1 and result["verify"]["top1_agreement"] == 1.0
    with pytest.raises(UnsupportedLayerError, match=r"1 \(OddNorm\).*own forward"):
        quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3), OddNorm(4)), QuantConfig())


def test_cle_keeps_the_activation_of_a_norm_act_composite() -> None:
    """A BatchNormAct2d folds into its convolution like a BatchNorm, and its activation stays (the function is kept)."""
    torch.manual_seed(0)
    p = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), NormAct(8), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(8, 4)).eval()  # fmt: skip
    identity = QuantConfig(wbits=32, abits=32, protocol="paper")
    result = dfq.quantize(p, identity, dfq.methods.CLEConfig(calib_steps=1, calib_samples=2),
                          example_inputs=torch.randn(1, 3, 8, 8), progress=False)  # fmt: skip
    assert result.summary["folded_bn"] == 1
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), p(x), rtol=1e-4, atol=1e-5)
