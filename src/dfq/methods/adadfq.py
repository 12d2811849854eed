"""AdaDFQ (Qian et al., CVPR 2023) and AdaSG (Qian et al., AAAI 2023); github.com/hfutqian/AdaDFQ.

A zero-sum game over sample adaptability, measured by the normalised entropy H′
of the disagreement ``softmax(z_p − z_q)``:

- G: ``L_BG(λ_l, λ_u) + β·(α_ds·CE(z_p − z_q, y) + α_as·CE(z_p + z_q, y)) + γ·BNS``,
  with Q's forward on the *non-detached* images so G gets gradients through Q's STE.
- Q: ``−T²·mean H(softmax((z_p − z_q)/T))`` (maximise the disagreement entropy).

AdaSG is the special case α_ds = α_as = 0.1, λ_l = 0.3, λ_u = 0.8, β = γ = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfq.methods.base import register_method
from dfq.methods.game import GameConfig, GameMethod, Outputs
from dfq.methods.losses import balance_gap, student_entropy_loss

__all__ = ["AdaDFQ", "AdaDFQConfig", "AdaSG", "AdaSGConfig"]


@dataclass
class AdaDFQConfig(GameConfig):
    """The AdaDFQ CIFAR configs; besides the shared ``train``/``generator``/``plugins``:
    alpha_ds / alpha_as: weights of the disagreement / agreement CE.
    lambda_l / lambda_u: the balance-gap bounds on H′.
    beta: weight of the balance term ``α_ds·L_ds + α_as·L_as``.
    gamma: weight of the BNS loss.
    temperature: T of Q's entropy objective (20 CIFAR, 5 ImageNet).
    """

    alpha_ds: float = 0.2
    alpha_as: float = 0.1
    lambda_l: float = 0.1
    lambda_u: float = 0.8
    beta: float = 1.0
    gamma: float = 1.0
    temperature: float = 20.0


@dataclass
class AdaSGConfig(AdaDFQConfig):
    """AdaSG's hard-coded values."""

    alpha_ds: float = 0.1
    alpha_as: float = 0.1
    lambda_l: float = 0.3
    lambda_u: float = 0.8


@register_method
class AdaDFQ(GameMethod):
    name = "adadfq"
    config_cls = AdaDFQConfig
    description = "AdaDFQ (CVPR'23): zero-sum game over sample adaptability with a balance gap on H'"
    log_labels = {"g_bg": "G: balance gap L_BG", "g_ds": "G: disagreement CE", "g_as": "G: agreement CE",
                  "g_bns": "G: BN statistics", "g_h_norm": "G: mean normalised entropy H'"}  # fmt: skip
    generator_uses_student = True

    def generator_loss(self, out: Outputs) -> dict[str, torch.Tensor]:
        c = self.config
        disagreement = out.p_logits - out.q_logits
        bg, h_norm = balance_gap(disagreement, c.lambda_l, c.lambda_u)
        ds = F.cross_entropy(disagreement, out.y)
        agree = F.cross_entropy(out.p_logits + out.q_logits, out.y)
        loss = bg + c.beta * (c.alpha_ds * ds + c.alpha_as * agree) + c.gamma * out.bns
        q10, q50, q90 = torch.quantile(
            h_norm.detach(), torch.tensor([0.1, 0.5, 0.9], dtype=h_norm.dtype, device=h_norm.device)
        )
        # H′ quantiles: where the batch's adaptability sits against the [λ_l, λ_u] band (for reports).
        return {
            "loss": loss,
            "bg": bg,
            "ds": ds,
            "as": agree,
            "bns": out.bns,
            "h_norm": h_norm.detach().mean(),
            "h_norm_p10": q10,
            "h_norm_p50": q50,
            "h_norm_p90": q90,
        }

    def student_loss(self, out: Outputs) -> dict[str, torch.Tensor]:
        loss = student_entropy_loss(out.p_logits, out.q_logits, self.config.temperature)
        return {"loss": loss}


@register_method
class AdaSG(AdaDFQ):
    name = "adasg"
    config_cls = AdaSGConfig
    description = "AdaSG (AAAI'23): AdaDFQ's game with fixed weights (alpha 0.1/0.1, lambda 0.3-0.8)"
