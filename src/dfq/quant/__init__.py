"""Quantization primitives, quantizers, quantized layers and model conversion.

This package knows nothing about the training loop: the methods and :mod:`dfq.train` use it. Learned steps
and rounding (LSQ, AdaRound), shared by both, are in :mod:`dfq.quant.learning`.
"""

from dfq.quant.api import (
    PROTOCOLS,
    LayerOverride,
    QuantConfig,
    act_quantizers,
    calibrate,
    quant_disabled,
    quantize_model,
    set_act_mode,
    weight_quantizers,
)
from dfq.quant.functional import choose_qparams, dequantize_affine, fake_quantize, quantize_affine, round_ste
from dfq.quant.modules import QuantActivation, QuantBatchNorm2d, QuantConv2d, QuantLinear
from dfq.quant.quantizer import ActMode, ActQuantizer, WeightQuantizer
from dfq.quant.spec import Granularity, QuantSpec

__all__ = [
    "PROTOCOLS",
    "ActMode",
    "ActQuantizer",
    "Granularity",
    "LayerOverride",
    "QuantActivation",
    "QuantBatchNorm2d",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantSpec",
    "WeightQuantizer",
    "act_quantizers",
    "calibrate",
    "choose_qparams",
    "dequantize_affine",
    "fake_quantize",
    "quant_disabled",
    "quantize_affine",
    "quantize_model",
    "round_ste",
    "set_act_mode",
    "weight_quantizers",
]
