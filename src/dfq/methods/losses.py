"""Loss functions of the DFQ methods, as pure functions of logits and features.

Each is checked against hand-computed values on tiny tensors in the tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "balance_gap",
    "entropy",
    "kd_loss",
    "normalized_entropy",
    "scrm",
    "scrm_relations",
    "student_entropy_loss",
]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: str = "mean") -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) || softmax(student/T))``.

    ``reduction="mean"`` divides the summed KL by B·C, as PyTorch's ``KLDivLoss``
    default used by GDFQ/Qimera (their official code: the effective KD weight is T²/C);
    ``"batchmean"`` divides by B, the textbook definition.
    """
    if reduction not in ("mean", "batchmean"):
        raise ValueError(f"reduction must be 'mean' or 'batchmean', got {reduction!r}")
    log_q = F.log_softmax(student / temperature, dim=1)
    p = F.softmax(teacher / temperature, dim=1)
    total = F.kl_div(log_q, p, reduction="sum")  # "mean" by hand: torch warns on that reduction
    return temperature**2 * total / (log_q.numel() if reduction == "mean" else log_q.shape[0])


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Natural-log entropy of ``softmax(logits)`` per row, shape (B,)."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """AdaSG's H′: ``(H_i − min_j H_j) / (log C − min_j H_j)``, min over the batch, gradient through it."""
    h = entropy(logits)
    h_min = h.min()
    return (h - h_min) / (math.log(logits.shape[1]) - h_min)


def balance_gap(disagreement: torch.Tensor, lambda_l: float, lambda_u: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Balance-gap loss on the disagreement logits ``z_p − z_q``; returns (loss, H′).

    ``mean relu(λ_l − H′) + mean relu(H′ − λ_u)``: batch-size independent (the
    official code hard-codes a batch of 16 here; docs/methods.md).
    """
    h_norm = normalized_entropy(disagreement)
    loss = F.relu(lambda_l - h_norm).mean() + F.relu(h_norm - lambda_u).mean()
    return loss, h_norm


def student_entropy_loss(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """AdaSG/AdaDFQ's Q objective: ``−T² · mean_i H(softmax((z_p − z_q)/T))``."""
    return -(temperature**2) * entropy((teacher - student) / temperature).mean()


def unit_channels(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, N) scaled to unit L2 norm over channels at each position; 0 where all channels are 0.

    ``F.normalize`` clamps the norm at 1e-12, so at an all-zero position (common after a ReLU, and more so after
    quantization) its gradient is the upstream one times 1e12. Here such positions (norm <= 1e-12) are 0 with zero
    gradient."""
    norm = x.norm(dim=1, keepdim=True)
    nonzero = norm > 1e-12
    return torch.where(nonzero, x / torch.where(nonzero, norm, torch.ones_like(norm)), torch.zeros_like(x))


def scrm_relations(x: torch.Tensor, gamma: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """ZAQ's spatial and channel relation maps of a feature map (B, C, H, W) (ZAQ, CVPR 2021)."""
    x = unit_channels(x.flatten(2))  # (B, C, N), unit norm over channels at each position
    a_sp = torch.softmax(x.transpose(1, 2) @ x, dim=-1)  # (B, N, N)
    x_sp = gamma * (x @ a_sp.transpose(1, 2)) + x
    e = x @ x.transpose(1, 2)  # (B, C, C)
    a_ch = torch.softmax(e.amax(dim=-1, keepdim=True) - e, dim=-1)
    x_ch = gamma * (a_ch @ x) + x
    return x_sp, x_ch


def scrm(student: torch.Tensor, teacher: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """``mean|S_sp − T_sp| + mean|S_ch − T_ch|`` between relation maps of two feature maps."""
    s_sp, s_ch = scrm_relations(student, gamma)
    t_sp, t_ch = scrm_relations(teacher, gamma)
    return (s_sp - t_sp).abs().mean() + (s_ch - t_ch).abs().mean()
