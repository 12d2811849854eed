"""Deploy-protocol sites that real zoo models need: dead channels (EfficientNet-Lite0) and projection shortcuts
without BatchNorm (MLPerf Tiny ResNet-8)."""

from __future__ import annotations

import pytest
import torch
from conftest import RESNET20_WEIGHTS, require_shared
from torch import nn

from dfq.export.api import export
from dfq.export.verify import verify
from dfq.models import create_model
from dfq.quant import QuantConfig, calibrate, quantize_affine, quantize_model
from dfq.quant.quantizer import STEP_FLOOR, ActQuantizer, WeightQuantizer
from dfq.quant.spec import Granularity, QuantSpec
from dfq.testing import ChainedSumsNet

pytest.importorskip("onnxruntime")
SHAPE = (3, 8, 8)
DEPLOY = QuantConfig(wbits=8, abits=8, protocol="deploy")


class DeadChannel(nn.Module):
    """Conv-BN-ReLU whose channel 0 is dead as in Lite0's checkpoint: weights ~1e-9, BatchNorm variance 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, eps=1e-3)
        self.relu = nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 5)
        with torch.no_grad():
            self.conv.weight[0] = torch.randn(3, 3, 3) * 3e-9
            self.bn.running_var[0], self.bn.running_mean[0], self.bn.bias[0] = 0.0, 0.0, 2.5

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


class TinyWeightLargeBias(nn.Module):
    """Channel 0 with weights ~1e-5 but a bias of 100 (with ``bn``: a gain of 1e-6 and a shift of 50), as cross-layer
    equalization leaves some of Lite0's channels: on its own weight step the bias needs a code beyond int32."""

    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=not bn)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.relu, self.pool, self.fc = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Linear(4, 5)
        with torch.no_grad():
            self.conv.weight.mul_(0.1)
            if bn:
                self.bn.weight[0], self.bn.bias[0] = 1e-6, 50.0
            else:
                self.conv.weight[0].mul_(1e-4)
                self.conv.bias[0] = 100.0

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


class ProjectionShortcut(nn.Module):
    """ResNet-8's block: a 1x1 strided conv with bias and no BatchNorm added to a conv-BN branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.sc, self.relu2 = nn.Conv2d(3, 8, 1, 2), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 5)

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.pool(self.relu2(self.sc(x) + y)), 1))


def _calibrated(model: nn.Module, config: QuantConfig = DEPLOY) -> tuple[nn.Module, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    q = quantize_model(model.eval(), config)
    calibrate(q, [torch.randn(8, *SHAPE, generator=g)])
    return q.eval(), [torch.randn(8, *SHAPE, generator=g) for _ in range(2)]


def test_step_floor_is_relative_to_the_largest_channel_step():
    w = torch.tensor([[1.0, -0.5], [1e-6, 0.0], [-2e-3, 1e-3]])
    scale = WeightQuantizer(QuantSpec(8, True, Granularity.PER_CHANNEL, deploy=True)).qparams(w)[0].flatten()
    torch.testing.assert_close(scale, torch.tensor([1 / 127, STEP_FLOOR / 127, 2e-3 / 127]))


def test_dead_channel_exports_with_zero_codes_and_exact_parity(tmp_path):
    torch.manual_seed(0)
    q, batches = _calibrated(DeadChannel())
    codes = quantize_affine(q.conv.weight, *q.conv.weight_quantizer.qparams(q.conv.weight), divide=True)
    assert codes[0].abs().max() == 0 and codes[1:].abs().max() == 127
    result = export(q, tmp_path / "m.onnx", {"input_size": list(SHAPE)}, verify_batches=batches)
    assert result["integer_ops"]["QLinearConv"] == 1 and not result["float_ops"]
    parity = result["verify"]
    assert parity["top1_agreement"] == 1.0 and parity["logits_max_abs_error"] < 1e-5
    assert all(s["max_lsb"] == 0 for s in parity["sites"]), parity["sites"]


def test_step_floor_never_binds_on_resnet20():
    """Deploy-protocol ResNet-20 results are those from before the floor: every channel is far above it."""
    require_shared(RESNET20_WEIGHTS)
    model = create_model("resnet20a_cifar10", weights=RESNET20_WEIGHTS)
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            top = m.weight.detach().abs().flatten(1).amax(1)
            assert top.min() / top.max() > 8 * STEP_FLOOR


@pytest.mark.parametrize("bn", [False, True], ids=["bias", "batchnorm"])
def test_weight_step_rises_until_the_bias_fits_int32_and_the_export_stays_exact(tmp_path, bn):
    torch.manual_seed(0)
    q, batches = _calibrated(TinyWeightLargeBias(bn))
    wq, w = q.conv.weight_quantizer, q.conv.weight
    own, step = wq.minmax_qparams(w)[0].flatten(), wq.qparams(w)[0].flatten()
    floor = q.conv.bias_step_floor()
    assert step[0] > own[0] and torch.isclose(step[0].double(), floor[0].float().double())  # raised to the floor
    torch.testing.assert_close(step[1:], own[1:], rtol=0, atol=0)  # the other channels keep their own step
    result = export(q, tmp_path / "m.onnx", {"input_size": list(SHAPE)}, verify_batches=batches)
    assert result["integer_ops"]["QLinearConv"] == 1 and not result["float_ops"]
    parity = result["verify"]
    assert parity["top1_agreement"] == 1.0 and all(s["max_lsb"] <= 1 for s in parity["sites"]), parity["sites"]


def test_bias_step_floor_never_binds_on_resnet20():
    """Deploy-protocol ResNet-20 keeps its own weight steps: every bias fits int32 with room to spare."""
    require_shared(RESNET20_WEIGHTS)
    q = quantize_model(create_model("resnet20a_cifar10", weights=RESNET20_WEIGHTS).eval(), DEPLOY)
    calibrate(q, [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))])
    layers = [m for m in q.eval().modules() if hasattr(m, "bias_step_floor")]
    assert len(layers) == 20 and all(m.bias_step_floor() is not None for m in layers)  # 19 convolutions, 1 linear
    for m in layers:
        assert (m.weight_quantizer.minmax_qparams(m.weight)[0].flatten() > 8 * m.bias_step_floor()).all()


def test_projection_shortcut_gets_an_output_site_and_runs_on_integer_kernels(tmp_path):
    torch.manual_seed(0)
    q, batches = _calibrated(ProjectionShortcut())
    assert q.sc.output_quantizer is not None and q.conv2.output_quantizer is None  # bn2 carries conv2's site
    assert q.bn2.output_quantizer is not None
    result = export(q, tmp_path / "m.onnx", {"input_size": list(SHAPE)}, verify_batches=batches)
    assert result["integer_ops"]["QLinearConv"] == 3 and result["integer_ops"]["QLinearAdd"] == 1
    assert not result["float_ops"], result["float_ops"]
    sites = {s["site"]: s for s in result["verify"]["sites"]}
    assert "sc.output_quantizer" in sites
    assert all(s["mismatch"] == 0 for s in sites.values()), sites


def test_float_ops_count_onnxruntimes_fused_convs(tmp_path):
    """Without residual sites the shortcut runs in float, fused with its Add (ONNX Runtime's FusedConv)."""
    torch.manual_seed(0)
    q, batches = _calibrated(ProjectionShortcut(), QuantConfig(wbits=8, abits=8, protocol="deploy",
                                                                quantize_residual=False))  # fmt: skip
    assert q.sc.output_quantizer is None
    result = export(q, tmp_path / "m.onnx", {"input_size": list(SHAPE)})
    assert sum(n for op, n in result["float_ops"].items() if "Conv" in op) >= 1, result
    assert verify(q, SHAPE, batches)["top1_agreement"] == 1.0


def test_chained_residual_sums_get_a_grid_and_every_addition_runs_on_integer_kernels(tmp_path):
    torch.manual_seed(0)
    config = QuantConfig(wbits=8, abits=8, protocol="deploy", overrides={"blocks.1.add_out": {"abits": 6}})
    q, batches = _calibrated(ChainedSumsNet(), config)
    sums = {n: m for n, m in q.named_modules() if n.endswith("add_out")}
    assert sorted(sums) == ["blocks.0.add_out", "blocks.1.add_out", "blocks.2.add_out"]  # the last: pooling reads it
    assert (sums["blocks.0.add_out"].spec.bits, sums["blocks.1.add_out"].spec.bits) == (8, 6)
    assert q.blocks[1].conv.input_site is sums["blocks.0.add_out"]  # the next block's layer shares the sum's grid
    result = export(q, tmp_path / "m.onnx", {"input_size": list(SHAPE)}, verify_batches=batches)
    assert result["integer_ops"]["QLinearAdd"] == 3, result
    assert "Add" not in result["float_ops"], result["float_ops"]
    sites = {s["site"]: s for s in result["verify"]["sites"]}
    assert {"blocks.0.add_out", "blocks.1.add_out"} <= set(sites)
    assert all(s["mismatch"] == 0 for s in sites.values()), sites
    assert result["verify"]["top1_agreement"] == 1.0


class GhostSE(nn.Module):
    """GhostNet's concatenation sliced into a residual addition, then a squeeze-excitation whose input (a BatchNorm
    output) is read by a pooling and a product."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0, self.relu = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.primary, self.bn1 = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.cheap, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4)
        self.dw, self.bn3 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.se_reduce, self.se_expand, self.gate = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1, bias=False), nn.Sigmoid()
        self.project, self.pool, self.fc = nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 5)

    def forward(self, x):
        s = self.relu(self.bn0(self.stem(x)))
        a = self.bn1(self.primary(s))
        y = torch.cat([a, self.bn2(self.cheap(a))], 1)[:, :8] + s
        z = self.bn3(self.dw(y))
        z = z * self.gate(self.se_expand(self.relu(self.se_reduce(self.pool(z)))))
        return self.fc(torch.flatten(self.pool(self.project(z)), 1))


def test_concatenations_and_shared_layer_outputs_get_grids_so_nothing_runs_in_float(tmp_path):
    torch.manual_seed(0)
    q, batches = _calibrated(GhostSE())
    assert isinstance(q.cat_out, ActQuantizer)  # the slice of the concatenation feeds an addition
    assert q.bn3.output_quantizer is not None  # read by the pooling and the product
    result = export(q, tmp_path / "m.onnx", {"input_size": list(SHAPE)}, verify_batches=batches)
    assert not result["float_ops"], result["float_ops"]
    ops = result["integer_ops"]
    assert (ops["QLinearConcat"], ops["QLinearAdd"], ops["QLinearMul"], ops["QLinearConv"]) == (1, 1, 1, 7), ops
    assert result["verify"]["top1_agreement"] == 1.0
    assert all(s["mismatch"] == 0 for s in result["verify"]["sites"])
