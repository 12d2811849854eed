"""Pure fake-quantization primitives (no state, no training logic).

Convention: ``x_hat = (clamp(round(x / scale + zp), qmin, qmax) - zp) * scale`` with
round-half-to-even. ``x / scale`` is computed as ``x * (1 / scale)`` as in
``torch.fake_quantize_per_*_affine``. The zero point is added *before* rounding,
as in the papers' formula: at exact ties (``x / scale`` ending in .5) with an odd
zero point this picks the neighbour that the papers pick, where PyTorch and ONNX
(which round first) pick the other one. Everywhere else the results are equal.

The DFQ papers' asymmetric quantizer (GDFQ's official code and its successors) writes the same grid
with an inverse step ``s = (2^k - 1) / (hi - lo)`` and a signed integer range;
:func:`choose_qparams` returns the equivalent (scale, zero_point) on the unsigned
grid ``[0, 2^k - 1]``, and the gradient is the papers' plain straight-through
estimator: identity for x, with no mask on clamped elements.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "bernoulli_mask",
    "choose_qparams",
    "dequantize_affine",
    "fake_quantize",
    "lsq_fake_quantize",
    "quantize_affine",
    "round_ste",
]

_EPS = 1e-8  # the papers' floor on (hi - lo)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient in the backward pass.

    Example:
        >>> x = torch.tensor([0.5, 1.5, 2.4], requires_grad=True)
        >>> round_ste(x).sum().backward(); x.grad
        tensor([1., 1., 1.])
    """
    return _RoundSTE.apply(x)


def choose_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Grid for the range ``[lo, hi]`` (tensors of any shape, e.g. one per channel).

    Asymmetric (the papers'): ``2^k`` levels with step ``(hi - lo) / (2^k - 1)``,
    the lowest level at ``round(lo / step) * step``, unsigned integers.
    Symmetric: zero point 0; unsigned ``[0, 2^k - 1]`` when ``lo >= 0`` everywhere
    (post-ReLU activations), otherwise the signed narrow grid ``[-(2^(k-1) - 1), 2^(k-1) - 1]``.

    Returns:
        ``(scale, zero_point, qmin, qmax)``; ``zero_point`` is a float tensor holding integers.
    """
    lo, hi = lo.detach().float(), hi.detach().float()
    if not symmetric:
        qmax = 2**bits - 1
        scale = torch.clamp(hi - lo, min=_EPS) / qmax
        zero_point = -torch.round(lo * (1.0 / scale))
        return scale, zero_point, 0, qmax
    if bool((lo >= 0).all()):
        qmin, qmax = 0, 2**bits - 1
        bound = hi
    else:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax
        bound = torch.maximum(lo.abs(), hi.abs())
    scale = torch.clamp(bound, min=_EPS) / qmax
    return scale, torch.zeros_like(scale), qmin, qmax


def quantize_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, divide: bool = False
) -> torch.Tensor:
    """Integer codes of ``x`` (as floats), clamped to ``[qmin, qmax]``. No gradient.

    ``divide`` computes ``x / scale`` as ONNX ``QuantizeLinear`` does, instead of
    ``x * (1 / scale)``; the two differ in the last bit, which decides exact ties.
    """
    scaled = x / scale if divide else x * (1.0 / scale)
    return torch.clamp(torch.round(scaled + zero_point), qmin, qmax)


def bernoulli_mask(
    shape: torch.Size | tuple[int, ...],
    p: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean mask whose elements are independently ``True`` with probability ``p``.

    Where ``p`` is a multiple of 1/256 (QDrop's 0.5), one random byte per element, eight drawn at once as a 64-bit
    integer, instead of ``torch.rand(shape) < p``'s 32-bit draw per element: on CPU those draws were the largest
    single cost of ``recon``'s steps on CIFAR models. Other ``p`` take the ``torch.rand`` path. The device defaults to
    the generator's.
    """
    if device is None and generator is not None:
        device = generator.device
    threshold = p * 256
    if p <= 0 or p >= 1 or threshold != int(threshold):
        return torch.rand(shape, generator=generator, device=device) < p
    n = math.prod(shape)
    words = torch.empty((n + 7) // 8, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)  # the whole int64 range: every byte uniform
    return words.view(torch.uint8)[:n].view(shape) < int(threshold)


def dequantize_affine(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Real values of integer codes."""
    return (q - zero_point) * scale


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, divide):  # type: ignore[override]
        # quantize_affine then dequantize_affine in place on one buffer: the same operations, one allocation, not six
        out = x / scale if divide else x * (1.0 / scale)
        return out.add_(zero_point).round_().clamp_(qmin, qmax).sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None, None, None, None


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, divide: bool = False
) -> torch.Tensor:
    """``dequantize_affine(quantize_affine(x))`` with the identity straight-through gradient for ``x``.

    ``scale`` and ``zero_point`` broadcast against ``x`` (shape them ``(C, 1, 1, 1)``
    for per-output-channel conv weights). The gradient is not masked outside the
    clamp range, as in the DFQ papers' quantizer.
    """
    return _FakeQuantizeSTE.apply(x, scale, zero_point, qmin, qmax, divide)


class _LSQFakeQuantize(torch.autograd.Function):
    """LSQ's forward and its gradients in one function, with QDrop's select: it keeps two tensors for the backward
    (the straight-through mask and the step's per-element gradient), where autograd through the composed operations
    kept the input, the codes and clamp's masks and made about twenty passes over every activation."""

    @staticmethod
    def forward(ctx, x, step, zero_point, qmin, qmax, grad_scale, divide, keep):  # type: ignore[override]
        scaled = x / step if divide else x * (1.0 / step)
        codes = (scaled + zero_point).round_()
        inside = (codes >= qmin).logical_and_(codes <= qmax)  # where the clamp passes x's gradient
        q = codes.clamp_(qmin, qmax).sub_(zero_point)
        out = q * step
        # d out / d step: q - x / step inside the clamp range, q at its ends (Esser et al., eq. 3)
        dstep = q.sub_(scaled.mul_(inside))
        if keep is not None:  # QDrop: the kept elements are x itself, with x's gradient and none for the step
            out = torch.where(keep, x, out)
            dstep.masked_fill_(keep, 0.0)
            inside.logical_or_(keep)
        ctx.save_for_backward(inside, dstep)
        ctx.step_shape, ctx.grad_scale = step.shape, grad_scale
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        inside, dstep = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_step = (grad * dstep).sum_to_size(ctx.step_shape) * ctx.grad_scale if ctx.needs_input_grad[1] else None
        return grad_x, grad_step, None, None, None, None, None, None


def lsq_fake_quantize(
    x: torch.Tensor,
    step: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_scale: float,
    divide: bool = False,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake quantization with a trainable ``step`` (LSQ, Esser et al. 2020).

    ``x`` gets the straight-through gradient inside the clamp range and none outside it;
    ``step`` (broadcasting against ``x``: a scalar, or one per output channel) gets LSQ's gradient multiplied by
    ``grad_scale`` (LSQ uses ``1/sqrt(numel * qmax)`` so that steps and weights learn at comparable rates).
    ``keep`` (QDrop, Wei et al. 2022): a boolean mask of the elements left in float, which pass ``x`` and its
    gradient through unchanged.
    """
    return _LSQFakeQuantize.apply(x, step, zero_point, qmin, qmax, grad_scale, divide, keep)
