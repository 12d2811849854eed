"""The one seeding utility."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch with ``seed``.

    A CPU run is then bit-identical from process to process for a fixed thread count once MKL's code path is
    pinned (``MKL_CBWR=COMPATIBLE``; unpinned, MKL's vector maths can differ between processes:
    benchmarks/results/determinism.json).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
