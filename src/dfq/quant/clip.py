"""Least-error grids: the clipped range of a weight or activation quantizer with the smallest squared error.

A min/max grid wastes most of its levels on rare outliers at 2-4 bits; shrinking the range by the factor that
minimises the tensor's own quantization error (a grid search, as in Banner et al. 2019's ACIQ and in BRECQ's
initialisation) is the start every low-bit grid of dfq gets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from dfq.quant.api import act_quantizers, calibrate, weight_quantizers
from dfq.quant.quantizer import ActMode, ActQuantizer, WeightQuantizer

__all__ = ["CLIP_FACTORS", "OUTPUT_FACTORS", "clipped_weight_grids", "init_grids", "least_error_act_range",
           "least_error_weight_grid", "least_output_error_act_ranges"]  # fmt: skip

CLIP_FACTORS = torch.linspace(0.3, 1.0, 15)
OUTPUT_FACTORS = torch.linspace(0.5, 1.5, 21)  # around a least-error range, in both directions


@torch.no_grad()
def clipped_weight_grids(wq: WeightQuantizer, w: torch.Tensor) -> Iterator[float]:
    """Set the stored grid to the min/max grid of ``w`` shrunk by each of ``CLIP_FACTORS`` in turn, yielding the
    factor; the grid stored before is restored at the end."""
    stored = wq.scale.clone(), wq.zero_point.clone()
    try:
        for f in CLIP_FACTORS:
            wq.store(w * f)
            yield float(f)
    finally:
        wq.scale.copy_(stored[0])
        wq.zero_point.copy_(stored[1])


@torch.no_grad()
def least_error_weight_grid(wq: WeightQuantizer, w: torch.Tensor) -> None:
    """Store the clipped min/max grid of ``w`` with the least squared error, per channel (or per tensor)."""
    per_channel = wq.scale.dim() > 0
    best = None
    for _ in clipped_weight_grids(wq, w):
        err = (wq(w) - w).pow(2).reshape(w.shape[0], -1).sum(1)
        err = err if per_channel else err.sum()
        if best is None:
            best = [err, wq.scale.clone(), wq.zero_point.clone()]
            continue
        better = err < best[0]
        mask = better.reshape(wq.scale.shape)
        best = [torch.where(better, err, best[0]), torch.where(mask, wq.scale, best[1]),
                torch.where(mask, wq.zero_point, best[2])]  # fmt: skip
    wq.scale.copy_(best[1])
    wq.zero_point.copy_(best[2])


def _rescale_range(aq: ActQuantizer, factors: list[float], error: Callable[[], float], best: float = math.inf) -> float:
    """Scale ``aq``'s range by the one of ``factors`` with the least ``error()``, kept as it is unless some factor
    beats ``best``; returns the least error."""
    lo, hi, chosen = aq.lo.clone(), aq.hi.clone(), 1.0
    for f in factors:
        aq.lo.copy_(lo * f)
        aq.hi.copy_(hi * f)
        err = error()
        if err < best:
            best, chosen = err, f
    aq.lo.copy_(lo * chosen)
    aq.hi.copy_(hi * chosen)
    return best


@torch.no_grad()
def least_error_act_range(aq: ActQuantizer, x: torch.Tensor) -> None:
    """Shrink a calibrated (frozen) activation range to the one, among ``CLIP_FACTORS`` of it, with the least
    squared error on ``x``."""
    _rescale_range(aq, CLIP_FACTORS.tolist(), lambda: float((aq(x) - x).pow(2).sum()))


@torch.no_grad()
def init_grids(q: nn.Module, pool: torch.Tensor, batch_size: int) -> None:
    """Calibrate activation ranges on the pool, then shrink every range to its least-error clip."""
    calibrate(q, pool.split(batch_size))
    for layer, wq in weight_quantizers(q):
        if wq.stored:
            least_error_weight_grid(wq, layer.weight.detach())
    inputs = _site_inputs(q, pool[:batch_size])
    for aq, x in inputs.items():
        least_error_act_range(aq, x)


def _site_inputs(q: nn.Module, x: torch.Tensor) -> dict[ActQuantizer, torch.Tensor]:
    store: dict[ActQuantizer, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: store.__setitem__(mod, args[0].detach()))
        for m in q.modules()
        if isinstance(m, ActQuantizer) and m.get_mode() is not ActMode.DISABLED and not m.spec.is_noop and not m.fixed
    ]
    try:
        q(x)
    finally:
        for h in hooks:
            h.remove()
    return store


@torch.no_grad()
def least_output_error_act_ranges(
    q: nn.Module, p: nn.Module, x: torch.Tensor, batch_size: int, *, max_bits: int = 7, passes: int = 2
) -> float:
    """Rescale each frozen activation range of ``q`` with at most ``max_bits`` bits, one site at a time in the
    order of ``act_quantizers`` and ``passes`` times over, by the factor of ``OUTPUT_FACTORS`` whose Q leaves the
    least squared error of its outputs against ``p``'s on ``x``; returns that error (summed over ``x``).

    A site's own least error (:func:`least_error_act_range`) ignores what its rounding does downstream; at 4 bits
    the clip that keeps the network's output closest is often another one. A coordinate-descent form of the
    network-loss clipping of Nahshan et al., "Loss Aware Post-training Quantization" (Machine Learning, 2021).
    Costs ``passes * len(OUTPUT_FACTORS)`` forwards of Q over ``x`` per site.
    """
    chunks = x.split(batch_size)
    targets = [p(c) for c in chunks]

    def error() -> float:
        return sum(float((q(c) - t).pow(2).sum()) for c, t in zip(chunks, targets, strict=True))

    sites = [aq for _, aq in act_quantizers(q) if not (aq.fixed or aq.spec.is_noop) and aq.spec.bits <= max_bits]
    best = error()
    for _ in range(passes):
        for aq in sites:
            best = _rescale_range(aq, OUTPUT_FACTORS.tolist(), error, best)
    return best
