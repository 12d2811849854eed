"""Stateful quantizers: the weight quantizer and the activation quantizer.

All state that matters after training (ranges, lifecycle, observer counters)
lives in buffers, so it is saved in and restored from checkpoints.
"""

from __future__ import annotations

from enum import IntEnum

import torch
from torch import nn

from dfq.errors import DFQError
from dfq.quant.functional import choose_qparams, fake_quantize
from dfq.quant.spec import Granularity, QuantSpec

__all__ = ["OBSERVERS", "ActMode", "ActQuantizer", "WeightQuantizer"]

_TIE_MARGIN = 1.0 + 2.0**-14


class WeightQuantizer(nn.Module):
    """Min/max range recomputed from the current weights at every forward (the papers' choice).

    Per-channel ranges are taken over all dimensions but the first (conv output
    channels, linear output features).
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.spec.is_noop:
            return w
        scale, zero_point, qmin, qmax = self.qparams(w)
        return fake_quantize(w, scale, zero_point, qmin, qmax, self.spec.deploy)

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Grid of ``w``, shaped to broadcast against it."""
        w = w.detach()
        if self.spec.granularity is Granularity.PER_CHANNEL:
            flat = w.reshape(w.shape[0], -1)
            shape = (-1,) + (1,) * (w.dim() - 1)
            lo, hi = flat.amin(dim=1).reshape(shape), flat.amax(dim=1).reshape(shape)
        else:
            lo, hi = w.min(), w.max()
        if self.spec.deploy:  # signed codes even for all-positive weights: int8 storage
            lo = torch.minimum(lo, -hi.abs())
        return choose_qparams(lo, hi, self.spec.bits, self.spec.symmetric)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, symmetric={self.spec.symmetric}, {self.spec.granularity.value}"


class ActMode(IntEnum):
    """Lifecycle of an activation quantizer. Stored in a buffer, so checkpoints know it."""

    OBSERVE = 0  # update the range from each batch, then quantize with it
    FROZEN = 1  # quantize with the stored range
    DISABLED = 2  # pass through (float reference)
    # room for LEARNED = 3 (trainable range)


# Range observers for OBSERVE mode.
# - "ema": exponential moving average of batch min/max with Adam-style bias
#   correction (the corrected value is derived, the raw average is stored).
# - "paper": the DFQ papers' update, which stores the bias-corrected value and
#   corrects it again at every step (inflates ranges ~4000x early on; METHODS.md §1.4).
# - "minmax": all-time running min/max (ZAQ).
OBSERVERS = ("ema", "paper", "minmax")


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer with an explicit observe -> frozen lifecycle."""

    def __init__(self, spec: QuantSpec, observer: str = "ema", momentum: float = 0.9) -> None:
        super().__init__()
        if observer not in OBSERVERS:
            raise DFQError(f"unknown activation observer '{observer}'; choose one of {', '.join(OBSERVERS)}")
        if spec.granularity is not Granularity.PER_TENSOR:
            raise DFQError("activation quantizers are per-tensor")
        self.spec = spec
        self.observer = observer
        self.momentum = momentum
        self.register_buffer("mode", torch.tensor(int(ActMode.OBSERVE), dtype=torch.uint8))
        self.register_buffer("lo", torch.zeros(()))  # range used for quantization
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("raw_lo", torch.zeros(()))  # observer state (EMA accumulators)
        self.register_buffer("raw_hi", torch.zeros(()))
        self.register_buffer("beta_t", torch.ones(()))  # momentum ** num_updates
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def set_mode(self, mode: ActMode) -> None:
        self.mode.fill_(int(mode))

    def get_mode(self) -> ActMode:
        return ActMode(int(self.mode))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.get_mode()
        if mode is ActMode.DISABLED or self.spec.is_noop:
            return x
        if mode is ActMode.OBSERVE:
            self.observe(x)
        elif int(self.num_updates) == 0:
            raise DFQError("activation quantizer is frozen but was never calibrated; observe data first")
        return fake_quantize(x, *self.qparams(), self.spec.deploy)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """``(scale, zero_point, qmin, qmax)`` of the current range.

        Under the deploy protocol (``spec.deploy``) the step is widened by 2^-14 (relative).
        A range observed on a single batch is a data value, so an exact multiple of the
        previous layer's accumulator step, and then some outputs fall exactly halfway
        between two codes, where PyTorch's float arithmetic and an integer kernel's
        requantization break the tie differently. The margin moves those ties a distance
        far above float rounding error; the range grows by 0.006%.
        """
        scale, zero_point, qmin, qmax = choose_qparams(self.lo, self.hi, self.spec.bits, self.spec.symmetric)
        if self.spec.deploy:
            scale = scale * _TIE_MARGIN
        return scale, zero_point, qmin, qmax

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold one batch's min/max into the range."""
        b_lo, b_hi = x.detach().min().float(), x.detach().max().float()
        first = int(self.num_updates) == 0
        if self.observer == "minmax":
            self.lo.copy_(b_lo if first else torch.minimum(self.lo, b_lo))
            self.hi.copy_(b_hi if first else torch.maximum(self.hi, b_hi))
        else:
            beta = self.momentum
            self.beta_t.mul_(beta)
            self.raw_lo.mul_(beta).add_((1 - beta) * b_lo)
            self.raw_hi.mul_(beta).add_((1 - beta) * b_hi)
            correction = 1 - self.beta_t
            if self.observer == "paper":
                # The stored value is the corrected one and is corrected again next step.
                self.raw_lo.div_(correction)
                self.raw_hi.div_(correction)
                self.lo.copy_(self.raw_lo)
                self.hi.copy_(self.raw_hi)
            else:
                self.lo.copy_(self.raw_lo / correction)
                self.hi.copy_(self.raw_hi / correction)
        self.num_updates += 1

    def extra_repr(self) -> str:
        return (
            f"bits={self.spec.bits}, symmetric={self.spec.symmetric}, observer={self.observer}, "
            f"mode={self.get_mode().name.lower()}, range=[{float(self.lo):.4g}, {float(self.hi):.4g}]"
        )
