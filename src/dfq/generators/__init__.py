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
from dfq.generators.synthesis import InputStats, LatentDecoder, distill_inputs, synthesize_pool, to_input_space

__all__ = [
    "BNStatsLoss",
    "CifarGenerator",
    "ConditionalBatchNorm2d",
    "ImageNetGenerator",
    "InputStats",
    "LatentDecoder",
    "UnconditionalGenerator",
    "create_generator",
    "distill_inputs",
    "list_generators",
    "lowpass",
    "synthesize_pool",
    "to_input_space",
]
