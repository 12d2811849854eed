"""Attribute and argument helpers of the ONNX export: how a PyTorch layer or call maps onto an ONNX operator's
inputs and attributes (no graph building here, see :mod:`dfq.export.onnx`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from dfq.errors import DFQError, UnsupportedLayerError
from dfq.quant import ActMode, ActQuantizer, QuantConv2d, QuantLinear
from dfq.quant.functional import quantize_affine

INT32_LIMIT = 2**31 - 1


def slice_inputs(name: str, index: Any) -> dict[str, list[int]]:
    """ONNX Slice's starts/ends/axes/steps for a Python index made of slices (full slices skipped)."""
    index = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, slice) for i in index):
        raise UnsupportedLayerError(f"cannot export the indexing {name}: only slices are supported")
    out: dict[str, list[int]] = {"starts": [], "ends": [], "axes": [], "steps": []}
    for axis, s in enumerate(index):
        if s != slice(None):
            out["starts"].append(s.start or 0)
            out["ends"].append(s.stop if s.stop is not None else INT32_LIMIT)
            out["axes"].append(axis)
            out["steps"].append(s.step or 1)
    return out


def onnx_pads(node: fx.Node) -> list[int]:
    """ONNX Pad's (begins..., ends...) of an NCHW ``F.pad`` call; only zero padding exports."""
    pads = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    if mode != "constant" or value:
        raise UnsupportedLayerError(f"cannot export {node.name}: only zero padding is supported")
    rank = 4
    begin, end = [0] * rank, [0] * rank
    for i in range(len(pads) // 2):  # F.pad lists (begin, end) pairs from the last dim backwards
        begin[rank - 1 - i], end[rank - 1 - i] = pads[2 * i], pads[2 * i + 1]
    return begin + end


def signed_codes(layer: QuantConv2d | QuantLinear, gain: torch.Tensor) -> torch.Tensor:
    """The weight's integer codes, negated where a folded BatchNorm gain is negative, zero where it is 0."""
    wq = layer.weight_quantizer
    codes = quantize_affine(layer.weight.detach(), *wq.qparams(layer.weight), divide=wq.spec.deploy).double()
    sign = torch.where(gain < 0, -1.0, 1.0).double()
    codes = codes * sign.reshape(-1, *([1] * (codes.dim() - 1)))
    codes[gain == 0] = 0  # BatchNorm gamma of 0: the channel is its bias
    return codes


def is_spatial_mean(node: fx.Node) -> bool:
    """``x.mean((2, 3))`` (or ``dim=[-2, -1]``): global average pooling of NCHW."""
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return isinstance(dims, tuple | list) and sorted(d % 4 for d in dims) == [2, 3]


def keeps_dims(node: fx.Node) -> bool:
    """Whether a reduction keeps the reduced dimensions (``keepdim=True``: squeeze-excitation's pooling)."""
    return bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))


def active(aq: ActQuantizer) -> bool:
    return aq.get_mode() is not ActMode.DISABLED and not aq.spec.is_noop


def check_container_bits(bits: int, where: str) -> None:
    if bits > 8:
        raise DFQError(f"cannot export {where}: {bits}-bit quantization; ONNX export supports 2 to 8 bits")


def layer_bias(layer: nn.Module) -> torch.Tensor:
    if layer.bias is not None:
        return layer.bias.detach()
    return torch.zeros(layer.weight.shape[0])


def pair(v: Any) -> tuple[int, int]:
    return tuple(v) if isinstance(v, tuple | list) else (v, v)  # type: ignore[return-value]


def conv_attrs(conv: nn.Conv2d, name: str) -> dict[str, Any]:
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise UnsupportedLayerError(f"cannot export {name}: only numeric zero padding is supported")
    ph, pw = pair(conv.padding)
    return {
        "kernel_shape": list(pair(conv.kernel_size)),
        "strides": list(pair(conv.stride)),
        "pads": [ph, pw, ph, pw],
        "dilations": list(pair(conv.dilation)),
        "group": conv.groups,
    }


def pool_attrs(pool: nn.MaxPool2d | nn.AvgPool2d, name: str) -> dict[str, Any]:
    if getattr(pool, "return_indices", False) or pair(getattr(pool, "dilation", 1)) != (1, 1):
        raise UnsupportedLayerError(f"cannot export {name}: pooling with indices or dilation")
    ph, pw = pair(pool.padding)
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return {
        "kernel_shape": list(pair(pool.kernel_size)),
        "strides": list(pair(stride)),
        "pads": [ph, pw, ph, pw],
        "ceil_mode": int(pool.ceil_mode),
    }


def upsample_scales(m: nn.Upsample, name: str) -> list[float]:
    """ONNX Resize's scales of a nearest ``nn.Upsample`` by a scale factor (PyTorch's nearest: floor of the
    asymmetric source coordinate, which ONNX Resize reproduces exactly)."""
    if m.mode != "nearest" or m.scale_factor is None:
        raise UnsupportedLayerError(f"cannot export {name}: only nearest upsampling by a scale factor")
    fy, fx = pair(m.scale_factor)
    return [1.0, 1.0, float(fy), float(fx)]
