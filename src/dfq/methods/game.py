"""The generator/quantized-model games (GDFQ and its successors): their shared config and base class.

A game method owns only its math: two loss functions returning named components (the key ``"loss"``
is the one optimised; every other key is logged) and, where it differs from the default, the order
of its steps. The training loop (:mod:`dfq.train`) owns the optimizers, schedules, checkpoints and
evaluation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from dfq.distributed import DistContext
from dfq.methods.base import Method, MethodContext
from dfq.quant import QuantConfig
from dfq.train import Game, GeneratorConfig, Outputs, PluginConfig, TrainConfig, Trainer

__all__ = ["GameConfig", "GameMethod", "Outputs"]


@dataclass
class GameConfig:
    """Settings every game shares; a method's config extends it with its own loss weights.

    Attributes:
        train: the schedule (epochs, batch, learning rates, evaluation and checkpoints).
        generator: the generator's architecture and noise dimension.
        plugins: optional additions to any game (low-pass filter, hard-sample labels, Grad-CAM alignment,
            learned steps and rounding); all off by default.
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    plugins: PluginConfig = field(default_factory=PluginConfig)


class GameMethod(Method):
    """Base class of the games: a generator G against the quantized model Q, with P as the referee.

    Class attributes describe what the loop must compute for the losses:
        conditional: sample labels and feed them to G.
        uses_bns: hook P's BatchNorms in the generator phase (the BNS loss).
        generator_uses_student: run Q on the non-detached images in the G phase (G's loss reads Q).
        student_bn_train: Q's BatchNorm uses batch statistics (ZAQ) instead of fixed ones.
        label_ce: Q's loss has a cross-entropy to the sampled labels (GDFQ).
    The order of the steps in an iteration is code: :meth:`iteration`.
    """

    config_cls: ClassVar[type] = GameConfig
    conditional: ClassVar[bool] = True
    uses_bns: ClassVar[bool] = True
    generator_uses_student: ClassVar[bool] = False
    student_bn_train: ClassVar[bool] = False
    label_ce: ClassVar[bool] = False

    def generator_loss(self, out: Outputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def student_loss(self, out: Outputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def feature_layers(self, teacher: nn.Module) -> list[str]:
        """Modules whose outputs the losses compare (``Outputs.p_feats``/``q_feats``); none by default."""
        return []

    def iteration(self, game: Game, train_q: bool) -> dict[str, torch.Tensor]:
        """One iteration, in this method's order of steps (the calls on ``game``); returns the logs.
        By default G's step, then Q's step on the same batch (GDFQ's order)."""
        return game.generator_then_student(train_q)

    def quant_defaults(self) -> dict[str, str]:
        return {"weight_scales": "stored"} if self.config.plugins.learns_quantizers else {}

    def check(self, quant: QuantConfig) -> None:
        self.config.plugins.check(quant)

    def check_launch(self, dist: DistContext) -> None:
        """Games run data-parallel on any number of processes."""

    def for_launch(self, world_size: int) -> GameConfig:
        """The config with ``train.shards`` fixed for this launch (one noise stream per process by default)."""
        train = self.config.train
        if train.shards is not None:
            return self.config
        return dataclasses.replace(self.config, train=dataclasses.replace(train, shards=world_size))

    def quantize(self, teacher: nn.Module, quant: QuantConfig, ctx: MethodContext) -> tuple[nn.Module, dict[str, Any]]:
        self.config = self.for_launch(ctx.dist.world_size)
        trainer = Trainer(
            self,
            teacher,
            quant,
            num_classes=ctx.num_classes,
            input_size=ctx.input_size,
            seed=ctx.seed,
            run_dir=ctx.run_dir,
            evaluate=ctx.evaluate,
            progress=ctx.progress,
            dist=ctx.dist,
            model_name=ctx.model_name,
            input_stats=ctx.input_stats,
        )
        return trainer.run(resume=ctx.resume)
