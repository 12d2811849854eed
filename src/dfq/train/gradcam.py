"""Grad-CAM (Selvaraju et al. 2017) as SynQ's alignment of P and Q uses it (``plugins.cam_weight``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dfq.errors import DFQError

__all__ = ["CamProbe", "cam_loss", "grad_cam"]


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
