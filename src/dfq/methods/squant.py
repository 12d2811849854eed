"""SQuant: on-the-fly data-free weight rounding through a diagonal Hessian approximation.

Guo, Qiu, Leng, Gao, Zhang, Liu, Yang, Zhu, Guo, "SQuant: On-the-Fly Data-Free Quantization via Diagonal
Hessian Approximation", ICLR 2022 (github.com/clevercool/SQuant). Round-to-nearest minimises each weight's own
error, but the loss a layer's rounding causes also depends on how the errors add up: the paper approximates the
Hessian of the loss by three diagonal blocks, per element, per kernel (one output channel's weights on one input
channel) and per output channel, and shows that minimising it is the same as keeping the *absolute sum* of the
rounding errors small at each granularity (the Constrained Absolute Sum of Error, CASE). With ``e`` the rounding
error in grid steps (code minus real-valued code):

- SQuant-E: every ``|e| < 1`` (each weight at most one step from its nearest rounding);
- SQuant-K: every kernel ``|sum e| <= 0.5``;
- SQuant-C: every output channel ``|sum e| <= 0.5``.

The progressive algorithm (Algorithm 1) starts from round-to-nearest (``|e| <= 0.5``) and, in each kernel whose
errors sum to ``s``, flips the rounding of the ``round(|s|)`` elements with the largest error of the sign of ``s``
(those nearest the midpoint between two codes, the cheapest flips) to the other neighbour; then, in each output
channel whose kernels sum to ``S``, it flips ``round(|S|)`` kernels, one element each: a kernel whose sum has the
sign of ``S``, by its element with the largest error of that sign (undoing its last SQuant-K flip, or making the
next one), kernels taken in the order of that element's ``|e|``. A C flip moves a kernel sum by one, so after it
a kernel's ``|sum e| < 1`` (the paper's relaxed K bound under C). Without SQuant-K, SQuant-C flips elements over
the whole channel as SQuant-K does over a kernel. No data, no gradients (here about 0.4 s for a 256x256x3x3
layer on 2 CPU cores: the flips are vectorized sorts).

As in dfq's other post-training methods, the activation ranges are then calibrated on a short ZeroQ-style
distillation from P (the paper clips activations with a BatchNorm-statistics rule instead; distilled inputs cover
every dfq activation site the same way and stay data-free).

Deviations from the paper: the real-valued codes are clamped to the grid's code range before rounding (so a
flip never leaves the range; on min/max grids this only touches the zero point's half-step), and the weight grid
is dfq's (per-channel asymmetric min/max, or the deploy protocol's symmetric one), not the paper's signed
asymmetric grid. The flipped codes are written into the layers' weights on a stored grid, so Q's forward
reproduces exactly those codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dfq.errors import DFQError
from dfq.generators import distill_inputs
from dfq.methods.base import Method, MethodContext, register_method
from dfq.quant import QuantConfig, calibrate, quantize_model
from dfq.quant.api import weight_quantizers

__all__ = ["SQuant", "SQuantConfig", "squant_codes"]


@dataclass
class SQuantConfig:
    """Attributes:
    kernel: SQuant-K, every kernel's rounding errors sum to at most half a step.
    channel: SQuant-C, every output channel's rounding errors sum to at most half a step.
    calib_samples: number of distilled inputs for the activation ranges.
    calib_steps: Adam steps of their ZeroQ-style distillation.
    calib_lr: Adam learning rate of the distillation.
    """

    kernel: bool = True
    channel: bool = True
    calib_samples: int = 32
    calib_steps: int = 50
    calib_lr: float = 0.5

    def __post_init__(self) -> None:
        for key in ("calib_samples", "calib_steps"):
            if getattr(self, key) < 1:
                raise DFQError(f"squant.{key} must be >= 1, got {getattr(self, key)}")
        if self.calib_lr <= 0:
            raise DFQError(f"squant.calib_lr must be > 0, got {self.calib_lr}")


def _top(score: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per row of ``score`` (rows x n), the mask of its ``count`` largest entries among the positive ones."""
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    return (rank < count) & (score > 0)


def _flip_rows(codes: torch.Tensor, err: torch.Tensor) -> int:
    """Within each row, flip the ``round(|sum e|)`` elements with the largest error of the sum's sign (in place);
    the row's sum moves by one per flip towards zero and ends within half a step. Returns the number of flips."""
    total = err.sum(dim=1, keepdim=True)
    direction = torch.sign(total)
    # A row holds at least 2|sum| elements of the sum's sign (each |e| <= 0.5), so round(|sum|) candidates exist.
    flip = _top(err * direction, torch.round(total.abs())) * direction
    codes -= flip
    err -= flip
    return int(flip.abs().sum())


def _flip_channels(codes: torch.Tensor, err: torch.Tensor) -> int:
    """SQuant-C over kernels: ``codes`` and ``err`` are (out, in, kernel) after SQuant-K (every kernel
    ``|sum e| <= 0.5``); flip one element in each of ``round(|S|)`` kernels of each channel (in place)."""
    kernel_sum = err.sum(dim=2)
    direction = torch.sign(kernel_sum.sum(dim=1, keepdim=True))  # (out, 1)
    best, index = (err * direction.unsqueeze(2)).max(dim=2)  # each kernel's cheapest flip towards a smaller sum
    # Only kernels whose sum has the channel's sign qualify (a flip leaves them |sum| < 1); there are at least
    # 2|S| of them, as each holds at most 0.5.
    score = torch.where(kernel_sum * direction > 0, best, torch.zeros_like(best))
    chosen = _top(score, torch.round(kernel_sum.sum(dim=1, keepdim=True).abs()))
    flip = torch.zeros_like(err).scatter_(2, index.unsqueeze(2), 1.0) * (chosen * direction).unsqueeze(2)
    codes -= flip
    err -= flip
    return int(flip.abs().sum())


@torch.no_grad()
def squant_codes(
    x: torch.Tensor, qmin: int, qmax: int, *, kernel: bool = True, channel: bool = True
) -> tuple[torch.Tensor, int]:
    """SQuant's integer codes (as floats) of the real-valued codes ``x`` (``w / scale + zero_point``; dim 0: output
    channels, dim 1: input channels, the rest: the kernel), and the number of flipped roundings.

    Round-to-nearest, then SQuant-K (``kernel``) and SQuant-C (``channel``), Algorithm 1 of the paper. Every
    element ends at most one step from ``x``; with ``kernel``, every kernel's errors sum to at most 0.5 (under
    ``channel`` too: at most 1); with ``channel``, every output channel's to at most 0.5. Codes stay in
    ``[qmin, qmax]``: ``x`` is clamped to it first, so a flip never crosses the range's ends.
    """
    x = x.detach().float().clamp(qmin, qmax)
    shape = x.shape
    x3 = x.reshape(shape[0], shape[1] if x.dim() > 1 else 1, -1)
    codes = torch.round(x3)
    err = codes - x3
    flips = 0
    if kernel:
        flips += _flip_rows(codes.view(-1, x3.shape[2]), err.view(-1, x3.shape[2]))
    if channel and kernel:
        flips += _flip_channels(codes, err)
    elif channel:
        flips += _flip_rows(codes.view(shape[0], -1), err.view(shape[0], -1))
    return codes.reshape(shape), flips


@register_method
class SQuant(Method):
    name = "squant"
    config_cls = SQuantConfig
    description = "SQuant (ICLR'22): data-free flipped rounding of the weights (CASE), distilled activation ranges"
    stored_grids = "rounds onto fixed weight grids"

    def quantize(self, teacher: nn.Module, quant: QuantConfig, ctx: MethodContext) -> tuple[nn.Module, dict[str, Any]]:
        c = self.config
        q = quantize_model(teacher, quant)
        flips = elements = layers = 0
        for layer, wq in weight_quantizers(q):
            scale, zero_point, qmin, qmax = wq.qparams(layer.weight)
            w = layer.weight.detach()
            codes, n = squant_codes(w * (1.0 / scale) + zero_point, qmin, qmax, kernel=c.kernel, channel=c.channel)
            with torch.no_grad():
                layer.weight.copy_((codes - zero_point) * scale)  # on the stored grid: Q's forward gives these codes
            flips, elements, layers = flips + n, elements + w.numel(), layers + 1
        images = distill_inputs(
            teacher, ctx.input_size, c.calib_samples, steps=c.calib_steps, lr=c.calib_lr, generator=ctx.generator,
            input_stats=ctx.input_stats, progress=ctx.progress,
        )  # fmt: skip
        calibrate(q, [images])
        return q, {"layers": layers, "flipped": flips, "flipped_fraction": round(flips / max(elements, 1), 6)}
