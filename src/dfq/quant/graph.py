"""Whole-model dataflow of a classifier, for placing deploy-protocol quantizers and for export.

``trace`` records a model with torch.fx down to its built-in layers (Conv2d, BatchNorm,
ReLU, pooling, ...) and dfq's quantized layers, tracing through user containers such as
residual blocks. The model itself is never replaced by the trace: it only tells which
tensors reach which layers.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.errors import UnsupportedLayerError
from dfq.quant.modules import QuantActivation, QuantBatchNorm2d, QuantConv2d, QuantLinear
from dfq.quant.quantizer import ActQuantizer

__all__ = [
    "ADD_FUNCTIONS",
    "ADD_METHODS",
    "CONCAT_FUNCTIONS",
    "following_batchnorm",
    "is_add",
    "is_grid_preserving",
    "is_shape",
    "owner_of",
    "producer_chain",
    "trace",
]

_DFQ_LEAVES = (QuantConv2d, QuantLinear, QuantActivation, QuantBatchNorm2d, ActQuantizer)

ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")

# Operations that move or select values without computing new ones: a tensor on an integer
# grid stays on the same grid through them (zero padding included, since 0 is on every
# symmetric grid).
_GRID_MODULES = (nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool2d)
_GRID_FUNCTIONS = (operator.getitem, torch.flatten, torch.reshape, F.pad, F.max_pool2d)
_GRID_METHODS = ("view", "reshape", "flatten", "contiguous")
# Dropout and stochastic depth: the identity in evaluation, where the grids matter (export, integer runtimes).
_EVAL_IDENTITIES = ("dropout", "stochastic_depth")
CONCAT_FUNCTIONS = (torch.cat, torch.concat)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _DFQ_LEAVES):
            return True
        return type(m).__module__.startswith("torch.nn") and not isinstance(m, nn.Sequential | fx.GraphModule)


def trace(model: nn.Module, why: str) -> fx.Graph:
    """The dataflow graph of ``model``; ``why`` names the feature that needs it, for the error."""
    try:
        return _Tracer().trace(model)
    except Exception as e:  # data-dependent control flow, unsupported Python
        raise UnsupportedLayerError(
            f"{why} needs a model that torch.fx can trace, and tracing {type(model).__name__} failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def is_grid_preserving(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` passes its first input's values through unchanged or zero-padded."""
    if node.op == "call_module":
        m = modules[str(node.target)]
        return isinstance(m, _GRID_MODULES) or (isinstance(m, nn.Upsample) and m.mode == "nearest")
    if node.op == "call_function":
        if node.target is F.pad:
            return _pad_is_zero(node)
        return node.target in _GRID_FUNCTIONS or getattr(node.target, "__name__", None) in _EVAL_IDENTITIES
    if node.op == "call_method":
        return node.target in _GRID_METHODS
    return False


def _pad_is_zero(node: fx.Node) -> bool:
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    return mode == "constant" and not value


def producer_chain(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """The node that computed the values of ``node``, looking through grid-preserving operations."""
    while is_grid_preserving(node, modules) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def following_batchnorm(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node, nn.BatchNorm2d] | None:
    """The BatchNorm that is the only consumer of ``node``'s output (it folds into the layer), if any."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module":
        m = modules[str(users[0].target)]
        if isinstance(m, nn.BatchNorm2d):
            return users[0], m
    return None


def is_add(node: fx.Node) -> bool:
    """Whether ``node`` adds two tensors (``x + y``, ``torch.add``, ``x.add_(y)``)."""
    return (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ADD_METHODS
    )


def owner_of(node: fx.Node) -> str:
    """The qualified name of the innermost module whose ``forward`` made ``node`` (``""``: the model's own)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    value = list(stack.values())[-1]
    return value[0] if isinstance(value, tuple) else str(list(stack.keys())[-1])


def is_shape(node: fx.Node) -> bool:
    """Whether ``node`` only reads a tensor's shape (``x.size(0)``, ``x.shape[1]``), not its values."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] == "shape"
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and is_shape(node.args[0])
    return False
