"""One batch as a game's loss functions see it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Outputs"]


@dataclass
class Outputs:
    """Attributes:
    x: generated images (attached to G's graph in the generator phase, detached in the student phase).
    y: sampled labels (``None`` for unconditional generators).
    p_logits: P's logits (detached in the student phase).
    q_logits: Q's logits (``None`` when the method's generator loss does not use Q).
    bns: P's BNS loss on ``x`` (``None`` when the method does not use it).
    p_feats / q_feats: outputs of the method's feature layers, in order.
    label_mask: per-sample weights of Q's cross-entropy to ``y`` (``None``: all 1; see plugins.hard_tau).
    """

    x: torch.Tensor
    y: torch.Tensor | None
    p_logits: torch.Tensor
    q_logits: torch.Tensor | None = None
    bns: torch.Tensor | None = None
    p_feats: list[torch.Tensor] | None = None
    q_feats: list[torch.Tensor] | None = None
    label_mask: torch.Tensor | None = None
