"""Learned steps (LSQ) and learned rounding (AdaRound), written once for every user.

Block reconstruction (:mod:`dfq.methods.recon`, one unit at a time) and the games' ``plugins.lsq`` /
``plugins.adaround`` (the whole of Q) both open a learning phase over a set of quantizers, add AdaRound's
regulariser with an annealed exponent β, and close the phase. While it is open the quantizers carry extra
parameters (``.step``, ``.alpha``); closing it writes what they learned into the stored grids and the
weights, so the model is an ordinary quantized model again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dfq.quant.quantizer import ActMode, ActQuantizer, WeightQuantizer

__all__ = [
    "LEARNED_SUFFIXES",
    "BetaSchedule",
    "LearnedParameters",
    "QuantizerLearning",
    "cosine_anneal",
    "linear_anneal",
]

LEARNED_SUFFIXES = (".step", ".alpha")  # state-dict keys that exist only while a learning phase is open

Anneal = Callable[[float, float, float], float]


def linear_anneal(start: float, end: float, progress: float) -> float:
    return start + (end - start) * progress


def cosine_anneal(start: float, end: float, progress: float) -> float:
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class BetaSchedule:
    """β of AdaRound's regulariser over a phase of ``steps`` steps: off for the first ``warmup`` steps,
    then annealed from ``beta[0]`` to ``beta[1]`` with the shape ``anneal`` (recon: cosine after a warm-up
    fraction; the games: linear over Q's training)."""

    beta: tuple[float, float]
    steps: int
    anneal: Anneal = linear_anneal
    warmup: int = 0

    def started(self, step: int) -> bool:
        return step >= self.warmup

    def __call__(self, step: int) -> float:
        progress = (step - self.warmup) / max(self.steps - self.warmup, 1)
        return self.anneal(self.beta[0], self.beta[1], min(max(progress, 0.0), 1.0))


@dataclass
class LearnedParameters:
    """The parameters a learning phase opened, by kind (each kind gets its own learning rate)."""

    act_steps: list[nn.Parameter]
    weight_steps: list[nn.Parameter]
    rounding: list[nn.Parameter]


class QuantizerLearning:
    """A learning phase over given weight quantizers (with their layers) and activation quantizers."""

    def __init__(self, weights: Iterable[tuple[nn.Module, WeightQuantizer]], acts: Iterable[ActQuantizer]) -> None:
        self.weights = list(weights)
        self.acts = [aq for aq in acts if not aq.fixed]  # a range known without data is not learned

    def begin(self, *, rounding: bool, starts: Mapping[nn.Module, torch.Tensor] | None = None) -> LearnedParameters:
        """Make the activation steps trainable, and either each weight's rounding and step (``rounding``:
        AdaRound with LSQ steps, the weights fixed) or only the weight steps (LSQ: the weights keep training
        through the rounding's straight-through gradient). Rounding starts from each quantizer's stored grid, at
        the float weights or at a layer's rounding in ``starts`` (:meth:`WeightQuantizer.begin_rounding`); step
        learning from the min/max grid of the current weights."""
        steps, alphas = [], []
        for layer, wq in self.weights:
            if rounding:
                alpha, step = wq.begin_rounding(layer.weight, (starts or {}).get(layer))
                alphas.append(alpha)
                steps.append(step)
            else:
                steps.append(wq.begin_step_learning(layer.weight))
        return LearnedParameters([aq.begin_learning() for aq in self.acts], steps, alphas)

    def rounding_loss(self, beta: float, reduction: str = "sum") -> torch.Tensor:
        """AdaRound's regulariser over every learned rounding: summed, or averaged over the rounding variables
        (``reduction="mean"``, which keeps its weight independent of the model's size)."""
        quantizers = [wq for _, wq in self.weights if wq.alpha is not None]
        total = sum(wq.rounding_loss(beta) for wq in quantizers)
        if reduction == "mean":
            return total / sum(wq.alpha.numel() for wq in quantizers)
        return total

    def end(self) -> None:
        """Fix the learned rounding and steps into the stored grids and the weights."""
        for layer, wq in self.weights:
            if wq.alpha is not None:
                wq.end_rounding(layer.weight)
            elif wq.learns_step:
                wq.end_step_learning()
        for aq in self.acts:
            if aq.get_mode() is ActMode.LEARNED:
                aq.end_learning()
