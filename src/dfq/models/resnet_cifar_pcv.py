"""CIFAR ResNets with a 1x1-conv projection shortcut, as in pytorchcv's ``CIFARResNet``.

These are the full-precision teachers of GDFQ, Qimera, AdaSG and AdaDFQ. Module
names equal pytorchcv's, so its checkpoints load as the "native" layout:
``features.init_block.{conv,bn}``,
``features.stage{s}.unit{u}.body.conv{1,2}.{conv,bn}``,
``features.stage{s}.unit{u}.identity_conv.{conv,bn}`` and ``output``. Every ReLU
is its own module so that quantizers can be attached to each activation site.
"""

from __future__ import annotations

import torch
from torch import nn

from dfq.hub import RemoteFile
from dfq.models._registry import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    ModelInfo,
    WeightSource,
    register_model,
)

__all__ = ["CifarResNetPCV", "pytorchcv_source"]

_IMGCLSMOB = "https://github.com/osmr/imgclsmob/releases/download/"


def pytorchcv_source(name: str, error: str, sha1: str, tag: str, layout: str, top1: float | None) -> WeightSource:
    """A pytorchcv (imgclsmob) release: a zip holding ``{name}-{error}-{sha1[:8]}.pth``, whose sha1 is published."""
    pth = f"{name}-{error}-{sha1[:8]}.pth"
    remote = RemoteFile((f"{_IMGCLSMOB}{tag}/{pth}.zip",), pth, sha1=sha1, zip_member=pth)
    return WeightSource(remote, layout, "MIT", top1)


class ConvBlock(nn.Module):
    """Conv (no bias) + BN, then a ReLU only if ``relu``; named like pytorchcv's ``ConvBlock``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.activ = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activ(self.bn(self.conv(x)))


class ResBlock(nn.Module):
    """Residual branch: 3x3 conv-BN-ReLU, 3x3 conv-BN (the ReLU comes after the add)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBlock(in_ch, out_ch, 3, stride, relu=True)
        self.conv2 = ConvBlock(out_ch, out_ch, 3, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class ResUnit(nn.Module):
    """Basic unit; a 1x1 conv + BN projection (no activation) where the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.body = ResBlock(in_ch, out_ch, stride)
        self.identity_conv: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.identity_conv = ConvBlock(in_ch, out_ch, 1, stride, relu=False)
        self.activ = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activ(self.body(x) + self.identity_conv(x))


class CifarResNetPCV(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 3 stages of ``n`` units with 16/32/64 channels."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.features = nn.Sequential()
        self.features.add_module("init_block", ConvBlock(3, 16, 3, 1, relu=True))
        in_ch = 16
        for s, out_ch in enumerate((16, 32, 64), start=1):
            stage = nn.Sequential()
            for u in range(1, n + 1):
                stride = 2 if u == 1 and s > 1 else 1
                stage.add_module(f"unit{u}", ResUnit(in_ch, out_ch, stride))
                in_ch = out_ch
            self.features.add_module(f"stage{s}", stage)
        # pytorchcv uses AvgPool2d(8); identical on the 8x8 map of a 32x32 input.
        self.features.add_module("final_pool", nn.AdaptiveAvgPool2d(1))
        self.output = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.flatten(self.features(x), 1))


# (depth, dataset) -> pytorchcv store entry (error code, sha1, release tag); the code is top-1 error x 100.
_PUBLISHED = {
    (20, "cifar10"): ("0597", "9b0024ac4c2f374cde2c5052e0d0344a75871cdb", "v0.0.163"),
    (20, "cifar100"): ("2964", "a5322afed92fa96cb7b3453106f73cf38e316151", "v0.0.180"),
    (56, "cifar10"): ("0452", "628c42a26fe347b84060136212e018df2bb35e0f", "v0.0.163"),
    (56, "cifar100"): ("2488", "d65f53b10ad5d124698e728432844c65261c3107", "v0.0.181"),
}
_DATASETS = {"cifar10": (10, CIFAR10_MEAN, CIFAR10_STD), "cifar100": (100, CIFAR100_MEAN, CIFAR100_STD)}


def _register(depth: int, dataset: str) -> None:
    error, sha1, tag = _PUBLISHED[depth, dataset]
    name = f"resnet{depth}_{dataset}"
    num_classes, mean, std = _DATASETS[dataset]
    top1 = round(100 - int(error) / 100, 2)
    info = ModelInfo(
        name=name,
        dataset=dataset,
        num_classes=num_classes,
        input_size=(3, 32, 32),
        mean=mean,
        std=std,
        weights={"pytorchcv": pytorchcv_source(name, error, sha1, tag, "native", top1)},
        description=f"{dataset.upper()} ResNet-{depth}, 1x1-conv shortcut (pytorchcv; the DFQ papers' teacher)",
    )

    @register_model(info)
    def _factory(num_classes: int = num_classes) -> nn.Module:
        return CifarResNetPCV(depth, num_classes)


for _depth, _dataset in _PUBLISHED:
    _register(_depth, _dataset)
