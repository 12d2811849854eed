"""Quantized layers built from float ones with ``from_float``.

``QuantConv2d`` / ``QuantLinear`` fake-quantize their weight on every forward
(the float "latent" weight is what the optimizer updates). ``QuantReLU`` is the
activation site of the papers' protocol: the float ReLU/ReLU6 followed by an
activation quantizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfq.quant.quantizer import ActQuantizer, WeightQuantizer

__all__ = ["QuantConv2d", "QuantLinear", "QuantReLU"]


class QuantConv2d(nn.Conv2d):
    def __init__(self, *args, weight_quantizer: WeightQuantizer, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer = weight_quantizer

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer: WeightQuantizer) -> QuantConv2d:
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            weight_quantizer=weight_quantizer,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        q.load_state_dict(conv.state_dict())
        q.train(conv.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QuantLinear(nn.Linear):
    def __init__(self, *args, weight_quantizer: WeightQuantizer, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer = weight_quantizer

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer: WeightQuantizer) -> QuantLinear:
        q = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            weight_quantizer=weight_quantizer,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        q.load_state_dict(linear.state_dict())
        q.train(linear.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


class QuantReLU(nn.Module):
    """``act_quantizer(act(x))`` where ``act`` is the original ReLU or ReLU6 module."""

    def __init__(self, act: nn.Module, act_quantizer: ActQuantizer) -> None:
        super().__init__()
        self.act = act
        self.act_quantizer = act_quantizer

    @classmethod
    def from_float(cls, act: nn.Module, act_quantizer: ActQuantizer) -> QuantReLU:
        return cls(act, act_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_quantizer(self.act(x))
