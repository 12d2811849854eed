"""Shape arithmetic and data movement in the ONNX export: ``x.size()``, ``view``/``reshape`` to computed shapes,
``transpose``, ``chunk`` (ShuffleNet's channel shuffle and split), adaptive pooling to a fixed size.

The shapes of the traced tensors come from one forward pass at the export's input size (``torch.fx``'s
``ShapeProp``); every dimension is then a constant but the batch, which stays dynamic: it is written as ``0``
("copy the input's dimension") in a ``Reshape`` at position 0, and nowhere else.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from dfq.errors import UnsupportedLayerError
from dfq.export.onnx_attrs import pair
from dfq.export.values import QTensor, Value
from dfq.quant import quant_disabled

if TYPE_CHECKING:
    from dfq.export.onnx import _Builder

BATCH = "batch"  # the dynamic batch dimension, among a shape's ints

__all__ = ["BATCH", "FUNCTIONS", "METHODS", "adaptive_avg_pool", "node_shapes"]


def node_shapes(model: nn.Module, graph: fx.Graph, input_shape: tuple[int, ...]) -> dict[fx.Node, tuple[int, ...]]:
    """The shape of every tensor ``graph`` computes, from one forward pass on a zero batch of one (quantizers off,
    so that an uncalibrated one observes nothing)."""
    gm = fx.GraphModule(model, graph)
    with torch.no_grad(), quant_disabled(model):
        ShapeProp(gm).propagate(torch.zeros(1, *input_shape))
    return {n: tuple(n.meta["tensor_meta"].shape) for n in graph.nodes if hasattr(n.meta.get("tensor_meta"), "shape")}


def _dims(b: _Builder, node: fx.Node, source: fx.Node) -> tuple[Any, ...]:
    if source not in b.shapes:
        raise UnsupportedLayerError(f"cannot export {node.name}: the shape of {source.name} is unknown")
    return (BATCH, *b.shapes[source][1:])


def size(b: _Builder, node: fx.Node) -> Any:
    """``x.size()`` (a tuple) or ``x.size(i)``; the batch stays symbolic."""
    dims = _dims(b, node, node.args[0])
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return dims if dim is None else dims[dim]


def shape_attr(b: _Builder, node: fx.Node) -> tuple[Any, ...]:
    return _dims(b, node, node.args[0])


def _resolved(b: _Builder, arg: Any) -> Any:
    return b.values.get(arg) if isinstance(arg, fx.Node) else arg


def arithmetic(b: _Builder, node: fx.Node) -> int | None:
    """``c // groups`` and the like on constant dimensions; ``None`` where an operand is a tensor."""
    args = [_resolved(b, a) for a in node.args]
    if all(isinstance(a, int) for a in args):
        return int(node.target(*args))
    if any(a == BATCH for a in args):
        raise UnsupportedLayerError(f"cannot export {node.name}: arithmetic on the (dynamic) batch size")
    return None


def reshape(b: _Builder, node: fx.Node) -> Any:
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], tuple | list):
        dims = tuple(dims[0])
    shape = [_resolved(b, d) for d in dims]
    if any(d == BATCH for d in shape[1:]) or not all(isinstance(d, int) or d == BATCH for d in shape):
        raise UnsupportedLayerError(f"cannot export the reshape {node.name}: the batch must be its first dimension")
    if shape and shape[0] not in (BATCH, -1):
        raise UnsupportedLayerError(f"cannot export the reshape {node.name}: it fixes the batch size to {shape[0]}")
    target = np.array([0 if d == BATCH else d for d in shape], np.int64)
    return b.grid_op(b.value(node.args[0]), "Reshape", f"{node.name}_out", [b.const(f"{node.name}_shape", target)])


def transpose(b: _Builder, node: fx.Node) -> Any:
    rank = len(_dims(b, node, node.args[0]))
    d0, d1 = (d % rank for d in node.args[1:3])
    perm = list(range(rank))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return b.grid_op(b.value(node.args[0]), "Transpose", f"{node.name}_out", perm=perm)


def chunk(b: _Builder, node: fx.Node) -> tuple[Any, ...]:
    """``x.chunk(n, dim)``: ONNX Split into the sizes PyTorch gives (the last chunk may be smaller)."""
    dims = _dims(b, node, node.args[0])
    n = int(node.kwargs.get("chunks", node.args[1]))
    dim = int(node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)) % len(dims)
    if dim == 0:
        raise UnsupportedLayerError(f"cannot export {node.name}: chunks along the batch")
    step = -(-dims[dim] // n)
    sizes = [min(step, dims[dim] - i) for i in range(0, dims[dim], step)]
    return _split(b, b.value(node.args[0]), sizes, dim, node.name)


def split(b: _Builder, node: fx.Node) -> tuple[Any, ...]:
    """``x.split(size_or_sizes, dim)`` (CSPNet's halves)."""
    dims = _dims(b, node, node.args[0])
    sizes = node.kwargs.get("split_size_or_sections", node.args[1] if len(node.args) > 1 else None)
    sizes = node.kwargs.get("split_size", sizes)
    dim = int(node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)) % len(dims)
    if dim == 0:
        raise UnsupportedLayerError(f"cannot export {node.name}: a split along the batch")
    if isinstance(sizes, int):
        sizes = [min(sizes, dims[dim] - i) for i in range(0, dims[dim], sizes)]
    return _split(b, b.value(node.args[0]), [int(v) for v in sizes], dim, node.name)


def _split(b: _Builder, x: Value, sizes: list[int], axis: int, hint: str) -> tuple[Value, ...]:
    """ONNX Split of ``x`` into ``sizes`` along ``axis``, on its integer tensor when it has one."""
    outs = [b.fresh(f"{hint}_{i}") for i in range(len(sizes))]
    source = x.q.name if x.q is not None else b.as_float(x)
    split = b.const(f"{hint}_split", np.array(sizes, np.int64))
    b.nodes.append(b.helper.make_node("Split", [source, split], outs, name=f"{hint}_split", axis=axis))
    if x.q is None:
        return tuple(Value(o) for o in outs)
    return tuple(Value(q=QTensor(o, x.q.scale, x.q.scale_name, x.q.zp_name)) for o in outs)


def adaptive_avg_pool(b: _Builder, node: fx.Node, output_size: Any) -> Any:
    """Adaptive average pooling to ``output_size``: plain average pooling where the input is a multiple of it (VGG's
    ``AdaptiveAvgPool2d(7)`` on its 7x7 features is the identity), else PyTorch's bins as two constant matrices,
    ``A_h @ x @ A_w^T`` (any sizes, upsampling included)."""
    h, w = _dims(b, node, node.args[0])[2:]
    oh, ow = pair(output_size)
    x = b.value(node.args[0])
    if (h, w) == (oh, ow):
        return x
    if h % oh == 0 and w % ow == 0:
        attrs = {"kernel_shape": [h // oh, w // ow], "strides": [h // oh, w // ow]}
        return Value(b.op("AveragePool", [b.as_float(x)], f"{node.name}_out", **attrs))
    rows = b.op("MatMul", [b.as_float(x), b.const(f"{node.name}_aw", _bins(w, ow).T)], f"{node.name}_w")
    return Value(b.op("MatMul", [b.const(f"{node.name}_ah", _bins(h, oh)), rows], f"{node.name}_out"))


def _bins(size: int, out: int) -> np.ndarray:
    """The ``out x size`` averaging matrix of adaptive pooling: bin ``i`` spans ``floor(i*size/out)`` to
    ``ceil((i+1)*size/out)``."""
    a = np.zeros((out, size), np.float32)
    for i in range(out):
        start, end = (i * size) // out, -(-(i + 1) * size // out)
        a[i, start:end] = 1.0 / (end - start)
    return a


METHODS = {"size": size, "view": reshape, "reshape": reshape, "transpose": transpose, "chunk": chunk, "split": split}
FUNCTIONS = {torch.transpose: transpose, torch.chunk: chunk, torch.split: split, torch.reshape: reshape,
             operator.floordiv: arithmetic, operator.sub: arithmetic}  # fmt: skip
