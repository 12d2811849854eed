"""ZeroQ-style data-free post-training quantization (Cai et al., CVPR 2020).

1. Distil a batch of inputs from P alone: start from Gaussian noise and optimise
   the pixels with Adam so that P's per-layer BatchNorm input statistics match
   the stored running statistics (the BNS loss of METHODS.md §1.6).
2. Observe Q's activation ranges on those inputs, freeze them. No fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from dfq.errors import DFQError
from dfq.generators import BNStatsLoss
from dfq.quant import QuantConfig, calibrate, quantize_model

__all__ = ["ZeroQConfig", "distill_inputs", "zeroq"]


@dataclass
class ZeroQConfig:
    """Attributes:
    num_samples: number of distilled inputs.
    steps: Adam steps on the inputs.
    lr: Adam learning rate.
    calib_batch_size: batch size of the range-observation forwards (0: all samples at once).
    """

    num_samples: int = 32
    steps: int = 500
    lr: float = 0.5
    calib_batch_size: int = 0

    def __post_init__(self) -> None:
        for key in ("num_samples", "steps"):
            if getattr(self, key) < 1:
                raise DFQError(f"zeroq.{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise DFQError(f"zeroq.lr must be > 0, got {self.lr}")
        if self.calib_batch_size < 0:
            raise DFQError(f"zeroq.calib_batch_size must be >= 0 (0: all samples at once), got {self.calib_batch_size}")


def distill_inputs(
    teacher: nn.Module,
    input_size: tuple[int, ...],
    config: ZeroQConfig,
    *,
    generator: torch.Generator | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """Optimise ``config.num_samples`` inputs against the teacher's BNS loss.

    The teacher is used in eval mode and its parameters get no gradient.
    """
    teacher.eval()
    device = next(teacher.parameters()).device
    x = torch.randn((config.num_samples, *input_size), generator=generator).to(device).requires_grad_()
    opt = torch.optim.Adam([x], lr=config.lr)
    frozen = [p for p in teacher.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with BNStatsLoss(teacher) as bns, tqdm(range(config.steps), desc="zeroq: distil", disable=not progress) as bar:
            for step in bar:
                opt.zero_grad(set_to_none=True)
                teacher(x)
                loss = bns.loss()
                loss.backward()
                opt.step()
                if step % 25 == 0 or step == config.steps - 1:
                    value = loss.item()
                    bar.set_postfix(bns=f"{value:.4f}")
                    if on_step:
                        on_step(step, value)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return x.detach()


def zeroq(
    teacher: nn.Module,
    quant_config: QuantConfig,
    config: ZeroQConfig,
    input_size: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> tuple[nn.Module, torch.Tensor]:
    """Quantize ``teacher`` with ranges calibrated on distilled inputs; returns (Q, inputs)."""
    images = distill_inputs(teacher, input_size, config, generator=generator, progress=progress)
    q = quantize_model(teacher, quant_config)
    bs = config.calib_batch_size or len(images)
    calibrate(q, images.split(bs))
    return q, images
