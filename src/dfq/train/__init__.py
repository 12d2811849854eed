"""The training loop of the generator-based methods, as a small package.

- :mod:`~dfq.train.loop`: :class:`Trainer`, the epochs, schedules, evaluation, rollback and stop signals;
- :mod:`~dfq.train.game`: :class:`Game`, the models, optimizers and the steps a method's iteration calls;
- :mod:`~dfq.train.state`: resumable state, checkpoints and ``metrics.jsonl``;
- :mod:`~dfq.train.plugins`: the plug-ins as hook objects; :mod:`~dfq.train.average`: ``train.ema_decay``;
- :mod:`~dfq.train.config`, :mod:`~dfq.train.outputs`: the ``train``/``generator`` settings, a batch's outputs.

It receives a method object (its losses and the order of its steps) and an evaluation callback; it never names
a method, never imports :mod:`dfq.methods` or :mod:`dfq.config`, and never reads real data.
"""

from dfq.train.config import GeneratorConfig, TrainConfig
from dfq.train.game import Game
from dfq.train.loop import Evaluator, RunInterrupted, Trainer, multistep_lr
from dfq.train.outputs import Outputs
from dfq.train.plugins import PluginConfig
from dfq.train.state import TRAIN_CHECKPOINT, TrainState, read_train_checkpoint

__all__ = [
    "TRAIN_CHECKPOINT",
    "Evaluator",
    "Game",
    "GeneratorConfig",
    "Outputs",
    "PluginConfig",
    "RunInterrupted",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "multistep_lr",
    "read_train_checkpoint",
]
