"""Function-preserving rewrites of a float model for quantization (Nagel et al., ICCV 2019, Sec. 4).

Nagel, van Baalen, Blankevoort, Welling, "Data-Free Quantization Through Weight Equalization and
Bias Correction": BatchNorm folding, cross-layer equalization (Sec. 4.1), high-bias absorption
(Sec. 4.2) and analytical bias correction (Sec. 4.3). Everything here works on the weights and the
BatchNorm statistics alone, no data. The method that strings these together is ``dfq.methods.cle``.

The pair and expectation searches walk the torch.fx dataflow graph (:func:`dfq.quant.graph.trace`)
backwards from a layer's input through weight-free operations only; a residual addition, a concat
or any other multi-input operation ends the walk, so such layers are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from dfq.quant.graph import following_batchnorm, trace
from dfq.quant.modules import batchnorm_affine
from dfq.quant.prepare import set_submodule

__all__ = [
    "Pair",
    "absorb_high_bias",
    "apply_to_input",
    "clipped_normal_mean",
    "correct_bias",
    "equalize",
    "find_pairs",
    "fold_batchnorm",
    "input_expectations",
]

# Output distribution of a BN-folded layer's pre-activation, per channel: (mean beta, std |gamma|).
Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]

_PASS = (nn.Identity, nn.Dropout)  # values unchanged (a folded BatchNorm became an Identity)
_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)  # mean-preserving, commute with positive per-channel scaling
_FLATTEN_FUNCS = (torch.flatten,)
_FLATTEN_METHODS = ("flatten", "view", "reshape")


@dataclass(frozen=True)
class Pair:
    """W1 -> ``act`` -> W2 with W1's output read by W2 alone (``act``: "relu" or None for identity)."""

    first: str
    act: str | None
    second: str


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> Stats:
    """Fold every BatchNorm2d that is the only reader of a Conv2d into it, in place (BN becomes Identity).

    ``W <- g W``, ``b <- g b + (beta - g mu)`` with ``g = gamma / sqrt(var + eps)``, computed in float64, so the
    float function is kept up to rounding. Returns, per folded convolution, the BatchNorm's ``(beta, |gamma|)``:
    the mean and std of its (now folded) output over the data BN was trained on, which Sec. 4.2 and 4.3 need.
    """
    graph = trace(model, "BatchNorm folding")
    modules = dict(model.named_modules())
    calls = [n for n in graph.nodes if n.op == "call_module"]
    stats: Stats = {}
    for node in calls:
        conv = modules[str(node.target)]
        follower = following_batchnorm(node, modules) if isinstance(conv, nn.Conv2d) else None
        if follower is None or follower[1].running_var is None:
            continue
        if sum(1 for n in calls if n.target in (node.target, follower[0].target)) != 2:
            continue  # a module called at several sites cannot be folded
        bn = follower[1]
        gain, shift = batchnorm_affine(bn)
        dtype = conv.weight.dtype
        if conv.bias is not None:
            shift = shift + gain * conv.bias.double()
        conv.weight.copy_((conv.weight.double() * gain.view(-1, 1, 1, 1)).to(dtype))
        conv.bias = nn.Parameter(shift.to(dtype=dtype, device=conv.weight.device))
        gamma = bn.weight.double() if bn.affine else torch.ones_like(gain)
        beta = bn.bias.double() if bn.affine else torch.zeros_like(gain)
        stats[str(node.target)] = (beta.clone(), gamma.abs())
        set_submodule(model, str(follower[0].target), nn.Identity())
    return stats


def _walk(
    layer: fx.Node, modules: dict[str, nn.Module], maxpool: bool = False
) -> tuple[str, nn.Module | None, bool] | None:
    """From ``layer``'s input back to the Conv2d/Linear computing it: (its name, the activation on the way,
    whether every tensor on the way, the producer's output included, is read by one node only). ``maxpool``:
    pass max-pooling too (it commutes with positive per-channel scaling, but does not keep the mean)."""
    linear = isinstance(modules[str(layer.target)], nn.Linear)
    node, act, single = layer.args[0] if layer.args else None, None, True
    while isinstance(node, fx.Node):
        single = single and len([u for u in node.users if not _reads_shape(u)]) == 1
        m = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(m, nn.Conv2d | nn.Linear):
            return str(node.target), act, single
        if isinstance(m, nn.ReLU | nn.ReLU6) and act is None:
            act = m
        elif not (isinstance(m, _PASS) or (maxpool and isinstance(m, nn.MaxPool2d))
                  or (linear and _flattens_or_pools(node, m))):  # fmt: skip
            return None
        node = node.args[0] if node.args else None
    return None


def _flattens_or_pools(node: fx.Node, m: nn.Module | None) -> bool:
    if isinstance(m, (*_POOLS, nn.Flatten)):
        return True
    return (node.op == "call_function" and node.target in _FLATTEN_FUNCS) or (
        node.op == "call_method" and node.target in _FLATTEN_METHODS
    )


def _reads_shape(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in ("size", "dim")


def _in_channels(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _per_input_channel(m: nn.Module) -> bool:
    """Whether each input channel of ``m`` owns a slice of its weight: dense layers and depthwise convs."""
    if isinstance(m, nn.Linear) or m.groups == 1:
        return True
    return m.groups == m.in_channels == m.out_channels


def find_pairs(model: nn.Module) -> list[Pair]:
    """Consecutive layer pairs that cross-layer equalization may rescale, in execution order.

    Kept: W1 (Conv2d/Linear) -> [folded BN] -> ReLU or nothing -> [max-pooling; average pooling and flattening
    before a Linear] -> W2, where
    each tensor on the way is read by the next node only and W2's input channels match W1's output channels.
    Skipped: residual additions and concats (the walk stops there), W2 a grouped but not depthwise conv, and
    ReLU6 in between: ``relu6(x / s) != relu6(x) / s`` unless s = 1, so scaling would move the clip at 6.
    (The paper replaces ReLU6 by ReLU in MobileNetV2, which changes the float model; dfq does not.)
    """
    graph = trace(model, "cross-layer equalization")
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        second = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(second, nn.Conv2d | nn.Linear) or not _per_input_channel(second):
            continue
        found = _walk(node, modules, maxpool=True)
        if found is None or not found[2] or isinstance(found[1], nn.ReLU6):
            continue
        first = modules[found[0]]
        if _out_channels(first) != _in_channels(second) or first is second:
            continue
        pairs.append(Pair(found[0], None if found[1] is None else "relu", str(node.target)))
    return pairs


def _out_view(m: nn.Module, v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (m.weight.dim() - 1)))


def _in_view(m: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """``v`` (one value per input channel) shaped to scale the weight's input-channel slices."""
    if isinstance(m, nn.Conv2d) and m.groups > 1:  # depthwise: input channel i is output channel i
        return _out_view(m, v)
    return v.view(1, -1, *([1] * (m.weight.dim() - 2)))


def _in_ranges(m: nn.Module) -> torch.Tensor:
    """Per input channel: max |W| over the weights that read it (r2 of the paper)."""
    w = m.weight.detach().double().abs()
    if isinstance(m, nn.Conv2d) and m.groups > 1:
        return w.flatten(1).amax(dim=1)
    return w.transpose(0, 1).flatten(1).amax(dim=1)


def apply_to_input(m: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight @ x`` for a constant input ``x`` (one value per input channel), summed over the kernel
    (borders of zero padding ignored, as in the paper)."""
    w = weight.double()
    if isinstance(m, nn.Conv2d) and m.groups > 1:
        return w.flatten(1).sum(dim=1) * x.double()
    return w.flatten(2).sum(dim=2) @ x.double() if w.dim() > 2 else w @ x.double()


@torch.no_grad()
def equalize(model: nn.Module, pairs: list[Pair], stats: Stats, iterations: int, tol: float = 1e-6) -> int:
    """Cross-layer equalization (Sec. 4.1), in place; returns the passes run.

    For each pair, ``s_i = sqrt(r1_i r2_i) / r2_i``; ``W1 <- S^-1 W1``, ``b1 <- S^-1 b1``, ``W2 <- W2 S``. Since
    ReLU is positively homogeneous (``relu(x / s) = relu(x) / s`` for ``s > 0``) the float function is unchanged,
    and both ranges become ``sqrt(r1_i r2_i)``: the paper's optimum of the summed per-channel precisions. A layer in
    two pairs (W2 of one, W1 of the next) is pulled both ways, so passes repeat until no scale moves more than
    ``tol`` (relative). Channels with a zero range on either side keep ``s = 1``.
    """
    modules = dict(model.named_modules())
    for done in range(1, iterations + 1):
        moved = 0.0
        for pair in pairs:
            w1, w2 = modules[pair.first], modules[pair.second]
            r1 = w1.weight.detach().double().abs().flatten(1).amax(dim=1)
            r2 = _in_ranges(w2)
            ok = (r1 > 0) & (r2 > 0)
            s = torch.where(ok, torch.sqrt(r1 * r2) / torch.where(ok, r2, 1.0), torch.ones_like(r1))
            w1.weight.copy_((w1.weight.double() / _out_view(w1, s)).to(w1.weight.dtype))
            if w1.bias is not None:
                w1.bias.copy_((w1.bias.double() / s).to(w1.bias.dtype))
            w2.weight.copy_((w2.weight.double() * _in_view(w2, s)).to(w2.weight.dtype))
            if pair.first in stats:
                mean, std = stats[pair.first]
                stats[pair.first] = (mean / s, std / s)
            moved = max(moved, float((s - 1).abs().max()))
        if moved < tol:
            return done
    return iterations


@torch.no_grad()
def absorb_high_bias(model: nn.Module, pairs: list[Pair], stats: Stats) -> dict[str, torch.Tensor]:
    """High-bias absorption (Sec. 4.2), in place; returns the amount ``c`` moved, per W1.

    For W1 -> ReLU -> W2 with W1's BatchNorm statistics: ``c = max(0, beta - 3|gamma|)`` per channel, then
    ``b1 <- b1 - c``, ``b2 <- b2 + W2 c``. Exact whenever W1's pre-activation is >= c (for a Gaussian, all but
    0.1% of the time): ``relu(x - c) + c = relu(x)`` there. It shrinks the activation range W2 reads, which
    equalization may have blown up (small s_i scales the bias up with the weights).
    """
    modules = dict(model.named_modules())
    moved = {}
    for pair in pairs:
        if pair.act != "relu" or pair.first not in stats or modules[pair.first].bias is None:
            continue
        mean, std = stats[pair.first]
        c = (mean - 3 * std).clamp(min=0)
        if not bool((c > 0).any()):
            continue
        w1, w2 = modules[pair.first], modules[pair.second]
        w1.bias.copy_((w1.bias.double() - c).to(w1.bias.dtype))
        shift = apply_to_input(w2, w2.weight, c)
        if w2.bias is None:
            w2.bias = nn.Parameter(w2.weight.new_zeros(_out_channels(w2)))
        w2.bias.copy_((w2.bias.double() + shift).to(w2.bias.dtype))
        stats[pair.first] = (mean - c, std)
        moved[pair.first] = c
    return moved


def clipped_normal_mean(mean: torch.Tensor, std: torch.Tensor, upper: float | None = None) -> torch.Tensor:
    """``E[clip(z, 0, upper)]`` for ``z ~ N(mean, std^2)`` (Sec. 4.3, eq. 18/19).

    ``E[relu(z)] = std phi(mean / std) + mean (1 - Phi(-mean / std))``; the ReLU6 clip is
    ``relu(z) - relu(z - 6)``. ``std == 0`` gives the clipped mean itself.
    """
    mean, std = mean.double(), std.double()
    safe = torch.where(std > 0, std, torch.ones_like(std))
    t = mean / safe
    relu = std * torch.exp(-0.5 * t * t) / (2 * torch.pi) ** 0.5 + mean * torch.special.ndtr(t)
    relu = torch.where(std > 0, relu, mean.clamp(min=0))
    if upper is None:
        return relu
    return relu - clipped_normal_mean(mean - upper, std)


def input_expectations(model: nn.Module, stats: Stats) -> dict[str, torch.Tensor]:
    """E[x] per input channel of every Conv2d/Linear whose input comes from a BN-folded conv (Sec. 4.3).

    The walk passes folded BatchNorms, one ReLU/ReLU6 (clipped-normal mean), and before a Linear average
    pooling and flattening (mean-preserving). Layers fed by anything else (the image, a residual addition, a
    max-pool) get no entry: their input distribution is not known without data.
    """
    graph = trace(model, "bias correction")
    modules = dict(model.named_modules())
    out = {}
    for node in graph.nodes:
        layer = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(layer, nn.Conv2d | nn.Linear):
            continue
        found = _walk(node, modules)
        if found is None or found[0] not in stats or _out_channels(modules[found[0]]) != _in_channels(layer):
            continue
        mean, std = stats[found[0]]
        act = found[1]
        out[str(node.target)] = mean.clone() if act is None else clipped_normal_mean(
            mean, std, 6.0 if isinstance(act, nn.ReLU6) else None)  # fmt: skip
    return out


@torch.no_grad()
def correct_bias(q: nn.Module, expectations: dict[str, torch.Tensor]) -> int:
    """Analytical bias correction (Sec. 4.3) on the quantized model ``q``, in place; returns layers corrected.

    With ``eps = W_q - W`` the quantized layer's output is off by ``eps E[x]`` on average; ``b <- b - eps E[x]``
    removes that shift (the paper's eq. 14). ``W_q`` is what the layer's own weight quantizer makes of W.
    """
    done = 0
    for name, ex in expectations.items():
        layer = q.get_submodule(name)
        wq = getattr(layer, "weight_quantizer", None)
        if wq is None:
            continue
        eps = wq(layer.weight) - layer.weight
        shift = apply_to_input(layer, eps, ex.to(eps.device))
        if layer.bias is None:
            layer.bias = nn.Parameter(layer.weight.detach().new_zeros(_out_channels(layer)))
        layer.bias.copy_((layer.bias.double() - shift).to(layer.bias.dtype))
        done += 1
    return done
