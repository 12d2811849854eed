"""Synthetic-data generators and the losses that shape them (they see P, never real data)."""

from dfq.generators.bns import BNStatsLoss
from dfq.generators.filters import lowpass
from dfq.generators.nets import (
    CifarGenerator,
    ConditionalBatchNorm2d,
    ImageNetGenerator,
    UnconditionalGenerator,
    create_generator,
    list_generators,
)

__all__ = [
    "BNStatsLoss",
    "CifarGenerator",
    "ConditionalBatchNorm2d",
    "ImageNetGenerator",
    "UnconditionalGenerator",
    "create_generator",
    "list_generators",
    "lowpass",
]
