"""Functional pooling and concatenation (torchvision's MobileNetV2, Inception, DenseNet, GoogLeNet) export exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfq
from dfq.quant import QuantConfig, calibrate, quantize_model


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.c, self.bn_c = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn_a(self.a(x)))
        b = F.relu(self.bn_b(self.b(F.avg_pool2d(x, 3, stride=1, padding=1))))
        y = F.max_pool2d(torch.cat([a, b], 1), kernel_size=2, stride=2)
        y = F.relu(self.bn_c(self.c(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, (1, 1)), 1))


def _exports_exactly(model: nn.Module, batches: list[torch.Tensor], path, convs: int) -> None:
    """W8A8 deploy Q of ``model`` exports with ``convs`` QLinearConv, same predictions and at most 1 LSB per site."""
    q = quantize_model(model.eval(), QuantConfig(wbits=8, abits=8, protocol="deploy"))
    calibrate(q, [torch.randn(16, 3, 8, 8)])
    report = dfq.export_onnx(q, path, example_inputs=batches[0], verify=batches)
    assert report["integer_ops"].get("QLinearConv", 0) == convs
    assert report["verify"]["top1_agreement"] == 1.0
    assert max(s["max_lsb"] for s in report["verify"]["sites"]) <= 1


def test_functional_pools_and_cat_export_with_exact_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _Functional()
    _exports_exactly(model, [torch.randn(16, 3, 8, 8)], tmp_path / "f.onnx", convs=3)


class _Asserting(nn.Module):
    """timm's layers check ``torch._assert(x.ndim == 4, ...)`` inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected NCHW")
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_shape_asserts_are_checks_not_graph_nodes(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    q = quantize_model(_Asserting().eval(), QuantConfig(wbits=8, abits=8, protocol="deploy"))
    calibrate(q, [torch.randn(16, 3, 8, 8)])
    batches = [torch.randn(8, 3, 8, 8)]
    report = dfq.export_onnx(q, tmp_path / "a.onnx", example_inputs=batches[0], verify=batches)
    assert report["verify"]["top1_agreement"] == 1.0 and report["integer_ops"]["QLinearConv"] == 1


class _ShuffleUpsample(nn.Module):
    """ShuffleNet's split and channel shuffle (shapes from ``x.size()``), CSPNet's ``split``, HRNet's nearest
    upsampling into an addition, functional dropout, and VGG's adaptive pooling to a size larger than its input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.branch, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.low, self.bn2 = nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.fc = nn.Linear(8 * 7 * 7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        keep, work = x.chunk(2, dim=1)
        x = torch.cat((keep, F.relu(self.bn1(self.branch(work)))), dim=1)
        batch, channels, height, width = x.size()
        x = x.view(batch, 2, channels // 2, height, width)
        x = torch.transpose(x, 1, 2).contiguous().view(batch, -1, height, width)
        x = F.relu(x + self.up(self.bn2(self.low(x))))
        left, right = x.split([3, 5], dim=1)
        x = torch.cat((right, F.dropout(left, 0.2, training=self.training)), dim=1)
        return self.fc(torch.flatten(self.pool(x), 1))


def test_shuffle_split_upsample_and_adaptive_pooling_export_with_exact_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _ShuffleUpsample()
    batches = [torch.randn(16, 3, 8, 8), torch.randn(3, 3, 8, 8)]  # the batch stays dynamic
    _exports_exactly(model, batches, tmp_path / "s.onnx", convs=3)


class _ListBlock(nn.Module):
    """HRNet's pattern: a block taking a list of tensors (not traceable alone) that reuses one ReLU module."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)) for _ in range(2))
        self.act = nn.ReLU()

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        for i, conv in enumerate(self.convs):
            xs[i] = conv(xs[i])
        return [self.act(x) for x in xs]


class _TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(3, 4, 3, padding=1), _ListBlock(), nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.block([self.stem(x), self.stem(x) * 0.5])
        return self.fc((a + b).mean((2, 3)))


def test_a_reused_activation_in_an_untraceable_block_gets_one_site_per_use():
    q = quantize_model(_TwoBranches().eval(), QuantConfig(wbits=8, abits=8))
    sites = [n for n, m in q.named_modules() if type(m).__name__ == "QuantActivation"]
    assert len(sites) == 2, sites
