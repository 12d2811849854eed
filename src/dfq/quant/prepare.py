"""What a float model must be made of to be quantized, and the rewrite that gives every activation its own site.

Models that apply activations functionally (``F.relu`` in ``forward``) or reuse one ReLU module at several
sites are rewritten with ``torch.fx`` so that every activation site is its own module; anything the
protocol cannot place a quantizer after is reported by name, all at once.
"""

from __future__ import annotations

import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.errors import UnsupportedLayerError
from dfq.quant.modules import QuantReLU
from dfq.quant.quantizer import ActQuantizer, WeightQuantizer

__all__ = ["ACTIVATIONS", "check_supported", "set_submodule", "split_activation_sites"]

ACTIVATIONS = (nn.ReLU, nn.ReLU6)
# Parameter-free modules that need no quantizer of their own under the papers' protocol.
_PASSTHROUGH = (
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Sequential,
    nn.ModuleList,
    nn.ModuleDict,
)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
_SUPPORTED = (nn.Conv2d, nn.Linear, QuantReLU, WeightQuantizer, ActQuantizer, *ACTIVATIONS, *_BATCHNORM, *_PASSTHROUGH)
# Known nonlinearities the protocol cannot place a quantizer after.
_UNSUPPORTED_ACTIVATIONS = (
    nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Mish,
)  # fmt: skip
_FX_RELU_FUNCS = {F.relu: nn.ReLU, torch.relu: nn.ReLU, torch.relu_: nn.ReLU, F.relu6: nn.ReLU6}
_FX_RELU_METHODS = {"relu": nn.ReLU, "relu_": nn.ReLU}
_FX_UNSUPPORTED_FUNCS = {
    F.gelu, F.silu, F.hardswish, F.leaky_relu, F.elu, torch.sigmoid, torch.tanh, F.conv1d, F.conv2d, F.conv3d, F.linear,
}  # fmt: skip


def check_supported(model: nn.Module) -> None:
    bad = []
    for name, m in model.named_modules():
        if isinstance(m, (_SUPPORTED, fx.GraphModule)):
            continue
        has_own_params = any(True for _ in m.parameters(recurse=False))
        if has_own_params or isinstance(m, _UNSUPPORTED_ACTIVATIONS) or _is_unsupported_leaf(m):
            bad.append(f"{name or '<root>'} ({type(m).__name__})")
    if bad:
        raise UnsupportedLayerError(
            f"cannot quantize {len(bad)} layer(s): {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; "
            "supported: Conv2d, Linear, BatchNorm, ReLU, ReLU6 and parameter-free pooling/reshaping"
        )


_LAYERS = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


def _is_unsupported_leaf(m: nn.Module) -> bool:
    """torch.nn layers outside the supported set (a user's own parameter-free modules are fine)."""
    return type(m).__module__.startswith("torch.nn") and not any(True for _ in m.children())


class _ShallowTracer(fx.Tracer):
    """Traces one module's own ``forward``: every submodule is a leaf."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._root = root

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self._root


def split_activation_sites(model: nn.Module) -> nn.Module:
    """Give every ReLU/ReLU6 application its own module, rewriting with torch.fx where needed.

    Each module's own ``forward`` is traced separately, children before parents,
    and only modules that apply an activation functionally or call one ReLU
    module twice are replaced (by a GraphModule with the same submodule names).
    Every other module keeps its class, so names and forward hooks still work.
    """
    for name, module in reversed(list(model.named_modules())):  # descendants before ancestors
        if type(module).__module__.startswith("torch.nn") and not any(True for _ in module.children()):
            continue  # built-in leaf layers call no activation of their own
        if isinstance(module, _LAYERS):
            continue  # a library's subclass of a supported layer (timm's Linear calls F.linear) is that layer
        new = _split_local(module, name)
        if new is module:
            continue
        if name:
            set_submodule(model, name, new)
        else:
            model = new
    return model


def _split_local(module: nn.Module, name: str) -> nn.Module:
    where = name or type(module).__name__
    try:
        graph = _ShallowTracer(module).trace(module)
    except Exception as e:  # tracing fails on data-dependent control flow
        warnings.warn(
            f"torch.fx could not trace {where} ({type(e).__name__}); only ReLU/ReLU6 *modules* in it get "
            "activation quantizers, functional activations in its forward() stay in float",
            stacklevel=4,
        )
        return module
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    bad = [f"{n.name} ({getattr(n.target, '__name__', n.target)})" for n in graph.nodes if _fx_unsupported(n)]
    if bad:
        raise UnsupportedLayerError(f"cannot quantize functional call(s) in {where}.forward(): {', '.join(bad)}")
    seen: set[str] = set()
    rewrites = []
    for node in graph.nodes:
        act = _fx_activation(gm, node)
        if act is None:
            continue
        if node.op == "call_module" and node.target not in seen:
            seen.add(node.target)
            continue
        rewrites.append((node, act))
    if not rewrites:
        return module
    for node, act in rewrites:
        child = f"{node.name}_act"
        gm.add_submodule(child, act())
        with graph.inserting_after(node):
            new = graph.call_module(child, args=(node.args[0],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def _fx_activation(gm: fx.GraphModule, node: fx.Node) -> type[nn.Module] | None:
    if node.op == "call_function" and node.target in _FX_RELU_FUNCS:
        return _FX_RELU_FUNCS[node.target]
    if node.op == "call_method" and node.target in _FX_RELU_METHODS:
        return _FX_RELU_METHODS[node.target]
    if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), ACTIVATIONS):
        return type(gm.get_submodule(str(node.target)))
    return None


def _fx_unsupported(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _FX_UNSUPPORTED_FUNCS or node.target in (operator.matmul, torch.matmul)
    return False


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)

