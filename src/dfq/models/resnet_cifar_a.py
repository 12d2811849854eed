"""CIFAR ResNets with the option-A (parameter-free) shortcut of He et al. (2016).

Key names match the akamaster/pytorch_resnet_cifar10 checkpoints (after the
``module.`` prefix is stripped): ``conv1``, ``bn1``,
``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``linear``. Every ReLU is its own
module so that quantizers can be attached to each activation site.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfq.hub import RemoteFile
from dfq.models._registry import IMAGENET_MEAN, IMAGENET_STD, ModelInfo, WeightSource, register_model

__all__ = ["CifarResNetA"]

_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


class PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad ``pad`` channels on each side."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlockA(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNetA(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 3 stages of ``n`` blocks with 16/32/64 channels."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlockA(in_planes, planes, stride)]
        blocks += [BasicBlockA(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (N, 16, 32, 32)
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64, 8, 8)
        return self.linear(torch.flatten(self.pool(x), 1))


# (depth, sha256 prefix from the published file name, published top-1 on the full CIFAR-10 test set)
_PUBLISHED = {
    20: ("12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8", 91.73),
    32: ("d509ac18", 92.63),
    44: ("014dd654", 93.10),
    56: ("4bfd9763", 93.39),
    110: ("1d1ed7c2", 93.68),
}


def _register(depth: int) -> None:
    sha, top1 = _PUBLISHED[depth]
    fname = f"resnet{depth}-{sha[:8]}.th"
    source = WeightSource(RemoteFile((_AKAMASTER + fname,), fname, sha256=sha), "native", "BSD-2-Clause", top1)
    info = ModelInfo(
        name=f"resnet{depth}a_cifar10",
        dataset="cifar10",
        num_classes=10,
        input_size=(3, 32, 32),
        # akamaster trained with the ImageNet constants, not the CIFAR ones.
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights={"akamaster": source},
        description=f"CIFAR-10 ResNet-{depth}, option-A shortcut (akamaster/pytorch_resnet_cifar10)",
    )

    @register_model(info)
    def _factory(num_classes: int = 10) -> nn.Module:
        return CifarResNetA(depth, num_classes)


for _depth in _PUBLISHED:
    _register(_depth)
