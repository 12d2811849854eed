"""CIFAR-10 ResNet-8 of MLPerf Tiny, the image-classification reference model of the benchmark.

MLPerf Tiny (Banbury et al., "MLPerf Tiny Benchmark", NeurIPS 2021 Datasets and
Benchmarks track; github.com/mlcommons/tiny) ships it as a Keras model
(``benchmark/training/image_classification/trained_models/pretrainedResnet.h5``,
Apache-2.0). It is in the zoo because it is the network that microcontroller int8
deployments are measured on, and it differs from the He et al. CIFAR ResNets in ways
a quantizer must cope with: biased convs before BatchNorm, 1x1 projection shortcuts
without BatchNorm, and Keras's asymmetric 'same' padding.

Key names are those of the converted state dict: ``stem.{conv,bn}``,
``b{1,2,3}c{1,2}.{conv,bn}``, ``b2sc``, ``b3sc``, ``fc``. Keras 'same' pads a 3x3 conv
(1, 1, 1, 1) at stride 1 but (0, 1, 0, 1), bottom/right only, at stride 2 on an even
input; that is an explicit zero ``F.pad`` before an unpadded conv (symmetric padding
drops the accuracy from 92% to 69%). The model takes raw 0..255 pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfq.models._registry import CIFAR10_MEAN, CIFAR10_STD, ModelInfo, register_model

__all__ = ["ResNet8MLPerf"]

_BN_EPS = 1e-3  # Keras's BatchNormalization default
_KERAS_STRIDE2_PAD = (0, 1, 0, 1)  # 'same', 3x3, stride 2, even input: one extra row/column at the end


class ConvBN(nn.Module):
    """3x3 conv with bias, then BatchNorm; Keras 'same' padding."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.pad = _KERAS_STRIDE2_PAD if stride == 2 else None
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride, 0 if stride == 2 else 1, bias=True)
        self.bn = nn.BatchNorm2d(out_ch, eps=_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return self.bn(self.conv(x))


class ResNet8MLPerf(nn.Module):
    """ResNet-8 (16/32/64 channels) for 32x32 inputs, as in MLPerf Tiny's ``resnet_v1_eembc``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvBN(3, 16)
        self.stem_relu = nn.ReLU()
        self.b1c1, self.b1c1_relu = ConvBN(16, 16), nn.ReLU()
        self.b1c2, self.b1_relu = ConvBN(16, 16), nn.ReLU()
        self.b2c1, self.b2c1_relu = ConvBN(16, 32, stride=2), nn.ReLU()
        self.b2c2, self.b2_relu = ConvBN(32, 32), nn.ReLU()
        self.b2sc = nn.Conv2d(16, 32, 1, 2, bias=True)  # projection, no BatchNorm ('same' adds no pad for 1x1)
        self.b3c1, self.b3c1_relu = ConvBN(32, 64, stride=2), nn.ReLU()
        self.b3c2, self.b3_relu = ConvBN(64, 64), nn.ReLU()
        self.b3sc = nn.Conv2d(32, 64, 1, 2, bias=True)
        self.pool = nn.AvgPool2d(8)  # Keras AveragePooling2D over the whole 8x8 map
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_relu(self.stem(x))  # (N, 16, 32, 32)
        x = self.b1_relu(x + self.b1c2(self.b1c1_relu(self.b1c1(x))))
        x = self.b2_relu(self.b2sc(x) + self.b2c2(self.b2c1_relu(self.b2c1(x))))  # (N, 32, 16, 16)
        x = self.b3_relu(self.b3sc(x) + self.b3c2(self.b3c1_relu(self.b3c1(x))))  # (N, 64, 8, 8)
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model(
    ModelInfo(
        name="resnet8_mlperf_cifar10",
        dataset="cifar10",
        num_classes=10,
        input_size=(3, 32, 32),
        # Raw pixels: dfq scales to [0, 1] first, so std 1/255 undoes that.
        mean=(0.0, 0.0, 0.0),
        std=(1 / 255,) * 3,
        pixel_mean=CIFAR10_MEAN,  # so synthetic images start around 125, where real pixels lie, not around 0
        pixel_std=CIFAR10_STD,
        weights={},  # published only as Keras .h5, which dfq cannot read: pass the converted .pt with --weights
        description=(
            "CIFAR-10 ResNet-8 of MLPerf Tiny (Banbury et al. 2021; github.com/mlcommons/tiny "
            "benchmark/training/image_classification/trained_models/pretrainedResnet.h5, Apache-2.0); "
            "published as Keras .h5 only: load a converted PyTorch state dict with --weights"
        ),
    )
)
def resnet8_mlperf_cifar10(num_classes: int = 10) -> nn.Module:
    return ResNet8MLPerf(num_classes)
