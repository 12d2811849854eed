"""Stateful quantizers: the weight quantizer and the activation quantizer.

All state that matters after training (ranges, lifecycle, observer counters)
lives in buffers, so it is saved in and restored from checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import IntEnum

import torch
from torch import nn

from dfq.errors import DFQError
from dfq.quant.functional import bernoulli_mask, choose_qparams, fake_quantize, lsq_fake_quantize
from dfq.quant.spec import Granularity, QuantSpec

__all__ = ["OBSERVERS", "ActMode", "ActQuantizer", "WeightQuantizer"]

_TIE_MARGIN = 1.0 + 2.0**-14

# Smallest symmetric per-channel weight step, relative to the layer's largest (see WeightQuantizer.minmax_qparams).
STEP_FLOOR = 2.0**-12


class WeightQuantizer(nn.Module):
    """Weight fake quantization, per output channel or per tensor.

    By default the range is the min/max of the current weights at every forward (the
    papers' choice). With ``stored_shape`` the grid (scale, zero point, code range) lives
    in buffers instead, so a learned grid survives in checkpoints; it starts as the min/max
    grid of the weights given to :meth:`store`.

    Learned rounding (AdaRound, Nagel et al. 2020) with a learned step (LSQ): between
    :meth:`begin_rounding` and :meth:`end_rounding` the weight is
    ``s * (clamp(floor(w / s0) + h(alpha) + zp, qmin, qmax) - zp)`` with the base integer
    fixed at the initial step ``s0`` (as Genie does, so step and rounding do not fight)
    and ``h`` a rectified sigmoid in [0, 1]; the end rounds ``h`` to 0/1 and writes the
    result into the weight, which then lies exactly on the stored grid.
    """

    def __init__(self, spec: QuantSpec, stored_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.stored = stored_shape is not None
        if stored_shape is not None:
            self.register_buffer("scale", torch.ones(stored_shape))
            self.register_buffer("zero_point", torch.zeros(stored_shape))
            self.register_buffer("code_range", torch.zeros(2, dtype=torch.long))
        self.alpha: nn.Parameter | None = None
        self.learns_step = False
        self.soft_rounding = False  # while rounding learns: h(alpha) in [0, 1]; else the hard 0/1 decision
        self.step_floor: Callable[[], torch.Tensor | None] | None = None

    def set_step_floor(self, floor: Callable[[], torch.Tensor | None] | None) -> None:
        """The smallest step of each output channel that something outside the weights needs (under the deploy
        protocol: the bias must fit in int32 on the accumulator grid, see
        :meth:`dfq.quant.modules.QuantConv2d.bias_step_floor`). It binds only on steps below it."""
        self.step_floor = floor

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.spec.is_noop:
            return w
        if self.alpha is not None:
            return self._soft_rounded(w)
        if self.learns_step:
            qmin, qmax = int(self.code_range[0]), int(self.code_range[1])
            g = 1.0 / math.sqrt(w[0].numel() * max(qmax, 1))
            return lsq_fake_quantize(w, self.step, self.zero_point, qmin, qmax, g, self.spec.deploy)
        scale, zero_point, qmin, qmax = self.qparams(w)
        return fake_quantize(w, scale, zero_point, qmin, qmax, self.spec.deploy)

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Grid of ``w``, shaped to broadcast against it (while a step learns: the learned step)."""
        if self.stored:
            scale = self.step.detach().abs().clamp(min=1e-8) if hasattr(self, "step") else self.scale
            return self._floored(scale), self.zero_point, int(self.code_range[0]), int(self.code_range[1])
        scale, zero_point, qmin, qmax = self.minmax_qparams(w)
        return self._floored(scale), zero_point, qmin, qmax

    def _floored(self, scale: torch.Tensor) -> torch.Tensor:
        floor = self.step_floor() if self.step_floor is not None and self.spec.symmetric else None
        if floor is None:
            return scale
        floor = floor.to(scale).reshape(scale.shape) if scale.numel() == floor.numel() else floor.max().to(scale)
        return torch.maximum(scale, floor)

    def minmax_qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The min/max grid of ``w``.

        A dead channel of a symmetric per-channel grid, one whose weights all lie below half of
        ``STEP_FLOOR`` (2^-12) times the layer's largest step, gets that floor as its step. Trained
        networks have such channels (EfficientNet-Lite0: weights ~1e-9, BatchNorm variance 0) whose own
        step would be ~1e-11; an integer runtime adds the bias on the grid ``s_x * s_w``, and on such a
        step it overflows int32. On the floor their weights round to code 0, so the channel computes
        only its bias, as it practically did. Every other channel keeps its own step (ResNet-20's
        smallest is 2^-8 of its largest).
        """
        w = w.detach()
        if self.spec.granularity is Granularity.PER_CHANNEL:
            flat = w.reshape(w.shape[0], -1)
            shape = (-1,) + (1,) * (w.dim() - 1)
            lo, hi = flat.amin(dim=1).reshape(shape), flat.amax(dim=1).reshape(shape)
        else:
            lo, hi = w.min(), w.max()
        if self.spec.deploy:  # signed codes even for all-positive weights: int8 storage
            lo = torch.minimum(lo, -hi.abs())
        scale, zero_point, qmin, qmax = choose_qparams(lo, hi, self.spec.bits, self.spec.symmetric)
        if self.spec.symmetric and self.spec.granularity is Granularity.PER_CHANNEL:
            floor = scale.max() * STEP_FLOOR
            scale = torch.where(torch.maximum(lo.abs(), hi.abs()) < floor / 2, floor, scale)
        return scale, zero_point, qmin, qmax

    @torch.no_grad()
    def store(self, w: torch.Tensor) -> None:
        """Set the stored grid to the min/max grid of ``w``."""
        scale, zero_point, qmin, qmax = self.minmax_qparams(w)
        self.scale.copy_(scale.expand_as(self.scale))
        self.zero_point.copy_(zero_point.expand_as(self.zero_point))
        self.code_range.copy_(torch.tensor([qmin, qmax]))

    # -- learned step (LSQ) ------------------------------------------------------------------
    @torch.no_grad()
    def begin_step_learning(self, w: torch.Tensor) -> nn.Parameter:
        """Store the min/max grid of ``w`` and make its step trainable (the weight keeps training
        through the rounding's straight-through gradient); returns the step."""
        if not self.stored:
            raise DFQError("learned weight steps need stored weight scales (quant.weight_scales: stored)")
        self.store(w)
        self.step = nn.Parameter(self.scale.clone())
        self.learns_step = True
        return self.step

    @torch.no_grad()
    def end_step_learning(self) -> None:
        """Keep the learned step as the stored grid."""
        self.scale.copy_(self.step.detach().abs().clamp(min=1e-8))
        del self.step
        self.learns_step = False

    # -- learned rounding ------------------------------------------------------------------
    _ZETA, _GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid

    def _h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (self._ZETA - self._GAMMA) + self._GAMMA, 0, 1)

    @torch.no_grad()
    def begin_rounding(self, w: torch.Tensor, start: torch.Tensor | None = None) -> list[nn.Parameter]:
        """Start learning the rounding and the step of ``w``; returns the new parameters.

        Without ``start`` the soft rounding starts at the float weight. With ``start`` (weights of ``w``'s shape,
        such as GPTQ's compensated weights) each weight chooses between the two grid points around its ``start``
        value and leans 0.9 to 0.1 towards the one ``start`` rounds to, so the hard rounding begins at
        ``start``'s."""
        if not self.stored:
            raise DFQError("learned rounding needs stored weight scales (quant.weight_scales: stored)")
        scale = self.qparams(w)[0]
        if start is None:
            self._base = torch.floor(w.detach() / scale)
            rest = (w.detach() / scale - self._base).clamp(0.01, 0.99)  # h(alpha) = rest: start at the float weight
        else:
            self._base = torch.floor(start.detach() / scale)
            rest = 0.1 + 0.8 * (torch.round(start.detach() / scale) > self._base).to(w.dtype)
        self.alpha = nn.Parameter(-torch.log((self._ZETA - self._GAMMA) / (rest - self._GAMMA) - 1))
        self.step = nn.Parameter(scale.clone())
        self.soft_rounding = True
        return [self.alpha, self.step]

    def _soft_rounded(self, w: torch.Tensor) -> torch.Tensor:
        qmin, qmax = int(self.code_range[0]), int(self.code_range[1])
        h = self._h() if self.soft_rounding else (self.alpha >= 0).to(w.dtype)
        codes = torch.clamp(self._base + h + self.zero_point, qmin, qmax)
        return (codes - self.zero_point) * self.step

    def rounding_loss(self, beta: float) -> torch.Tensor:
        """AdaRound's regulariser: pushes every h(alpha) to 0 or 1 as ``beta`` anneals down."""
        return (1 - (2 * self._h() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def end_rounding(self, weight: nn.Parameter) -> None:
        """Round h to 0/1, store the learned step and write the quantized values into ``weight``."""
        self.scale.copy_(self.step.detach().abs().clamp(min=1e-8))
        self.step.copy_(self.scale)  # the weight is written with the stored (positive) step
        self.soft_rounding = False
        weight.copy_(self._soft_rounded(weight))
        self.alpha = None
        del self.step, self._base

    def extra_repr(self) -> str:
        kind = ", stored grid" if self.stored else ""
        return f"bits={self.spec.bits}, symmetric={self.spec.symmetric}, {self.spec.granularity.value}{kind}"


class ActMode(IntEnum):
    """Lifecycle of an activation quantizer. Stored in a buffer, so checkpoints know it."""

    OBSERVE = 0  # update the range from each batch, then quantize with it
    FROZEN = 1  # quantize with the stored range
    DISABLED = 2  # pass through (float reference)
    LEARNED = 3  # quantize with a trainable step (LSQ), between begin_learning and end_learning


# Range observers for OBSERVE mode.
# - "ema": exponential moving average of batch min/max with Adam-style bias
#   correction (the corrected value is derived, the raw average is stored).
# - "paper": the DFQ papers' update, which stores the bias-corrected value and
#   corrects it again at every step (inflates ranges ~4000x early on; docs/methods.md, the shared protocol).
# - "minmax": all-time running min/max (ZAQ).
OBSERVERS = ("ema", "paper", "minmax")


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer with an explicit observe -> frozen lifecycle.

    ``drop_prob`` (QDrop, Wei et al. 2022): in LEARNED mode and training, each element is
    left in float with this probability.

    ``reduce_range``: maps a batch's ``(min, max)`` to the range to observe; a data-parallel run
    sets it to the min/max over all processes, so every process observes the global batch.

    ``fixed_range``: a range known without data (the model input's, from its preprocessing: 0..255 for raw
    pixels). The quantizer starts calibrated on it and keeps it: observing does not move it, and the methods
    neither clip nor learn it (``fixed`` is True).
    """

    drop_prob: float = 0.0
    reduce_range: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def __init__(
        self, spec: QuantSpec, observer: str = "ema", momentum: float = 0.9,
        fixed_range: tuple[float, float] | None = None,
    ) -> None:  # fmt: skip
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
        self.fixed = fixed_range is not None
        if fixed_range is not None:
            lo, hi = fixed_range
            if not lo < hi:
                raise DFQError(f"a fixed activation range needs low < high, got [{lo}, {hi}]")
            self.lo.fill_(lo)
            self.hi.fill_(hi)
            self.num_updates.fill_(1)

    def set_mode(self, mode: ActMode) -> None:
        self.mode.fill_(int(mode))

    def get_mode(self) -> ActMode:
        return ActMode(int(self.mode))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # codes from float32 arithmetic, whatever the precision of the layer before
        mode = self.get_mode()
        if mode is ActMode.DISABLED or self.spec.is_noop:
            return x
        if mode is ActMode.LEARNED:
            return self._lsq(x)
        if mode is ActMode.OBSERVE:
            self.observe(x)
        elif int(self.num_updates) == 0:
            raise DFQError("activation quantizer is frozen but was never calibrated; observe data first")
        return fake_quantize(x, *self.qparams(), self.spec.deploy)

    # -- learned step (LSQ, Esser et al. 2020) ---------------------------------------------
    def begin_learning(self) -> nn.Parameter:
        """Make the step trainable, starting from the current range; returns it."""
        if int(self.num_updates) == 0:
            raise DFQError("calibrate an activation quantizer before learning its step")
        scale, zero_point, qmin, qmax = self.qparams()
        self.step = nn.Parameter(scale.detach().clone())
        self._grid = (zero_point.detach(), qmin, qmax)
        self.set_mode(ActMode.LEARNED)
        return self.step

    def _lsq(self, x: torch.Tensor) -> torch.Tensor:
        zero_point, qmin, qmax = self._grid
        g = 1.0 / math.sqrt(x[0].numel() * max(qmax, 1))  # LSQ's gradient scale for the step
        keep = bernoulli_mask(x.shape, self.drop_prob, device=x.device) if self.training and self.drop_prob else None
        return lsq_fake_quantize(x, self.step, zero_point, qmin, qmax, g, self.spec.deploy, keep)

    @torch.no_grad()
    def end_learning(self) -> None:
        """Freeze the learned step as this quantizer's range (so :meth:`qparams` gives it back)."""
        zero_point, qmin, qmax = self._grid
        step = self.step.abs().clamp(min=1e-8) / (_TIE_MARGIN if self.spec.deploy else 1.0)
        self.lo.copy_((qmin - zero_point) * step)
        self.hi.copy_((qmax - zero_point) * step)
        del self.step, self._grid
        self.set_mode(ActMode.FROZEN)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """``(scale, zero_point, qmin, qmax)`` of the current range.

        Under the deploy protocol (``spec.deploy``) the step is widened by 2^-14 (relative).
        A range observed on a single batch is a data value, so an exact multiple of the
        previous layer's accumulator step, and then some outputs fall exactly halfway
        between two codes, where PyTorch's float arithmetic and an integer kernel's
        requantization break the tie differently. The margin moves those ties a distance
        far above float rounding error; the range grows by 0.006%.

        In LEARNED mode: the learned step, as the forward uses it.
        """
        if hasattr(self, "_grid"):  # between begin_learning and end_learning
            zero_point, qmin, qmax = self._grid
            return self.step.detach().abs().clamp(min=1e-8), zero_point, qmin, qmax
        scale, zero_point, qmin, qmax = choose_qparams(self.lo, self.hi, self.spec.bits, self.spec.symmetric)
        if self.spec.deploy:
            scale = scale * _TIE_MARGIN
        return scale, zero_point, qmin, qmax

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold one batch's min/max into the range (a fixed range stays as it is)."""
        if self.fixed:
            return
        b_lo, b_hi = x.detach().min().float(), x.detach().max().float()
        if self.reduce_range is not None:
            b_lo, b_hi = self.reduce_range(b_lo, b_hi)
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
