"""Plug-ins that any generator-based method can switch on (``plugins:`` in a run config).

From SynQ (Kim et al., ICLR 2025): a Fourier low-pass filter on the images Q trains on,
soft labels only for hard samples, and Grad-CAM alignment between P and Q. From the
post-training line (LSQ, Esser et al. 2020; AdaRound, Nagel et al. 2020; Genie): learned
activation steps, and learned weight rounding with learned weight steps in place of
training the weights. Each is off by default, so every method keeps its published math.
The engine wires them in; this module holds their math.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfq.errors import DFQError

__all__ = ["CamProbe", "PluginConfig", "cam_loss", "easy_mask", "grad_cam", "masked_ce"]


@dataclass
class PluginConfig:
    """Attributes:
    lowpass: Gaussian low-pass filter on the images of Q's step, its standard deviation as a
        fraction of the Nyquist frequency (SynQ); P's targets are computed on the filtered images. 0: off.
    hard_tau: difficulty threshold τ (SynQ): Q's cross-entropy to the sampled label is kept only for
        samples with ``1 − p_P(y) ≤ τ``; harder samples learn from P's soft outputs alone. ``None``: off.
    hard_ce_weight: weight of that cross-entropy for methods whose Q loss has none (AdaSG, AdaDFQ).
    cam_weight: weight of the Grad-CAM alignment, the MSE between P's and Q's normalised class-activation
        maps of the sampled class at the input of the global pooling (SynQ). 0: off.
    lsq: learn the activation steps and the per-channel weight steps (LSQ) once Q trains and the ranges are
        frozen; the weights keep training, with LSQ's straight-through gradient (zero outside the clamp range).
    adaround: learn each weight's rounding and the weight steps (AdaRound with LSQ steps, as Genie-M)
        instead of the weights, once the ranges are observed; the rounding is fixed at the end.
    lr_astep, lr_wstep, lr_round: Adam learning rates of the activation steps, weight steps and rounding.
    round_weight: weight of AdaRound's regulariser (its mean over all rounding variables).
    beta: the regulariser's exponent, annealed linearly from the first to the second value.
    """

    lowpass: float = 0.0
    hard_tau: float | None = None
    hard_ce_weight: float = 1.0
    cam_weight: float = 0.0
    lsq: bool = False
    adaround: bool = False
    lr_astep: float = 4e-5
    lr_wstep: float = 1e-5
    lr_round: float = 1e-3
    round_weight: float = 0.1
    beta: tuple[float, float] = (20.0, 2.0)

    def __post_init__(self) -> None:
        if not 0 <= self.lowpass <= 1:
            raise DFQError(f"plugins.lowpass must be in [0, 1], got {self.lowpass}")
        if self.hard_tau is not None and not 0 <= self.hard_tau <= 1:
            raise DFQError(f"plugins.hard_tau must be in [0, 1], got {self.hard_tau}")
        for key in ("hard_ce_weight", "cam_weight", "lr_astep", "lr_wstep", "lr_round", "round_weight"):
            if not getattr(self, key) >= 0:
                raise DFQError(f"plugins.{key} must be >= 0, got {getattr(self, key)}")
        self.beta = tuple(float(b) for b in self.beta)  # type: ignore[assignment]
        if len(self.beta) != 2 or not all(b > 0 for b in self.beta):
            raise DFQError(f"plugins.beta must be two positive values, got {self.beta}")

    def check(self, quant: Any) -> None:
        """Learned weight steps live in a stored grid: refuse a quantization config without one."""
        if self.learns_quantizers and quant.weight_scales not in (None, "stored"):
            raise DFQError("plugins.lsq and plugins.adaround learn the weight steps: set quant.weight_scales: stored")

    @property
    def learns_quantizers(self) -> bool:
        return self.lsq or self.adaround

    @property
    def changes_student_input(self) -> bool:
        """The Q step needs its own forwards of P and Q (it cannot reuse the generator step's)."""
        return bool(self.lowpass) or bool(self.cam_weight)


def easy_mask(p_logits: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """1.0 for the samples P finds easy (``1 − p_P(y) ≤ τ``), 0.0 for the hard ones."""
    p_y = F.softmax(p_logits.detach().float(), dim=1).gather(1, y[:, None]).squeeze(1)
    return (1 - p_y <= tau).to(p_logits.dtype)


def masked_ce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy averaged over the whole batch, counting only the samples where ``mask`` is 1."""
    if mask is None:
        return F.cross_entropy(logits, y)
    return (F.cross_entropy(logits, y, reduction="none") * mask).mean()


def grad_cam(logits: torch.Tensor, feats: torch.Tensor, y: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of class ``y`` on ``feats`` (B, C, H, W), flattened and
    scaled to unit L2 norm per sample so that P's and Q's maps compare in shape, not magnitude."""
    score = logits.gather(1, y[:, None]).sum()
    (grads,) = torch.autograd.grad(score, feats, create_graph=create_graph)
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * feats).sum(dim=1)).flatten(1)
    return cam / cam.norm(dim=1, keepdim=True).clamp(min=1e-8)


def cam_loss(p_cam: torch.Tensor, q_cam: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(q_cam, p_cam.detach())


def _global_pool(model: nn.Module) -> nn.Module:
    pools = [m for m in model.modules() if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d))]
    if not pools:
        raise DFQError("Grad-CAM alignment (plugins.cam_weight) needs a model with a global average-pooling module")
    return pools[-1]


class CamProbe:
    """Captures the input of a model's last average-pooling module (the maps Grad-CAM explains).

    With ``leaf=True`` (P, whose parameters are frozen) the maps are cut from the graph and made
    a leaf that requires grad, so the gradient of the logits reaches them without P's backward.
    """

    def __init__(self, model: nn.Module, leaf: bool) -> None:
        self.pool, self.leaf = _global_pool(model), leaf
        self.feats: torch.Tensor | None = None

    @contextlib.contextmanager
    def capture(self) -> Iterator[CamProbe]:
        handle = self.pool.register_forward_pre_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()

    def _hook(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        if self.leaf:
            x = x.detach().requires_grad_()
        self.feats = x
        return (x, *args[1:])
