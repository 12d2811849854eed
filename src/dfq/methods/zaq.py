"""ZAQ (Liu et al., CVPR 2021; github.com/FLHonker/ZAQ-code): adversarial game on a two-level discrepancy.

Per iteration: 5 Q steps, each on a fresh detached batch, minimising
``mean|z_q − z_p| + α·Σ_l SCRM(F_Q,l, F_P,l)``; then one G step maximising the same
discrepancy plus ``β·mean|F_P,last|`` (activation regulariser). G is unconditional,
there is no BNS term, and Q's BatchNorm runs in train mode as in the official code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from dfq.errors import DFQError
from dfq.methods.base import register_method
from dfq.methods.game import GameConfig, GameMethod, Outputs
from dfq.methods.losses import scrm
from dfq.train import Game, GeneratorConfig, TrainConfig

__all__ = ["ZAQ", "ZAQConfig", "feature_layers"]

_STAGE = re.compile(r"(^|\.)(layer|stage)\d+$")


def _zaq_schedule() -> TrainConfig:
    """The official CIFAR schedule: batch 256, 300 epochs x 60 iterations, Q's SGD at 0.1, no warm-up."""
    return TrainConfig(batch_size=256, epochs=300, iters_per_epoch=60, warmup_epochs=0, q_lr=0.1,
                       q_weight_decay=5e-4, q_nesterov=False, q_milestones=[100, 200], g_milestones=[100, 200],
                       g_betas=[0.9, 0.999])  # fmt: skip


@dataclass
class ZAQConfig(GameConfig):
    """The official CIFAR settings; besides the shared ``train``/``generator``/``plugins``:
    alpha: weight of the feature-relation (SCRM) discrepancy.
    beta: weight of the activation regulariser on P's last feature map.
    gamma_r: SCRM's relation weight (hard-coded 0.1 in the official code).
    feature_layers: names of the modules whose outputs are compared; empty: the
        model's stages (modules named ``layerN`` / ``stageN``).
    """

    train: TrainConfig = field(default_factory=_zaq_schedule)
    generator: GeneratorConfig = field(default_factory=lambda: GeneratorConfig("unconditional", latent_dim=256))
    alpha: float = 1.0
    beta: float = 0.1
    gamma_r: float = 0.1
    feature_layers: list[str] = field(default_factory=list)


def feature_layers(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """The configured feature layers, or the model's residual stages, validated."""
    available = dict(model.named_modules())
    if names:
        missing = [n for n in names if n not in available]
        if missing:
            raise DFQError(f"feature layer(s) not found in the model: {', '.join(missing)}")
        return list(names)
    stages = [n for n in available if _STAGE.search(n)]
    if not stages:
        raise DFQError("cannot find the model's stages for ZAQ's feature loss; set zaq.feature_layers in the config")
    return stages


@register_method
class ZAQ(GameMethod):
    name = "zaq"
    config_cls = ZAQConfig
    description = "ZAQ (CVPR'21): adversarial game on logit and feature-relation discrepancy, unconditional G"
    log_labels = {"g_l1": "G: output discrepancy", "g_scrm": "G: feature discrepancy",
                  "g_act": "G: activation regulariser", "q_l1": "Q: output discrepancy",
                  "q_scrm": "Q: feature discrepancy"}  # fmt: skip
    conditional = False
    uses_bns = False
    generator_uses_student = True
    student_bn_train = True
    student_steps = 5  # Q steps per iteration, each on a fresh batch, before G's step

    def quant_defaults(self) -> dict[str, str]:
        return {"act_observer": "minmax", **super().quant_defaults()}

    def feature_layers(self, teacher: nn.Module) -> list[str]:
        return feature_layers(teacher, self.config.feature_layers)

    def iteration(self, game: Game, train_q: bool) -> dict[str, torch.Tensor]:
        q_losses = [game.student_step(game.fresh_batch(), train_q) for _ in range(self.student_steps)]
        _, g_losses = game.generator_step()
        return game.logs(g_losses, q_losses[-1])

    def _discrepancy(self, out: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        logits = (out.q_logits - out.p_logits).abs().mean()
        feats = torch.stack([scrm(q, p, self.config.gamma_r) for q, p in zip(out.q_feats, out.p_feats, strict=True)])
        return logits, feats.sum()

    def student_loss(self, out: Outputs) -> dict[str, torch.Tensor]:
        logits, feats = self._discrepancy(out)
        return {"loss": logits + self.config.alpha * feats, "l1": logits, "scrm": feats}

    def generator_loss(self, out: Outputs) -> dict[str, torch.Tensor]:
        logits, feats = self._discrepancy(out)
        act = out.p_feats[-1].abs().mean()
        loss = -logits - self.config.alpha * feats - self.config.beta * act
        return {"loss": loss, "l1": logits, "scrm": feats, "act": act}
