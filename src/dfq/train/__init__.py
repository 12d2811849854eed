"""The training loop of the generator-based methods: schedule, game steps, checkpoints, plug-ins.

It receives a method object (its losses and the order of its steps) and an evaluation callback; it
never names a method and never reads real data.
"""

from dfq.train.config import GeneratorConfig, TrainConfig
from dfq.train.engine import TRAIN_CHECKPOINT, Engine, Evaluator, RunInterrupted, read_train_checkpoint
from dfq.train.outputs import Outputs
from dfq.train.plugins import PluginConfig

__all__ = [
    "TRAIN_CHECKPOINT",
    "Engine",
    "Evaluator",
    "GeneratorConfig",
    "Outputs",
    "PluginConfig",
    "RunInterrupted",
    "TrainConfig",
    "read_train_checkpoint",
]
