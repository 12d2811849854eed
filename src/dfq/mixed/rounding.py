"""Learned rounding of one layer, for the sensitivity pass: what a reconstruction method makes of its weights.

Nearest rounding overstates what low-bit weights cost a method that learns its rounding: on ResNet-20, 4-bit
weights everywhere cost `recon` nothing measurable, while their nearest-rounded sensitivities add up to more than
those of 4-bit activations, so a solver fed them buys weight bits with activation bits. AdaRound (Nagel et al.,
ICML 2020) fitted to the layer's own output on a few synthetic inputs, for a few steps, removes most of that
overstatement at a small cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dfq.quant.learning import BetaSchedule, QuantizerLearning, cosine_anneal

__all__ = ["learned_rounding"]

_LR_ROUND, _LR_STEP, _ROUND_WEIGHT = 1e-2, 1e-5, 0.01  # recon's defaults
_BETA, _WARMUP = (20.0, 2.0), 0.2


@contextlib.contextmanager
def learned_rounding(layer: nn.Conv2d | nn.Linear, x: torch.Tensor, steps: int) -> Iterator[None]:
    """Within the context, ``layer``'s weight is rounded by ``steps`` AdaRound steps on inputs ``x`` (its float
    inputs); on exit the weight and its grid are restored."""
    wq = layer.weight_quantizer
    saved = layer.weight.detach().clone(), wq.scale.clone(), wq.zero_point.clone()
    with torch.enable_grad():
        _fit(layer, x, steps)
    try:
        yield
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved[0])
            wq.scale.copy_(saved[1])
            wq.zero_point.copy_(saved[2])


def _fit(layer: nn.Conv2d | nn.Linear, x: torch.Tensor, steps: int) -> None:
    target = _output(layer, x, layer.weight.detach())
    learning = QuantizerLearning([(layer, layer.weight_quantizer)], [])
    params = learning.begin(rounding=True)
    opt = torch.optim.Adam([{"params": params.rounding, "lr": _LR_ROUND}, {"params": params.weight_steps,
                            "lr": _LR_STEP}])  # fmt: skip
    beta = BetaSchedule(_BETA, steps, cosine_anneal, int(_WARMUP * steps))
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        out = _output(layer, x, layer.weight_quantizer(layer.weight))
        loss = (out - target).pow(2).sum(1).mean()
        if beta.started(step):
            loss = loss + _ROUND_WEIGHT * learning.rounding_loss(beta(step))
        loss.backward()
        opt.step()
    learning.end()


def _output(layer: nn.Conv2d | nn.Linear, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's output without bias (the bias does not change what the rounding should fit)."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, w, None)
    return F.linear(x, w)
