"""The one seeding utility."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything"]


def seed_everything(seed: int, rank: int = 0, deterministic: bool = False) -> None:
    """Seed Python, NumPy and PyTorch with ``seed + rank``.

    ``deterministic`` also asks PyTorch for deterministic kernels (slower on GPU;
    CPU runs are already deterministic for a fixed thread count).
    """
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
