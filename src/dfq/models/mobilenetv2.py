"""ImageNet MobileNetV2 (width 1.0) with torchvision's key names and one ReLU6 module per site.

Native names are torchvision's ``mobilenet_v2`` keys (``features.0.0.weight``,
``features.{i}.conv.{j}...``, ``features.18.0.weight``, ``classifier.1.weight``);
pytorchcv checkpoints go through the ``pytorchcv_mobilenetv2`` layout.

Two variants exist and differ only in the first inverted-residual block (expansion
ratio 1): ``mobilenetv2`` is pytorchcv's ``mobilenetv2_w1``, the model of the DFQ
papers, which keeps a 1x1 conv-BN-ReLU6 (32->32) in front of its depthwise conv;
``mobilenetv2b`` drops it, like torchvision's ``mobilenet_v2`` and pytorchcv's
``mobilenetv2b_w1``. A checkpoint of one does not fit the other.
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

__all__ = ["MobileNetV2"]

# (expansion t, output channels c, units n, first stride s), as in the paper's Table 2.
_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn_relu6(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """[1x1 expand conv-BN-ReLU6,] 3x3 depthwise conv-BN-ReLU6, 1x1 linear conv-BN; residual if shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int, expand_conv: bool) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        layers: list[nn.Module] = [_conv_bn_relu6(in_ch, hidden, kernel=1)] if expand_conv else []
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 1.0 for 224x224 inputs (any size works thanks to the adaptive pool).

    Args:
        num_classes: classifier outputs.
        first_expand_conv: keep the 1x1 conv of the first block although its expansion is 1 (pytorchcv).
        dropout: dropout before the classifier (torchvision trains with 0.2, pytorchcv has none).
    """

    def __init__(self, num_classes: int = 1000, first_expand_conv: bool = False, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu6(3, 32, stride=2)]
        in_ch = 32
        for t, c, n, s in _SETTING:
            for i in range(n):
                expand_conv = t != 1 or first_expand_conv
                layers.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t, expand_conv))
                in_ch = c
        layers.append(_conv_bn_relu6(in_ch, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


_PCV_INIT = re.compile(r"features\.init_block\.(conv|bn)\.(\w+)")
_PCV_UNIT = re.compile(r"features\.stage(\d+)\.unit(\d+)\.conv([123])\.(conv|bn)\.(\w+)")
_PCV_FINAL = re.compile(r"features\.final_block\.(conv|bn)\.(\w+)")


@register_layout("pytorchcv_mobilenetv2")
def pytorchcv_mobilenetv2(state: StateDict) -> StateDict:
    """pytorchcv ``MobileNetV2`` keys to torchvision's; its bias-free 1x1-conv classifier becomes the Linear."""
    units = sorted({(int(m[1]), int(m[2])) for k in state if (m := _PCV_UNIT.fullmatch(k))})
    index = {unit: i for i, unit in enumerate(units, start=1)}  # features.0 is the stem
    out: StateDict = {}
    for key, value in state.items():
        if m := _PCV_INIT.fullmatch(key):
            out[f"features.0.{0 if m[1] == 'conv' else 1}.{m[2]}"] = value
        elif m := _PCV_FINAL.fullmatch(key):
            out[f"features.{len(units) + 1}.{0 if m[1] == 'conv' else 1}.{m[2]}"] = value
        elif m := _PCV_UNIT.fullmatch(key):
            stage, unit, conv, part, attr = int(m[1]), int(m[2]), int(m[3]), m[4], m[5]
            # Position in the torchvision block's Sequential: shifted by one where there is no expand conv.
            pos = conv - 1 - (f"features.stage{stage}.unit{unit}.conv1.conv.weight" not in state)
            sub = f"{pos}.{int(part == 'bn')}" if conv < 3 else str(pos + (part == "bn"))
            out[f"features.{index[stage, unit]}.conv.{sub}.{attr}"] = value
        elif key == "output.weight":
            if value.shape[2:] != (1, 1):
                raise ValueError(f"output.weight: expected a 1x1 conv, got shape {tuple(value.shape)}")
            out["classifier.1.weight"] = value.flatten(1)
        elif key == "output.bias":
            out["classifier.1.bias"] = value
        else:
            raise KeyError(f"not a pytorchcv MobileNetV2 key: {key}")
    weight = out["classifier.1.weight"]
    out.setdefault("classifier.1.bias", weight.new_zeros(weight.shape[0]))
    return out


@register_model(
    imagenet_info(
        "mobilenetv2",
        {
            # Top-1 as reported by the DFQ papers that use these weights.
            "pytorchcv": pytorchcv_source(
                "mobilenetv2_w1",
                "0887",
                "13a021bca5b679b76156829743f7182da42e8bb6",
                "v0.0.213",
                "pytorchcv_mobilenetv2",
                73.03,
            ),
        },
        "ImageNet MobileNetV2 1.0 as in pytorchcv mobilenetv2_w1 (the DFQ papers' model)",
    )
)
def mobilenetv2(num_classes: int = 1000) -> nn.Module:
    return MobileNetV2(num_classes, first_expand_conv=True, dropout=0.0)


@register_model(
    imagenet_info(
        "mobilenetv2b",
        {
            "torchvision": WeightSource(
                RemoteFile(
                    ("https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",),
                    "mobilenet_v2-b0353104.pth",
                    sha256="b0353104",
                ),
                "native",
                "BSD-3-Clause",
                71.878,
            ),
            "pytorchcv": pytorchcv_source(
                "mobilenetv2b_w1",
                "0912",
                "2bcab1d0cd3be4eb270d65e390ff7c9776e38a04",
                "v0.0.483",
                "pytorchcv_mobilenetv2",
                None,
            ),
        },
        "ImageNet MobileNetV2 1.0 without the first block's expand conv (torchvision mobilenet_v2)",
    )
)
def mobilenetv2b(num_classes: int = 1000) -> nn.Module:
    return MobileNetV2(num_classes, first_expand_conv=False, dropout=0.2)
