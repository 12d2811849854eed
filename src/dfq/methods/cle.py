"""DFQ: data-free quantization through weight equalization and bias correction.

Nagel, van Baalen, Blankevoort, Welling, "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019. Per-tensor weight grids lose most of their precision when the output channels of a
layer have very different ranges (common after BatchNorm folding, worst in depthwise convs). The paper's
recipe fixes that with function-preserving rewrites of the float model and removes the quantization's
average output shift analytically, from the weights and the BatchNorm statistics alone:

1. Fold every BatchNorm into the convolution before it (on a copy of P; the BN module becomes Identity),
   keeping each BN's ``(beta, |gamma|)``: the mean and std of the folded layer's pre-activation.
2. Cross-layer equalization (Sec. 4.1): rescale the output channels of W1 and the input channels of W2 for
   each pair W1 -> ReLU (or nothing) -> W2 so that both ranges become ``sqrt(r1 r2)``, iterated over chains.
   Pairs around residual additions/concats and pairs joined by ReLU6 are skipped (see
   :func:`dfq.quant.equalize.find_pairs`; the paper instead turns MobileNetV2's ReLU6 into ReLU, which
   changes the float model).
3. High-bias absorption (Sec. 4.2): move ``c = max(0, beta - 3|gamma|)`` from b1 into b2 through the ReLU.
4. Quantize the rewritten model with the user's :class:`QuantConfig`.
5. Bias correction (Sec. 4.3): ``b <- b - (W_q - W) E[x]``, with ``E[x]`` the clipped-normal mean of the
   preceding BN(+ReLU); layers whose input is not a BN(+ReLU/ReLU6) output (the image, a residual sum,
   a max-pool) are not corrected: their input distribution is unknown without data.
6. Calibrate the activation ranges on a short ZeroQ-style distillation from P (the paper sets ranges from
   the BN statistics, e.g. beta + 6|gamma|, but dfq's activation sites also follow residual additions and
   pooling, where no closed form holds; distilled inputs cover every site the same way and stay data-free).

Note that Q has no BatchNorm modules: the folded convolutions carry biases, and under the deploy protocol the
quantizers on a residual addition's inputs sit on the convolutions' outputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from dfq.errors import DFQError
from dfq.generators import distill_inputs
from dfq.methods.base import Method, MethodContext, register_method
from dfq.quant import QuantConfig, calibrate, quantize_model
from dfq.quant.equalize import (
    absorb_high_bias,
    correct_bias,
    equalize,
    find_pairs,
    fold_batchnorm,
    input_expectations,
)
from dfq.quant.prepare import split_activation_sites, unfuse_norm_act

__all__ = ["CLE", "CLEConfig", "prepare_float"]


@dataclass
class CLEConfig:
    """Attributes:
    equalize: cross-layer equalization of the consecutive layer pairs (Sec. 4.1).
    absorb_bias: high-bias absorption after equalization (Sec. 4.2).
    correct_bias: analytical bias correction of the quantized layers (Sec. 4.3).
    iterations: at most this many equalization passes over the pairs (stops once no scale moves).
    calib_samples: number of distilled inputs for the activation ranges.
    calib_steps: Adam steps of their ZeroQ-style distillation.
    calib_lr: Adam learning rate of the distillation.
    """

    equalize: bool = True
    absorb_bias: bool = True
    correct_bias: bool = True
    iterations: int = 50
    calib_samples: int = 32
    calib_steps: int = 50
    calib_lr: float = 0.5

    def __post_init__(self) -> None:
        for key in ("iterations", "calib_samples", "calib_steps"):
            if getattr(self, key) < 1:
                raise DFQError(f"cle.{key} must be >= 1, got {getattr(self, key)}")
        if self.calib_lr <= 0:
            raise DFQError(f"cle.calib_lr must be > 0, got {self.calib_lr}")


def prepare_float(teacher: nn.Module, config: CLEConfig) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The folded, equalized, bias-absorbed float copy of ``teacher`` (function kept, see the module docstring),
    the expected inputs E[x] per layer for bias correction, and a summary of what was done."""
    p = split_activation_sites(unfuse_norm_act(copy.deepcopy(teacher))).eval()
    stats = fold_batchnorm(p)
    pairs = find_pairs(p) if config.equalize or config.absorb_bias else []
    passes = equalize(p, pairs, stats, config.iterations) if config.equalize else 0
    absorbed = absorb_high_bias(p, pairs, stats) if config.absorb_bias else {}
    expectations = input_expectations(p, stats) if config.correct_bias else {}
    summary = {"folded_bn": len(stats), "pairs": len(pairs), "equalize_passes": passes, "absorbed": len(absorbed)}
    return p, expectations, summary


@register_method
class CLE(Method):
    name = "cle"
    config_cls = CLEConfig
    description = "DFQ (ICCV'19): BN folding, cross-layer equalization, bias absorption and correction"

    def float_model(self, teacher: nn.Module) -> nn.Module:
        p = split_activation_sites(unfuse_norm_act(copy.deepcopy(teacher))).eval()
        fold_batchnorm(p)  # every BatchNorm that follows a convolution becomes an Identity, the convolution gets a bias
        return p

    def quantize(self, teacher: nn.Module, quant: QuantConfig, ctx: MethodContext) -> tuple[nn.Module, dict[str, Any]]:
        c = self.config
        p, expectations, summary = prepare_float(teacher, c)
        q = quantize_model(p, quant)
        summary["bias_corrected"] = correct_bias(q, expectations)
        images = distill_inputs(
            teacher, ctx.input_size, c.calib_samples, steps=c.calib_steps, lr=c.calib_lr, generator=ctx.generator,
            input_stats=ctx.input_stats, progress=ctx.progress,
        )  # fmt: skip
        calibrate(q, [images])
        return q, summary
