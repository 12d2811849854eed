"""The ONNX form of the functions and tensor methods a traced model calls (``F.pad``, ``torch.cat``, ``x * gate``,
indexing, functional pooling, shape arithmetic), each ``fn(builder, node) -> value`` (see :mod:`dfq.export.onnx`)."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.errors import UnsupportedLayerError
from dfq.export import shapes
from dfq.export.onnx_attrs import onnx_pads, pair, pool_attrs, slice_inputs
from dfq.export.shapes import adaptive_avg_pool, arithmetic
from dfq.export.values import Value

if TYPE_CHECKING:
    from dfq.export.onnx import _Builder

__all__ = ["BY_NAME", "FUNCTIONS", "METHODS", "static_check"]


def getitem(b: _Builder, node: fx.Node) -> Any:
    """A shape's dimension, one output of a split, or a slice (on the integer tensor where there is one)."""
    source, index = node.args
    if isinstance(b.values.get(source), tuple):
        return b.values[source][index]
    slices = slice_inputs(node.name, index)
    if not slices["axes"]:
        return b.value(source)
    extra = [b.const(f"{node.name}_{k}", np.array(v, np.int64)) for k, v in slices.items()]
    return b.grid_op(b.value(source), "Slice", f"{node.name}_out", extra)


def pad(b: _Builder, node: fx.Node) -> Value:
    pads_name = b.const(f"{node.name}_pads", np.array(onnx_pads(node), np.int64))
    x = b.value(node.args[0])
    if x.q is not None:  # pad with the code of 0.0, the zero point
        return b.grid_op(x, "Pad", f"{node.name}_out", [pads_name, x.q.zp_name], mode="constant")
    return b.grid_op(x, "Pad", f"{node.name}_out", [pads_name], mode="constant")


def _functional_pool(b: _Builder, node: fx.Node) -> Value:
    """``F.adaptive_avg_pool2d(x, 1)``, ``F.avg_pool2d`` and ``F.max_pool2d`` (torchvision's MobileNetV2, Inception)
    exported as their module forms are: the call's own arguments build the module whose attributes ONNX needs."""
    if node.target is F.max_pool2d:  # on the integer tensor where there is one, as the module form
        pool = nn.MaxPool2d(*node.args[1:], **node.kwargs)
        return b.grid_op(b.value(node.args[0]), "MaxPool", f"{node.name}_out", **pool_attrs(pool, node.name))
    x = b.as_float(b.value(node.args[0]))
    if node.target is F.adaptive_avg_pool2d:
        size = node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
        if pair(size) != (1, 1):
            return adaptive_avg_pool(b, node, size)
        return Value(b.op("GlobalAveragePool", [x], f"{node.name}_out"))
    pool = nn.AvgPool2d(*node.args[1:], **node.kwargs)
    if pool.divisor_override is not None:
        raise UnsupportedLayerError(f"cannot export {node.name}: average pooling with divisor_override")
    attrs = {**pool_attrs(pool, node.name), "count_include_pad": int(pool.count_include_pad)}
    return Value(b.op("AveragePool", [x], f"{node.name}_out", **attrs))


def _concat(b: _Builder, node: fx.Node) -> Value:
    """``torch.cat`` of dequantized tensors: exact in float; the layer that reads it quantizes its own input."""
    tensors = node.kwargs.get("tensors", node.args[0])
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return Value(b.op("Concat", [b.as_float(b.value(t)) for t in tensors], f"{node.name}_out", axis=int(dim)))


def _mul(b: _Builder, node: fx.Node) -> Any:
    """``x * gate`` (squeeze-excitation) or ``x * c``: a float product of dequantized tensors; the layer that reads
    it quantizes its own input (ONNX Runtime fuses the DQ-Mul-Q pattern into its integer QLinearMul). On two
    dimensions: their product."""
    dims = arithmetic(b, node)
    if dims is not None:
        return dims
    inputs = [b.as_float(b.value(a)) if isinstance(a, fx.Node) else b.const(f"{node.name}_c", np.float32(a))
              for a in node.args[:2]]  # fmt: skip
    return Value(b.op("Mul", inputs, f"{node.name}_out"))


def static_check(b: _Builder, node: fx.Node) -> str:
    """timm's ``torch._assert(x.ndim == 4, ...)``: a check on the traced shapes, which held when Q ran; as
    ``torch.onnx`` does with asserts, nothing of it enters the graph."""
    if node.target is getattr and node.args[1] != "ndim":
        raise UnsupportedLayerError(f"cannot export the attribute .{node.args[1]} ({node.name}) to ONNX")
    if node.target is operator.eq and not any(b.values.get(a) == "static" for a in node.args):
        raise UnsupportedLayerError(f"cannot export the comparison {node.name} to ONNX")
    return "static"


def eval_identity(b: _Builder, node: fx.Node) -> Value:
    """Dropout and stochastic depth (``F.dropout``, torchvision's ``stochastic_depth``) called with the module's
    ``training`` flag: the identity in the evaluation mode the export traces."""
    index = {"stochastic_depth": 3}.get(getattr(node.target, "__name__", ""), 2)
    training = node.kwargs.get("training", node.args[index] if len(node.args) > index else True)
    if training is not False:
        raise UnsupportedLayerError(f"cannot export {node.name}: {node.target.__name__} in training mode")
    return b.value(node.args[0])


# Library functions matched by name, so that exporting does not import their library.
BY_NAME: dict[str, Any] = {"stochastic_depth": eval_identity}

FUNCTIONS: dict[Any, Any] = {
    F.dropout: eval_identity,
    torch._assert: static_check, operator.eq: static_check, operator.getitem: getitem, F.pad: pad,
    F.adaptive_avg_pool2d: _functional_pool, F.avg_pool2d: _functional_pool, F.max_pool2d: _functional_pool,
    torch.cat: _concat, torch.concat: _concat, operator.mul: _mul, torch.mul: _mul, **shapes.FUNCTIONS,
}  # fmt: skip
METHODS: dict[str, Any] = {"mul": _mul, **shapes.METHODS}
