"""The deploy protocol: ONNX-style division, integer-grid biases, BatchNorm folding and the sites it places."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfq.checkpoint import load_quantized, save_quantized
from dfq.config import RunConfig
from dfq.errors import DFQError
from dfq.methods import ZeroQConfig
from dfq.models import create_model
from dfq.quant import (
    ActQuantizer,
    Granularity,
    QuantBatchNorm2d,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    act_quantizers,
    calibrate,
    choose_qparams,
    quantize_affine,
    quantize_model,
)
from dfq.quant.modules import batchnorm_affine, bias_grid, folded_weight_scale

MODEL = "resnet20a_cifar10"
TIE_MARGIN = 1.0 + 2.0**-14
DEPLOY_W4A4 = QuantConfig(protocol="deploy", wbits=4, abits=4)


def _randomize_bn(bn: nn.BatchNorm2d, g: torch.Generator, gamma: list[float] | None = None) -> None:
    """Non-trivial statistics and affine terms, so folding and bias rounding are really exercised."""
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(gamma) if gamma is not None else torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g) * 0.3)
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def _symmetric_codes(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference per-output-channel signed narrow-grid codes and steps of a weight (ONNX-style division)."""
    qmax = 2 ** (bits - 1) - 1
    step = w.abs().reshape(w.shape[0], -1).amax(1) / qmax
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.clamp(torch.round(w / step.reshape(shape)), -qmax, qmax), step


# --------------------------------------------------------------------------- numerics


def test_quantize_divide_is_exact_division():
    """divide=True must compute x / scale (as ONNX QuantizeLinear does), not x * (1 / scale)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 257, generator=g) * 3
    scale = torch.rand(4, 1, generator=g) * 0.2 + 0.01
    ref = torch.clamp(torch.round(x / scale), -7, 7)
    assert torch.equal(quantize_affine(x, scale, torch.zeros_like(scale), -7, 7, divide=True), ref)


def _tie_case() -> tuple[float, torch.Tensor]:
    """A float32 step and values exactly halfway between two codes under division but not under the reciprocal."""
    k = torch.arange(-40, 40, dtype=torch.float32) + 0.5
    for s in torch.linspace(0.01, 0.5, 2000):
        x = k * s
        divided, multiplied = x / s, x * (1.0 / s)
        if bool(((divided == k) & (torch.round(divided) != torch.round(multiplied))).any()):
            return float(s), x
    raise AssertionError("no tie case found")


def test_divide_breaks_ties_like_onnx_quantizelinear_where_multiply_does_not():
    """At exact ties the two forms disagree; only the division matches ONNX Runtime's QuantizeLinear."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from dfq.export.runtime import session

    s, x = _tie_case()
    scale, zp = torch.tensor(s), torch.zeros(())
    divided = quantize_affine(x, scale, zp, -127, 127, divide=True)
    multiplied = quantize_affine(x, scale, zp, -127, 127, divide=False)
    assert (divided != multiplied).any()

    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(x)])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, [len(x)])],
        [onnx.numpy_helper.from_array(np.float32(s), "s"), onnx.numpy_helper.from_array(np.int8(0), "z")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    ort = session(proto.SerializeToString()).run(None, {"x": x.numpy()})[0]
    assert np.array_equal(divided.numpy().astype(np.int8), ort)


@pytest.mark.parametrize("lo, hi", [(-1.3, 0.7), (0.0, 2.5)])
def test_deploy_activation_step_is_widened_by_the_tie_margin(lo, hi):
    """Deploy (divide) quantizers widen the step by 2^-14 relative; the papers' ones keep choose_qparams's step."""
    base = choose_qparams(torch.tensor(lo), torch.tensor(hi), 4, symmetric=True)[0]
    for divide, factor in ((True, TIE_MARGIN), (False, 1.0)):
        q = ActQuantizer(QuantSpec(4, symmetric=True, deploy=divide), observer="minmax")
        q.observe(torch.tensor([lo, hi]))
        assert torch.equal(q.qparams()[0], base * factor)
    assert float(base * TIE_MARGIN) != float(base)


def test_bias_grid_codes_and_float32_step():
    """Codes are round(b / (float32(s_x) * float32(s_w))); the step is that float32 product."""
    b = torch.tensor([0.123456, -2.5, 0.0, 7.77], dtype=torch.float64)
    sx = torch.tensor(0.0123456789123, dtype=torch.float64)
    sw = torch.tensor([0.1, 0.2, 0.3, 0.0456789], dtype=torch.float64)
    codes, step = bias_grid(b, sx, sw)
    ref_step = sx.float() * sw.float()
    assert step.dtype == torch.float32
    assert torch.equal(step, ref_step)
    assert torch.equal(codes, torch.round(b / ref_step.double()))
    assert not torch.equal(step.double(), sx * sw)  # the product really is taken in float32


def test_folded_weight_scale_is_abs_product_with_one_for_dead_channels():
    """|s * g| per channel, and 1 where the gain is 0 so the dead channel keeps a valid scale."""
    s = torch.tensor([0.5, 0.25, 0.125, 2.0])
    g = torch.tensor([2.0, -3.0, 0.0, -0.5], dtype=torch.float64)
    assert torch.equal(folded_weight_scale(s, g), torch.tensor([1.0, 0.75, 1.0, 1.0], dtype=torch.float64))


# --------------------------------------------------------------------------- structure


def _conv_bn_pairs(model: nn.Module):
    yield model.conv1, model.bn1
    for layer in (model.layer1, model.layer2, model.layer3):
        for block in layer:
            yield block.conv1, block.bn1
            yield block.conv2, block.bn2


def test_resnet20a_deploy_structure():
    """Input sites, folded BatchNorms, residual sites and symmetric specs, as an integer runtime needs them."""
    q = quantize_model(create_model(MODEL), DEPLOY_W4A4)
    assert isinstance(q.conv1.input_quantizer, ActQuantizer)
    assert q.conv1.input_quantizer.spec.bits == 8 and q.conv1.input_quantizer.spec.symmetric
    assert isinstance(q.linear, QuantLinear) and isinstance(q.linear.input_quantizer, ActQuantizer)
    assert q.linear.input_quantizer.spec.bits == 4
    for conv, bn in _conv_bn_pairs(q):
        assert isinstance(conv, QuantConv2d)
        assert isinstance(bn, QuantBatchNorm2d) and bn.conv is conv
        assert conv.bn_follows
    blocks = [b for layer in (q.layer1, q.layer2, q.layer3) for b in layer]
    assert len(blocks) == 9
    for block in blocks:
        assert isinstance(block.bn2.output_quantizer, ActQuantizer)
        assert block.bn1.output_quantizer is None  # bn1 feeds a ReLU site, not an addition
        assert block.conv1.input_quantizer is None and block.conv2.input_quantizer is None  # already on a grid
    for m in q.modules():
        if isinstance(m, QuantConv2d | QuantLinear):
            spec = m.weight_quantizer.spec
            assert spec.symmetric and spec.granularity is Granularity.PER_CHANNEL and spec.deploy
        if isinstance(m, ActQuantizer):
            assert m.spec.symmetric and m.spec.deploy


def test_quantize_residual_false_keeps_residual_inputs_float():
    """Without quantize_residual no BatchNorm gets an output quantizer, but folding still happens."""
    q = quantize_model(create_model(MODEL), QuantConfig(protocol="deploy", quantize_residual=False))
    assert all(bn.output_quantizer is None for _, bn in _conv_bn_pairs(q))
    assert all(isinstance(bn, QuantBatchNorm2d) and bn.conv is conv for conv, bn in _conv_bn_pairs(q))
    assert isinstance(q.conv1.input_quantizer, ActQuantizer)


def test_paper_protocol_adds_no_deploy_sites():
    """The papers' protocol: float input, plain BatchNorm, asymmetric multiply-form quantizers."""
    q = quantize_model(create_model(MODEL), QuantConfig(protocol="paper", wbits=4, abits=4))
    assert all(m.input_quantizer is None for m in q.modules() if isinstance(m, QuantConv2d | QuantLinear))
    assert not any(isinstance(m, QuantBatchNorm2d) for m in q.modules())
    assert not q.conv1.weight_quantizer.spec.symmetric and not q.conv1.weight_quantizer.spec.deploy
    assert not q.relu.act_quantizer.spec.symmetric


def test_deploy_checkpoint_round_trip(tmp_path):
    """load_quantized rebuilds the deploy sites, so the calibrated state loads key for key and computes the same."""
    torch.manual_seed(0)
    q = quantize_model(create_model(MODEL), DEPLOY_W4A4)
    calibrate(q, [torch.randn(2, 3, 32, 32)])
    config = RunConfig(model=MODEL, quant=QuantConfig(protocol="deploy", wbits=4, abits=4), method=ZeroQConfig())
    save_quantized(tmp_path / "model.pt", q, config)
    loaded, loaded_config = load_quantized(tmp_path)
    assert loaded_config.quant.protocol == "deploy"
    ref, got = q.state_dict(), loaded.state_dict()
    assert list(got) == list(ref)
    assert any(k.endswith("input_quantizer.hi") for k in got) and any("output_quantizer" in k for k in got)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert loaded.layer1[0].bn2.conv is loaded.layer1[0].conv2
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), q.eval()(x))


def test_a_checkpoint_saved_when_output_bits_null_meant_abits_reloads_its_4_bit_sites(tmp_path):
    """Configs saved before output_bits defaulted to 8 hold ``null``: their residual sites were at abits and must
    reload so (the state holds no bit-width); a config built today saves the resolved 8."""
    torch.manual_seed(0)
    old = QuantConfig(wbits=4, abits=4, output_bits=4)
    q = quantize_model(create_model(MODEL), old)
    calibrate(q, [torch.randn(2, 3, 32, 32)])
    config = RunConfig(model=MODEL, quant=old, method=ZeroQConfig())
    save_quantized(tmp_path / "model.pt", q, config)
    payload = torch.load(tmp_path / "model.pt", weights_only=False)
    payload["config"]["quant"]["output_bits"] = None  # as dfq wrote it then
    torch.save(payload, tmp_path / "model.pt")
    loaded, loaded_config = load_quantized(tmp_path)
    assert loaded_config.quant.output_bits == 4 and loaded.layer1[0].bn2.output_quantizer.spec.bits == 4
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), q.eval()(x))
    assert QuantConfig(wbits=4, abits=4).to_dict()["output_bits"] == 8


# --------------------------------------------------------------------------- integer-grid biases


def test_quant_linear_adds_its_bias_on_the_accumulator_grid():
    """Q's Linear computes F.linear(xq, wq, round(b / (s_x * s_w)) * s_x * s_w), as the int32 runtime does."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    with torch.no_grad():
        model[1].bias.copy_(torch.randn(5, generator=g))
    q = quantize_model(model, DEPLOY_W4A4)
    layer = q[1]
    assert isinstance(layer.input_quantizer, ActQuantizer) and layer.input_quantizer.spec.bits == 8
    calibrate(q, [torch.randn(8, 3, 2, 2, generator=g) for _ in range(3)])

    x = torch.randn(6, 3, 2, 2, generator=g).flatten(1) * 1.5  # some values clamp
    aq = layer.input_quantizer
    sx = torch.maximum(aq.lo.abs(), aq.hi.abs()) / 127 * TIE_MARGIN
    xq = torch.clamp(torch.round(x / sx), -127, 127) * sx
    codes, sw = _symmetric_codes(layer.weight.detach(), 4)
    wq = codes * sw[:, None]
    step = sx * sw
    bias = torch.round(layer.bias.detach().double() / step.double()) * step.double()
    ref = F.linear(xq, wq, bias.float())
    with torch.no_grad():
        out = q(x)
        float_bias = F.linear(xq, wq, layer.bias)
    assert (out - ref).abs().max() < 1e-6
    assert (out - float_bias).abs().max() > 1e-5  # the rounding of the bias is visible


def test_conv_batchnorm_equals_the_explicitly_folded_integer_conv():
    """In eval mode Q's conv + BatchNorm is the folded conv: codes * sign(g) * |s*g|, bias on the s_x*|s*g| grid."""
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6), nn.ReLU())
    _randomize_bn(model[1], g, gamma=[1.3, -0.8, 0.0, 0.4, -1.7, 0.9])
    q = quantize_model(model, DEPLOY_W4A4).eval()
    conv, bn = q[0], q[1]
    assert isinstance(bn, QuantBatchNorm2d) and bn.conv is conv
    calibrate(q, [torch.randn(4, 3, 6, 6, generator=g) for _ in range(3)])

    x = torch.randn(3, 3, 6, 6, generator=g)
    with torch.no_grad():
        xq = conv.input_quantizer(x).double()
        out = bn(conv(x))
    sx = conv.input_quantizer.qparams()[0]
    gamma, beta = bn.weight.detach().double(), bn.bias.detach().double()
    gain = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = beta - gain * bn.running_mean.double() + gain * conv.bias.detach().double()
    codes, sw = _symmetric_codes(conv.weight.detach(), 4)
    fs = (sw.double() * gain).abs()
    fs = torch.where(fs == 0, torch.ones_like(fs), fs)
    w = codes.double() * torch.sign(gain)[:, None, None, None] * fs[:, None, None, None]
    step = (sx.float() * fs.float()).double()
    ref = F.conv2d(xq, w, torch.round(shift / step) * step, padding=1)
    assert (out.double() - ref).abs().max() < 1e-5
    assert torch.allclose(batchnorm_affine(bn)[0], gain)


class _ChainedResiduals(nn.Module):
    """Residual blocks with no activation after the sum (MobileNetV2's): the first sum feeds a convolution and the
    second addition, the second sum the pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.bn1(self.conv1(x))
        return self.head(x + self.bn2(self.conv2(x)))


@pytest.mark.parametrize("output_bits", [None, 4, 8])
def test_every_layer_reads_abits_and_only_elementwise_inputs_take_output_bits(output_bits):
    """The default keeps the sites that only additions read at 8 bits and every layer's input at abits, the first
    sum included (a convolution reads it); ``output_bits=4`` puts those sites at 4 bits too."""
    q = quantize_model(_ChainedResiduals().eval(), QuantConfig(wbits=4, abits=4, output_bits=output_bits))
    layers = [m for m in q.modules() if isinstance(m, QuantConv2d | QuantLinear)]
    assert [m.input_site.spec.bits for m in layers] == [8, 4, 4, 4]  # the image at input_bits
    read = {id(m.input_site) for m in layers}
    elementwise = [aq.spec.bits for _, aq in act_quantizers(q) if id(aq) not in read]
    assert sorted(elementwise) == [output_bits or 8] * 3  # bn1, bn2 and the second sum (pooled)
    assert q.bn1.output_quantizer.spec.bits == q.bn2.output_quantizer.spec.bits == (output_bits or 8)


def test_output_bits_sets_the_sites_that_feed_additions_and_overrides_still_win():
    """quant.output_bits: the inputs of residual additions at their own bit-width, every other site at abits."""
    q = quantize_model(create_model(MODEL), QuantConfig(wbits=4, abits=4, output_bits=8,
                                                        overrides={"layer1.0.bn2": {"abits": 6}}))  # fmt: skip
    bits = {name: aq.spec.bits for name, aq in act_quantizers(q)}
    outputs = {n: b for n, b in bits.items() if n.endswith("bn2.output_quantizer")}
    assert len(outputs) == 9 and outputs.pop("layer1.0.bn2.output_quantizer") == 6
    assert set(outputs.values()) == {8}
    others = {n: b for n, b in bits.items() if "output_quantizer" not in n and n != "conv1.input_quantizer"}
    assert set(others.values()) == {4} and bits["conv1.input_quantizer"] == 8  # input_bits
    with pytest.raises(DFQError, match="output_bits"):
        QuantConfig(output_bits=1)
