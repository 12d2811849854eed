"""GDFQ (Xu et al., ECCV 2020; github.com/xushoukai/GDFQ): the common baseline.

G: ``CE(P(x), y) + 0.1·BNS``. Q: ``α·T²·KL(P ‖ Q) + CE(Q(x), y)`` on the same batch,
with the teacher logits of the forward done before the G update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dfq.errors import DFQError
from dfq.methods.base import register_method
from dfq.methods.game import GameConfig, GameMethod, Outputs
from dfq.methods.losses import kd_loss
from dfq.train import TrainConfig
from dfq.train.plugins import masked_ce

__all__ = ["GDFQ", "GDFQConfig"]


@dataclass
class GDFQConfig(GameConfig):
    """The paper's CIFAR settings (batch 200) plus, besides the shared ``train``/``generator``/``plugins``:

    temperature: KD temperature T.
    kd_weight: α, the weight of the KD term.
    kd_reduction: "mean" (the official code: KL summed then divided by B·C, so the
        per-sample weight is T²/C) or "batchmean" (divided by B).
    bns_weight: weight of the BNS term in G's loss.
    ce_weight: weight of Q's cross-entropy to the sampled labels.
    """

    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=200))
    temperature: float = 20.0
    kd_weight: float = 1.0
    kd_reduction: str = "mean"
    bns_weight: float = 0.1
    ce_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kd_reduction not in ("mean", "batchmean"):
            raise DFQError(f"gdfq.kd_reduction must be 'mean' or 'batchmean', got {self.kd_reduction!r}")
        if not self.temperature > 0:
            raise DFQError(f"gdfq.temperature must be > 0, got {self.temperature}")


@register_method
class GDFQ(GameMethod):
    name = "gdfq"
    config_cls = GDFQConfig
    description = "GDFQ (ECCV'20): conditional generator with BNS loss, Q distilled with KD + label CE"
    log_labels = {"g_ce": "G: cross-entropy", "g_bns": "G: BN statistics", "q_kd": "Q: distillation",
                  "q_ce": "Q: cross-entropy"}  # fmt: skip
    label_ce = True

    def generator_loss(self, out: Outputs) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(out.p_logits, out.y)
        loss = ce + self.config.bns_weight * out.bns
        return {"loss": loss, "ce": ce, "bns": out.bns}

    def student_loss(self, out: Outputs) -> dict[str, torch.Tensor]:
        c = self.config
        kd = kd_loss(out.q_logits, out.p_logits, c.temperature, c.kd_reduction)
        ce = masked_ce(out.q_logits, out.y, out.label_mask)
        return {"loss": c.kd_weight * kd + c.ce_weight * ce, "kd": kd, "ce": ce}
