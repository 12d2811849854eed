"""Quantized layers built from float ones with ``from_float``.

``QuantConv2d`` / ``QuantLinear`` fake-quantize their weight on every forward
(the float "latent" weight is what the optimizer updates). ``QuantActivation`` is the
activation site of the papers' protocol: the float activation (ReLU, SiLU, a
Sigmoid gate, ...) followed by an activation quantizer. The deploy protocol adds two kinds of sites: an input
quantizer on a layer whose input is not already on a grid (the image, a pooled
feature) and an output quantizer on a layer that feeds a residual addition
(``QuantBatchNorm2d``, or the Conv2d/Linear itself when no BatchNorm follows it, as
in a 1x1 projection shortcut), so an integer runtime sees integers everywhere.

An integer runtime also adds the bias on the accumulator's grid: int32 codes at
step ``s_x * s_w`` (``s_x * |g * s_w|`` once BatchNorm's gain ``g`` is folded in).
Under the deploy protocol each layer knows which quantizer produced its input,
and the layer (or its BatchNorm) adds the bias on that grid with a
straight-through correction, so Q computes what the exported model computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfq.quant.quantizer import ActMode, ActQuantizer, WeightQuantizer
from dfq.quant.spec import Granularity

__all__ = [
    "QuantActivation",
    "QuantBatchNorm2d",
    "QuantConv2d",
    "QuantLinear",
    "batchnorm_affine",
    "bias_grid",
    "folded_weight_scale",
]


# Bias codes stay within half of int32's range, so that float32 steps and rounding cannot push them over.
_BIAS_CODE_LIMIT = 2.0**30


def batchnorm_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm with fixed statistics as ``gain * x + shift`` (float64, per channel)."""
    std = torch.sqrt(bn.running_var.detach().double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(std)
    beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(std)
    gain = gamma / std
    return gain, beta - gain * bn.running_mean.detach().double()


def folded_weight_scale(w_scale: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Per-channel weight step after folding a gain: ``|g * s_w|``, 1 where it is 0 (a dead channel)."""
    s = (w_scale.double() * gain).abs()
    return torch.where(s == 0, torch.ones_like(s), s)


def bias_grid(bias: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 codes (as float64) and float32 step of a bias added to an integer accumulator.

    The step is computed in float32 as runtimes compute ``s_x * s_w``.
    """
    step = x_scale.float() * w_scale.float()
    return torch.round(bias.double() / step.double()), step


def _with_quantizer_state(layer: nn.Module, weight_quantizer: WeightQuantizer) -> dict[str, torch.Tensor]:
    """The float layer's state plus its new weight quantizer's (a stored grid has buffers)."""
    return {**layer.state_dict(), **{f"weight_quantizer.{k}": v for k, v in weight_quantizer.state_dict().items()}}


def _site_scale(site: ActQuantizer | None) -> torch.Tensor | None:
    """The step of an activation quantizer that is quantizing, else ``None``."""
    if site is None or site.spec.is_noop or site.get_mode() is ActMode.DISABLED or int(site.num_updates) == 0:
        return None
    return site.qparams()[0]


class _IntegerLayerMixin:
    """Deploy-protocol state of a Conv2d/Linear: optional input and output quantizers, and where its input
    comes from (the output quantizer is a residual site on a layer that no BatchNorm follows).

    ``input_site`` is a plain reference (not a submodule) to the activation quantizer that
    produced the input; ``bn_follows`` says a BatchNorm folds into this layer and adds the
    bias itself.
    """

    input_quantizer: ActQuantizer | None
    output_quantizer: ActQuantizer | None
    weight_quantizer: WeightQuantizer
    input_site: ActQuantizer | None = None
    bn_follows: bool = False
    folded_bn: QuantBatchNorm2d | None = None

    def set_input_site(self, site: ActQuantizer | None, bn_follows: bool) -> None:
        object.__setattr__(self, "input_site", site)
        object.__setattr__(self, "bn_follows", bn_follows)
        self.weight_quantizer.set_step_floor(self.bias_step_floor)

    def bias_step_floor(self) -> torch.Tensor | None:
        """The smallest weight step per output channel at which the (folded) bias fits in int32 on the accumulator
        grid ``s_x * |g * s_w|``, with half the range to spare; ``None`` when the input is not on a grid.

        A channel whose weights are almost 0 but whose bias is not (EfficientNet-Lite0 after cross-layer
        equalization: weights ~1e-7, bias -1.27) would otherwise need a bias code beyond int32 (4.1e9 there).
        ONNX Runtime's quantization tool raises such a channel's weight step the same way; the weights then round
        to few codes, which changes the channel by less than their ~1e-7 values.
        """
        x_scale = _site_scale(self.input_site)
        bn = self.folded_bn
        if x_scale is None or (self.bn_follows and (bn is None or bn.training or bn.running_var is None)):
            return None
        if self.bn_follows:
            gain, shift = bn.folded_affine()
        elif self.bias is not None:
            shift = self.bias.detach().double()
            gain = torch.ones_like(shift)
        else:
            return None
        floor = shift.abs() / (x_scale.double() * gain.abs() * _BIAS_CODE_LIMIT)
        return torch.where(gain == 0, 0.0, floor)  # a zero gain folds to step 1 (folded_weight_scale)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _quantize_output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def weight_step(self) -> torch.Tensor | None:
        """Per-output-channel weight step (float64), or ``None`` when weights are not symmetric-quantized."""
        wq = self.weight_quantizer
        if wq.spec.is_noop or not wq.spec.symmetric:
            return None
        scale = wq.qparams(self.weight)[0].double().flatten()
        return scale.expand(self.weight.shape[0]) if wq.spec.granularity is Granularity.PER_TENSOR else scale

    def accumulator_grid(self, gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(s_x, |g * s_w|)`` when both input and weights are integer, else ``None``."""
        x_scale, w_scale = _site_scale(self.input_site), self.weight_step()
        if x_scale is None or w_scale is None:
            return None
        return x_scale, folded_weight_scale(w_scale, gain)

    def _grid_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        if bias is None or self.bn_follows:
            return bias
        grid = self.accumulator_grid(torch.ones(bias.shape[0], dtype=torch.float64, device=bias.device))
        if grid is None:
            return bias
        codes, step = bias_grid(bias, *grid)
        return bias + (codes * step - bias.double()).float().detach()


class QuantConv2d(_IntegerLayerMixin, nn.Conv2d):
    def __init__(self, *args, weight_quantizer: WeightQuantizer, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer = weight_quantizer
        self.register_module("input_quantizer", None)
        self.register_module("output_quantizer", None)

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
        q.load_state_dict(_with_quantizer_state(conv, weight_quantizer))
        q.train(conv.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quantize_input(x)
        y = self._conv_forward(x, self.weight_quantizer(self.weight), self._grid_bias(self.bias))
        return self._quantize_output(y)


class QuantLinear(_IntegerLayerMixin, nn.Linear):
    def __init__(self, *args, weight_quantizer: WeightQuantizer, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer = weight_quantizer
        self.register_module("input_quantizer", None)
        self.register_module("output_quantizer", None)

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
        q.load_state_dict(_with_quantizer_state(linear, weight_quantizer))
        q.train(linear.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quantize_input(x)
        return self._quantize_output(F.linear(x, self.weight_quantizer(self.weight), self._grid_bias(self.bias)))


class QuantBatchNorm2d(nn.BatchNorm2d):
    """Deploy-protocol BatchNorm: folds into the convolution before it at export.

    With fixed statistics it adds the folded bias on that convolution's accumulator
    grid, and with an ``output_quantizer`` it is a signed site before a residual
    addition. The state-dict keys of the BatchNorm are unchanged.
    """

    conv: QuantConv2d | None = None

    def __init__(self, num_features: int, *, output_quantizer: ActQuantizer | None = None, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.register_module("output_quantizer", output_quantizer)

    @classmethod
    def from_float(cls, bn: nn.BatchNorm2d, output_quantizer: ActQuantizer | None = None) -> QuantBatchNorm2d:
        q = cls(
            bn.num_features,
            output_quantizer=output_quantizer,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            device=bn.running_mean.device if bn.running_mean is not None else None,
        )
        own = {f"output_quantizer.{k}": v for k, v in (output_quantizer or nn.Module()).state_dict().items()}
        q.load_state_dict({**bn.state_dict(), **own})
        q.train(bn.training)
        return q

    def set_conv(self, conv: QuantConv2d) -> None:
        """The convolution this BatchNorm folds into (plain references both ways, not submodules)."""
        object.__setattr__(self, "conv", conv)
        object.__setattr__(conv, "folded_bn", self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.conv is not None and not self.training and self.running_var is not None:
            y = y + self._bias_correction().to(y.dtype)[:, None, None]
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def folded_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Gain and shift (float64, per channel) of this BatchNorm folded into its convolution, whose bias joins
        the shift."""
        gain, shift = batchnorm_affine(self)
        if self.conv is not None and self.conv.bias is not None:
            shift = shift + gain * self.conv.bias.detach().double()
        return gain, shift

    def _bias_correction(self) -> torch.Tensor:
        """Folded bias on the accumulator grid minus the float one (0 when the grid is not integer)."""
        gain, shift = self.folded_affine()
        grid = self.conv.accumulator_grid(gain)
        if grid is None:
            return torch.zeros_like(shift)
        codes, step = bias_grid(shift, *grid)
        return codes * step.double() - shift


class QuantActivation(nn.Module):
    """``act_quantizer(act(x))`` where ``act`` is the original activation module (ReLU, SiLU, Sigmoid, ...)."""

    def __init__(self, act: nn.Module, act_quantizer: ActQuantizer) -> None:
        super().__init__()
        self.act = act
        self.act_quantizer = act_quantizer

    @classmethod
    def from_float(cls, act: nn.Module, act_quantizer: ActQuantizer) -> QuantActivation:
        return cls(act, act_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_quantizer(self.act(x))
