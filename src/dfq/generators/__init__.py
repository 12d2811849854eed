"""Synthetic-data generators and the losses that shape them (they see P, never real data)."""

from dfq.generators.bns import BNStatsLoss

__all__ = ["BNStatsLoss"]
