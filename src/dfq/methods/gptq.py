"""GPTQ on a synthesized pool: one-shot weight rounding with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023, the fast form of Optimal Brain Quantization (Frantar and Alistarh, "Optimal Brain
Compression", NeurIPS 2022, whose experiments are CNNs). For a layer with inputs ``X`` (one column per output
position) it minimises ``||W X - Ŵ X||²`` over the grid: the weights are quantized one input column at a time and
the error each column makes is spread over the columns not yet quantized, through the inverse of the Hessian
``H = X Xᵀ``. With ``U`` the upper Cholesky factor of ``H⁻¹``, quantizing column ``i`` updates the rest by
``-(w_i - q_i) / U_ii · U_i,>i`` (the paper's Algorithm 1: lazy updates in blocks of columns, a dampening of
``damp`` times the mean diagonal, and "act-order", the columns with the largest ``H_ii`` first).

What dfq adds around it is what ``recon`` does: the pool is synthesized from P's BatchNorm statistics
(:func:`dfq.generators.synthesize_pool`), the activation ranges are calibrated on it and shrunk to their
least-error clip, and every weight grid starts at its least-error clip. The layers are then quantized in the
order they run, each from the inputs Q (with the layers before it already quantized) gives it, the sequential
form of the OBC paper. Convolutions are unfolded into their patches; a grouped or depthwise convolution has one
Hessian per group (9 or 25 weights per channel on a depthwise 3x3 or 5x5), all solved in one batch. No gradient
steps: on EfficientNet-Lite0 at W4A8 (8-bit depthwise layers) it fits a pool in about two minutes, better than
``recon``'s reconstruction does in 15-30; at W4A4 on ResNet-20, where the activation grids matter, ``recon`` stays
ahead (docs/results.md, "GPTQ: 4-bit weights in minutes").

Deviations: the grid is dfq's (per-channel, fixed before GPTQ, as the paper's per-row grid), and the activation
quantizers stay at their calibrated ranges (GPTQ's own experiments quantize weights only). ``grid_search`` adds a
choice of each row's grid by the output error its rounding leaves on the pool: it helps where the pool's input
correlations resemble real data's (CIFAR ResNets, Lite0 on photos), not on Lite0's synthetic pools, so it is off.
``act_search`` then rescales the activation grids below 8 bits by the logits' error on the pool (ResNet-20 W4A4
gains; it costs 42 forwards of the pool per site, so it is off too).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dfq.errors import DFQError
from dfq.generators import synthesize_pool
from dfq.methods.base import Method, MethodContext, register_method
from dfq.quant import QuantConfig, quantize_model
from dfq.quant.api import weight_quantizers
from dfq.quant.clip import clipped_weight_grids, init_grids, least_output_error_act_ranges
from dfq.quant.quantizer import WeightQuantizer

__all__ = ["GPTQ", "GPTQConfig", "gptq_codes", "gptq_quantize", "gptq_round", "layer_hessian"]


@dataclass
class GPTQConfig:
    """Attributes:
    num_samples: size of the synthetic pool (the Hessians' inputs).
    synth_batch, synth_steps, synth_lr, bns_normalized, warm_decoder: the pool's synthesis, as ``recon``'s.
    damp: dampening added to each Hessian's diagonal, as a fraction of its mean (the paper's 1%).
    block: columns quantized between two lazy updates of the rest (the paper's 128; any value gives the same
        result up to float rounding).
    act_order: quantize the columns with the largest Hessian diagonal first.
    grid_search: round each row on every clip of its min/max grid (``CLIP_FACTORS``) and keep the one with the least
        output error on the pool, instead of the clip with the least error on the weights alone.
    act_search: once the weights are rounded, rescale each activation grid below 8 bits (0.5-1.5 times its
        least-error range, site by site in module order, two passes) to the one whose Q leaves the least squared error
        of the logits against P's on the pool. Costs 42 forwards of the pool per such site.
    """

    num_samples: int = 256
    synth_batch: int = 128
    synth_steps: int = 150
    synth_lr: float = 0.05
    bns_normalized: bool = False
    warm_decoder: bool = True
    damp: float = 0.01
    block: int = 128
    act_order: bool = True
    grid_search: bool = False
    act_search: bool = False

    def __post_init__(self) -> None:
        for key in ("num_samples", "synth_batch", "synth_steps", "block"):
            if getattr(self, key) < 1:
                raise DFQError(f"gptq.{key} must be >= 1, got {getattr(self, key)}")
        if not self.damp > 0:
            raise DFQError(f"gptq.damp must be > 0, got {self.damp}")


# -- the algorithm, on one batch of independent problems ------------------------------------------------------


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened ``H⁻¹``, batched (float64)."""
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    h = h + damp * h.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * eye
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise DFQError(f"the Hessian is not positive definite with {damp:g} dampening; raise method.damp") from None


@torch.no_grad()
def gptq_codes(
    w: torch.Tensor,
    h: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    *,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = True,
) -> torch.Tensor:
    """GPTQ's integer codes (as floats) of ``w``: ``(G, R, D)``, G independent groups of R rows sharing the
    ``(G, D, D)`` Hessian ``h``, each row on its own grid ``scale``/``zero_point`` (``(G, R)``), codes in
    ``[qmin, qmax]``. An input that is always zero (``H_ii = 0``) keeps no weight.

    Raises:
        DFQError: ``w`` or ``h`` holds NaN/Inf, or the dampened Hessian has no Cholesky factor.
    """
    return _gptq(w, h, scale, zero_point, qmin, qmax, damp=damp, block=block, act_order=act_order)[0]


def _gptq(
    w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, *,
    damp: float, block: int, act_order: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`gptq_codes` and the compensated weights, each column as it was when it was rounded (float64).

    Raises:
        DFQError: ``w`` or ``h`` holds NaN/Inf, or the dampened Hessian has no Cholesky factor.
    """
    if not (bool(torch.isfinite(h).all()) and bool(torch.isfinite(w).all())):
        raise DFQError("the weights or the Hessian of their inputs hold NaN/Inf (the pool overflows the model?)")
    w, h = w.double().clone(), h.double().clone()
    scale, zero_point = scale.double(), zero_point.double()
    dead = h.diagonal(dim1=-2, dim2=-1) == 0
    h.diagonal(dim1=-2, dim2=-1)[dead] = 1.0
    w.masked_fill_(dead[:, None, :], 0.0)
    d = w.shape[-1]
    if act_order:
        perm = h.diagonal(dim1=-2, dim2=-1).argsort(dim=-1, descending=True, stable=True)
    else:
        perm = torch.arange(d, device=w.device).expand(w.shape[0], d)
    w = w.gather(2, perm[:, None, :].expand_as(w))
    h = h.gather(1, perm[:, :, None].expand_as(h)).gather(2, perm[:, None, :].expand_as(h))
    u = _inverse_factor(h, damp)
    codes, compensated = torch.empty_like(w), torch.empty_like(w)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        errors = torch.empty_like(w[:, :, i1:i2])
        for i in range(i1, i2):
            col = compensated[:, :, i] = w[:, :, i]
            code = torch.clamp(torch.round(col / scale + zero_point), qmin, qmax)
            err = (col - (code - zero_point) * scale) / u[:, i, i][:, None]
            w[:, :, i:i2] -= err[:, :, None] * u[:, i, i:i2][:, None, :]
            codes[:, :, i], errors[:, :, i - i1] = code, err
        w[:, :, i2:] -= errors @ u[:, i1:i2, i2:]
    index = perm[:, None, :].expand_as(codes)  # back to the input order
    return torch.empty_like(codes).scatter_(2, index, codes), torch.empty_like(w).scatter_(2, index, compensated)


# -- Hessians of Q's layers ---------------------------------------------------------------------------------------


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as ``(G, D, positions)``: one column per output position, as its weight's rows read."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).T[None]
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise DFQError(f"gptq: {type(layer).__name__} with padding {layer.padding!r}/{layer.padding_mode} is not "
                       "supported; use the recon method")  # fmt: skip
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    g = layer.groups
    return cols.reshape(len(x), g, -1, cols.shape[-1]).permute(1, 2, 0, 3).reshape(g, cols.shape[1] // g, -1)


class _Captured(Exception):
    """Raised by the capture hook: the rest of the forward is not needed."""


def layer_hessian(q: nn.Module, layer: nn.Module, pool: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``Σ X Xᵀ`` (float64, ``(G, D, D)``) of what ``layer`` computes on inside Q (its input quantizer applied)
    over ``pool``; the forward stops at the layer."""
    hessian: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        cols = _patches(module, module._quantize_input(args[0].detach())).double()
        update = cols @ cols.transpose(1, 2)
        hessian.append(update if not hessian else hessian.pop() + update)
        raise _Captured

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for chunk in pool.split(batch_size):
                with contextlib.suppress(_Captured):
                    q(chunk)
    finally:
        handle.remove()
    if not hessian:
        raise DFQError(f"gptq: {type(layer).__name__} never ran in Q's forward")
    return hessian[0]


def _run_order(q: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module, WeightQuantizer]]:
    """Q's weighted layers (name, layer, weight quantizer) in the order its forward first calls them."""
    pairs = dict(weight_quantizers(q))
    names = {m: name for name, m in q.named_modules() if m in pairs}
    order: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda m, a: order.append(m) if m not in order else None) for m in pairs]
    try:
        with torch.no_grad():
            q(x)
    finally:
        for h in handles:
            h.remove()
    return [(names[m], m, pairs[m]) for m in order]


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t.reshape(groups, t.shape[0] // groups, *t.shape[1:])


def _candidate_grids(wq: WeightQuantizer, w: torch.Tensor, search: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(scale, zero_point)`` per row of the stored grid, and with ``search`` of the min/max grids of ``w`` clipped
    by each of ``CLIP_FACTORS``."""
    rows = w.shape[0]

    def per_row(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).expand(rows).clone() if t.numel() == 1 else t.reshape(rows).clone()

    grids = [tuple(per_row(t) for t in wq.qparams(w)[:2])]
    for _ in clipped_weight_grids(wq, w) if search else ():
        grids.append(tuple(per_row(t) for t in wq.qparams(w)[:2]))
    return grids


@torch.no_grad()
def quantize_layer(
    name: str, layer: nn.Module, wq: WeightQuantizer, hessian: torch.Tensor, config: GPTQConfig
) -> torch.Tensor:
    """Write GPTQ's rounding of ``layer``'s weight on its stored grid (Q's forward then reproduces the codes); with
    ``config.grid_search`` the grid, per row, whose rounding leaves the least output error ``(w-ŵ)ᵀ H (w-ŵ)``.
    Returns the compensated weights that were rounded (the weight's shape)."""
    w = layer.weight.detach()
    rows, g = w.shape[0], hessian.shape[0]
    _, _, qmin, qmax = wq.qparams(w)
    target = _grouped(w.reshape(rows, -1).double(), g)
    grids = _candidate_grids(wq, w, config.grid_search)
    k = len(grids)
    scale, zero_point = (torch.cat([_grouped(grid[i], g) for grid in grids], 1).double() for i in (0, 1))
    target = target.repeat(1, k, 1)  # each row once per candidate grid
    try:
        codes, compensated = _gptq(target, hessian, scale, zero_point, qmin, qmax, damp=config.damp,
                                   block=config.block, act_order=config.act_order)  # fmt: skip
    except DFQError as e:
        raise DFQError(f"gptq: layer {name}: {e}") from None
    diff = target - (codes - zero_point[..., None]) * scale[..., None]
    error = ((diff @ hessian) * diff).sum(-1).reshape(g, k, -1)  # (G, candidates, R)
    if wq.scale.numel() == 1:  # one grid for the whole tensor: the candidate best over all rows
        error = error.sum((0, 2), keepdim=True).expand_as(error)
    best = error.argmin(1)[:, None, :]  # (G, 1, R)

    def pick(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(g, k, -1, *t.shape[2:])
        return t.gather(1, best.reshape(*best.shape, *([1] * (t.dim() - 3))).expand(g, 1, *t.shape[2:]))[:, 0]

    codes, compensated, scale, zero_point = (pick(t).reshape(rows, -1).to(w.dtype)
                                             for t in (codes, compensated, scale, zero_point))  # fmt: skip
    layer.weight.copy_(((codes - zero_point) * scale).reshape(w.shape))
    wq.scale.copy_(scale.reshape(-1)[: wq.scale.numel()].reshape(wq.scale.shape))
    wq.zero_point.copy_(zero_point.reshape(-1)[: wq.zero_point.numel()].reshape(wq.zero_point.shape))
    return compensated.reshape(w.shape)


def _layers(q: nn.Module, pool: torch.Tensor, progress: bool) -> Iterator[tuple[str, nn.Module, WeightQuantizer]]:
    order = _run_order(q, pool[:1])
    with tqdm(order, desc="gptq: layers", disable=not progress) as bar:
        yield from bar


_FORWARD_PIXELS = 2 * 224 * 224  # images x pixels per Hessian forward: 98 CIFAR images, 2 at 224 px (unfolded 9-25x)


@register_method
class GPTQ(Method):
    name = "gptq"
    config_cls = GPTQConfig
    description = "GPTQ (ICLR'23) on a synthesized pool: one-shot rounding with Hessian error compensation"
    stored_grids = "rounds onto fixed weight grids"

    def quantize(self, teacher: nn.Module, quant: QuantConfig, ctx: MethodContext) -> tuple[nn.Module, dict[str, Any]]:
        c = self.config
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # layer construction draws from the global stream; keep it as it was
            quantize_model(teacher, quant)  # an unsupported layer is refused before the synthesis
        pool = synthesize_pool(
            teacher, ctx.input_size, c.num_samples, batch=c.synth_batch, steps=c.synth_steps, lr=c.synth_lr,
            normalized=c.bns_normalized, warm_decoder=c.warm_decoder, generator=ctx.generator,
            input_stats=ctx.input_stats, progress=ctx.progress,
        )  # fmt: skip
        synthesized = time.perf_counter()
        q = gptq_quantize(teacher, quant, c, pool, progress=ctx.progress)
        done = time.perf_counter()
        return q, {"seconds": round(done - start, 3), "synthesize_s": round(synthesized - start, 3),
                   "gptq_s": round(done - synthesized, 3)}  # fmt: skip


def gptq_quantize(
    teacher: nn.Module, quant: QuantConfig, config: GPTQConfig, pool: torch.Tensor, *, progress: bool = True
) -> nn.Module:
    """Q of ``teacher`` with its activation ranges calibrated on ``pool`` and every layer rounded by GPTQ on the
    inputs Q gives it there, in the order the layers run."""
    q = quantize_model(teacher, quant).eval()
    if quant.input_range is not None:  # as recon: Q's input grid clips synthetic pixels outside the valid range
        pool = pool.clamp(*quant.input_range)
    init_grids(q, pool, config.synth_batch)
    gptq_round(q, pool, config, progress=progress)
    if config.act_search:
        least_output_error_act_ranges(q, teacher, pool, _batch(pool))
    return q


def _batch(pool: torch.Tensor) -> int:
    return max(1, _FORWARD_PIXELS // math.prod(pool.shape[2:]))


def gptq_round(
    q: nn.Module, pool: torch.Tensor, config: GPTQConfig, *, progress: bool = True
) -> dict[nn.Module, torch.Tensor]:
    """Round every weighted layer of ``q`` (its grids and activation ranges set) by GPTQ on the inputs Q gives it
    on ``pool``, in the order the layers run; returns each layer's compensated weights (what ``recon`` starts its
    learned rounding from, ``recon.rounding_init``)."""
    batch = _batch(pool)
    return {layer: quantize_layer(name, layer, wq, layer_hessian(q, layer, pool, batch), config)
            for name, layer, wq in _layers(q, pool, progress)}  # fmt: skip
