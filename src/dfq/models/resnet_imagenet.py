"""ImageNet ResNets with torchvision's key names and one ReLU module per activation site.

Native names are torchvision's (``conv1``, ``bn1``, ``layer{1-4}.{i}.conv1``,
``layer{i}.0.downsample.{0,1}``, ``fc``), so torchvision checkpoints load
as they are; pytorchcv checkpoints go through the ``pytorchcv_resnet`` layout.

Two ResNet-50s exist and their checkpoints have the same keys and shapes, so a
file for one loads silently into the other: ``resnet50`` is the original ResNet
(stride in the first 1x1 conv of a bottleneck), which pytorchcv's ``resnet50``
and the DFQ papers use; ``resnet50b`` has the stride in the 3x3 conv, like
pytorchcv's ``resnet50b`` and torchvision's ``resnet50`` ("ResNet v1.5").
"""

from __future__ import annotations

import re

import torch
from torch import nn

from dfq.hub import RemoteFile
from dfq.models._registry import (
    StateDict,
    WeightSource,
    imagenet_info,
    register_layout,
    register_model,
)
from dfq.models.resnet_cifar_pcv import pytorchcv_source

__all__ = ["ResNet"]

_TORCHVISION = "https://download.pytorch.org/models/"


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, stride_in_1x1: bool) -> None:
        super().__init__()
        del stride_in_1x1  # a basic block has a single place for the stride
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_planes, planes, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, stride_in_1x1: bool) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, stride if stride_in_1x1 else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1 if stride_in_1x1 else stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample = _downsample(in_planes, out_planes, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.downsample(x))


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """1x1 conv + BN projection where the shape changes, else identity."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class ResNet(nn.Module):
    """ResNet for 224x224 ImageNet inputs (any size works thanks to the adaptive pool)."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_planes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True), start=1):
            blocks = []
            for j in range(n):
                stride = 2 if j == 0 and i > 1 else 1
                blocks.append(block(in_planes, planes, stride, stride_in_1x1))
                in_planes = planes * block.expansion
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


_PCV_STEM = re.compile(r"features\.init_block\.conv\.(conv|bn)\.(\w+)")
_PCV_BODY = re.compile(r"features\.stage(\d+)\.unit(\d+)\.body\.conv(\d)\.(conv|bn)\.(\w+)")
_PCV_SHORTCUT = re.compile(r"features\.stage(\d+)\.unit(\d+)\.identity_conv\.(conv|bn)\.(\w+)")
_PCV_HEAD = re.compile(r"output\.(weight|bias)")


def _pytorchcv_resnet_key(key: str) -> str:
    if m := _PCV_STEM.fullmatch(key):
        return f"{'conv1' if m[1] == 'conv' else 'bn1'}.{m[2]}"
    if m := _PCV_BODY.fullmatch(key):
        return f"layer{m[1]}.{int(m[2]) - 1}.{m[4]}{m[3]}.{m[5]}"
    if m := _PCV_SHORTCUT.fullmatch(key):
        return f"layer{m[1]}.{int(m[2]) - 1}.downsample.{0 if m[3] == 'conv' else 1}.{m[4]}"
    if m := _PCV_HEAD.fullmatch(key):
        return f"fc.{m[1]}"
    raise KeyError(f"not a pytorchcv ImageNet ResNet key: {key}")


@register_layout("pytorchcv_resnet")
def pytorchcv_resnet(state: StateDict) -> StateDict:
    """pytorchcv ``ResNet`` keys (``features.stage1.unit1.body.conv1.conv.weight``...) to torchvision's."""
    return {_pytorchcv_resnet_key(k): v for k, v in state.items()}


def _torchvision_source(fname: str, top1: float) -> WeightSource:
    sha256_prefix = fname.rsplit("-", 1)[1].removesuffix(".pth")
    return WeightSource(
        RemoteFile((_TORCHVISION + fname,), fname, sha256=sha256_prefix), "native", "BSD-3-Clause", top1
    )


@register_model(
    imagenet_info(
        "resnet18",
        {
            # Top-1 as reported by the DFQ papers that use these weights.
            "pytorchcv": pytorchcv_source(
                "resnet18", "0982", "0126861b4cd7f7b14196b1e01827da688f8bab6d", "v0.0.153", "pytorchcv_resnet", 71.47
            ),
            "torchvision": _torchvision_source("resnet18-f37072fd.pth", 69.758),
        },
        "ImageNet ResNet-18 (pytorchcv weights as in the DFQ papers, or torchvision's)",
    )
)
def resnet18(num_classes: int = 1000) -> nn.Module:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


@register_model(
    imagenet_info(
        "resnet50",
        {
            "pytorchcv": pytorchcv_source(
                "resnet50", "0633", "b00d1c8e52aa7a2badc705b1545aaf6ccece6ce9", "v0.0.329", "pytorchcv_resnet", 77.73
            ),
        },
        "ImageNet ResNet-50, stride in the 1x1 conv (pytorchcv resnet50, as in the DFQ papers)",
    )
)
def resnet50(num_classes: int = 1000) -> nn.Module:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, stride_in_1x1=True)


@register_model(
    imagenet_info(
        "resnet50b",
        {
            "torchvision": _torchvision_source("resnet50-0676ba61.pth", 76.13),
            "pytorchcv": pytorchcv_source(
                "resnet50b", "0638", "8a5473ef985d65076a3758117ad5700d726bd952", "v0.0.308", "pytorchcv_resnet", None
            ),
        },
        "ImageNet ResNet-50 v1.5, stride in the 3x3 conv (torchvision resnet50, pytorchcv resnet50b)",
    )
)
def resnet50b(num_classes: int = 1000) -> nn.Module:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, stride_in_1x1=False)
