"""ZeroQ-style data-free post-training quantization (Cai et al., CVPR 2020; github.com/amirgholami/ZeroQ).

1. Distil a batch of inputs from P alone: start from Gaussian noise and optimise the pixels with Adam
   so that P's per-layer BatchNorm input statistics match the stored running statistics (the BNS loss).
2. Observe Q's activation ranges on those inputs, freeze them. No fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from dfq.errors import DFQError
from dfq.generators import distill_inputs
from dfq.methods.base import Method, MethodContext, register_method
from dfq.quant import QuantConfig, calibrate, quantize_model

__all__ = ["ZeroQ", "ZeroQConfig"]


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
            raise DFQError(f"zeroq.calib_batch_size must be >= 0 (0: all at once), got {self.calib_batch_size}")


@register_method
class ZeroQ(Method):
    name = "zeroq"
    config_cls = ZeroQConfig
    description = "ZeroQ (CVPR'20): BNS-distilled inputs calibrate the activation ranges; no fine-tuning"

    def quantize(self, teacher: nn.Module, quant: QuantConfig, ctx: MethodContext) -> tuple[nn.Module, dict[str, Any]]:
        c = self.config
        q = quantize_model(teacher, quant)  # an unsupported layer is refused before the distillation
        images = distill_inputs(
            teacher, ctx.input_size, c.num_samples, steps=c.steps, lr=c.lr, generator=ctx.generator,
            input_stats=ctx.input_stats, progress=ctx.progress,
        )  # fmt: skip
        calibrate(q, images.split(c.calib_batch_size or len(images)))
        return q, {}
