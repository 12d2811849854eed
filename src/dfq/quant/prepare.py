"""What a float model must be made of to be quantized, and the rewrite that gives every activation its own site.

Models that apply activations functionally (``F.silu`` in ``forward``, ``x.sigmoid()``) or reuse one activation
module at several sites are rewritten with ``torch.fx`` so that every activation site is its own module; anything
the protocol cannot place a quantizer after is reported by name, all at once.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.errors import UnsupportedLayerError
from dfq.quant.graph import owner_of
from dfq.quant.modules import QuantActivation
from dfq.quant.quantizer import ActQuantizer, WeightQuantizer

__all__ = [
    "ACTIVATIONS",
    "RELUS",
    "check_supported",
    "insert_after",
    "set_submodule",
    "split_activation_sites",
    "unfuse_norm_act",
]

RELUS = (nn.ReLU, nn.ReLU6)  # non-negative outputs: unsigned grids, and the export folds them into the codes
# Every elementwise nonlinearity a site can follow: the ReLU family, and the smooth and gating ones of mobile and
# modern CNNs (SiLU/Swish, Hardswish, squeeze-excitation's Sigmoid/Hardsigmoid gates, ...), which run in float
# between two quantized tensors, as ONNX Runtime and OpenVINO run them in a QDQ model.
ACTIVATIONS = (*RELUS, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.GELU,
               nn.Mish)  # fmt: skip
# Parameter-free modules that need no quantizer of their own under the papers' protocol.
_PASSTHROUGH = (
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
    nn.Sequential,
    nn.ModuleList,
    nn.ModuleDict,
)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
_SUPPORTED = (
    nn.Conv2d, nn.Linear, QuantActivation, WeightQuantizer, ActQuantizer, *ACTIVATIONS, *_BATCHNORM, *_PASSTHROUGH,
)  # fmt: skip
# Known nonlinearities the protocol cannot place a quantizer after (PReLU: learned slopes).
_UNSUPPORTED_ACTIVATIONS = (nn.PReLU, nn.Softplus, nn.SELU, nn.CELU)


def _arg(node: fx.Node, index: int, key: str, default: object) -> object:
    return node.kwargs.get(key, node.args[index] if len(node.args) > index else default)


# Functional activations -> the module each becomes (built from the call's own arguments).
_FX_FUNCS: dict[object, Callable[[fx.Node], nn.Module]] = {
    **dict.fromkeys((F.relu, torch.relu, torch.relu_), lambda n: nn.ReLU()),
    F.relu6: lambda n: nn.ReLU6(),
    F.silu: lambda n: nn.SiLU(),
    F.hardswish: lambda n: nn.Hardswish(),
    F.hardsigmoid: lambda n: nn.Hardsigmoid(),
    **dict.fromkeys((torch.sigmoid, F.sigmoid), lambda n: nn.Sigmoid()),
    **dict.fromkeys((torch.tanh, F.tanh), lambda n: nn.Tanh()),
    F.mish: lambda n: nn.Mish(),
    F.leaky_relu: lambda n: nn.LeakyReLU(float(_arg(n, 1, "negative_slope", 0.01))),
    F.elu: lambda n: nn.ELU(float(_arg(n, 1, "alpha", 1.0))),
    F.gelu: lambda n: nn.GELU(approximate=str(_arg(n, 1, "approximate", "none"))),
}
_FX_METHODS: dict[str, Callable[[fx.Node], nn.Module]] = {
    **dict.fromkeys(("relu", "relu_"), lambda n: nn.ReLU()),
    **dict.fromkeys(("sigmoid", "sigmoid_"), lambda n: nn.Sigmoid()),
    **dict.fromkeys(("tanh", "tanh_"), lambda n: nn.Tanh()),
}
_FX_UNSUPPORTED_FUNCS = {F.prelu, F.softplus, F.selu, F.celu, F.conv1d, F.conv2d, F.conv3d, F.linear}


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
            "supported: Conv2d, Linear, BatchNorm, the activations "
            f"{', '.join(a.__name__ for a in ACTIVATIONS)} and parameter-free pooling/reshaping"
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


def unfuse_norm_act(model: nn.Module) -> nn.Module:
    """Replace each BatchNorm-activation composite (timm's ``BatchNormAct2d``: a BatchNorm2d subclass whose own
    ``forward`` calls ``F.batch_norm`` on its parameters, then ``self.drop`` and ``self.act``) with the plain
    ``Sequential(bn, drop, act)`` it computes, so the BatchNorm folds and the activation gets its site.

    Raises:
        UnsupportedLayerError: another BatchNorm subclass with a ``forward`` of its own (what it computes is unknown).
    """
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.BatchNorm2d) or type(m).forward is nn.BatchNorm2d.forward:
            continue
        if not (isinstance(getattr(m, "act", None), nn.Module) and isinstance(getattr(m, "drop", None), nn.Module)):
            raise UnsupportedLayerError(
                f"cannot quantize {name} ({type(m).__name__}): a BatchNorm2d subclass with its own forward(); "
                "replace it with nn.BatchNorm2d (and its activation) before quantizing"
            )
        bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        bn.load_state_dict(nn.BatchNorm2d.state_dict(m))
        bn.train(m.training)
        set_submodule(model, name, nn.Sequential(OrderedDict(bn=bn, drop=m.drop, act=m.act)))
    return model


def split_activation_sites(model: nn.Module) -> nn.Module:
    """Give every activation application its own module, rewriting with torch.fx where needed.

    Each module's own ``forward`` is traced separately, children before parents,
    and only modules that apply an activation functionally or call one activation
    module twice are replaced (by a GraphModule with the same submodule names).
    Every other module keeps its class, so names and forward hooks still work. A module
    that cannot be traced on its own (HRNet's blocks take a list of tensors) is rewritten
    within the dataflow of the whole model, where its inputs are concrete.
    """
    untraced = []
    for name, module in reversed(list(model.named_modules())):  # descendants before ancestors
        if type(module).__module__.startswith("torch.nn") and not any(True for _ in module.children()):
            continue  # built-in leaf layers call no activation of their own
        if isinstance(module, nn.ModuleList | nn.ModuleDict):
            continue  # containers without a forward: their users call the children
        if isinstance(module, _LAYERS):
            continue  # a library's subclass of a supported layer (timm's Linear calls F.linear) is that layer
        new = _split_local(module, name, _ShallowTracer(module))
        if new is None:
            untraced.append(name or type(module).__name__)
        elif new is not module and name:
            set_submodule(model, name, new)
        elif new is not module:
            model = new
    if untraced:
        whole = _split_local(model, "", _WholeTracer())
        if whole is None:
            warnings.warn(
                f"torch.fx could not trace {', '.join(untraced[:5])}, nor the whole model; only activation *modules* "
                "in them get activation quantizers, functional activations in their forward() stay in float",
                stacklevel=3,
            )
        model = whole or model
    return model


class _WholeTracer(fx.Tracer):
    """Traces through user modules down to torch.nn's built-in layers."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m).__module__.startswith("torch.nn") and not isinstance(m, nn.Sequential | fx.GraphModule)


def _split_local(module: nn.Module, name: str, tracer: fx.Tracer) -> nn.Module | None:
    """``module`` with each activation application its own module (``module`` itself when nothing changes;
    ``None`` when ``tracer`` cannot trace it)."""
    where = name or type(module).__name__
    try:
        graph = tracer.trace(module)
    except Exception:  # tracing fails on data-dependent control flow
        return None
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
        gm.add_submodule(child, act)
        with graph.inserting_after(node):
            new = graph.call_module(child, args=(node.args[0],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def insert_after(model: nn.Module, targets: list[fx.Node], make: Callable[[str, fx.Node], nn.Module]) -> nn.Module:
    """``model`` with a new module ``make(name, target)`` applied to the output of each of ``targets`` (function or
    method calls of a whole-model trace of ``model``, :func:`dfq.quant.graph.trace`).

    The module whose own ``forward`` makes a target is rewritten with torch.fx (a GraphModule with its class name
    and submodule names, as :func:`split_activation_sites` does) and the new module is its child
    ``<call>_out``; the model itself is rewritten where its own ``forward`` makes the call. A target whose module
    traces differently on its own (a module called twice) is left as it is.
    """
    if not targets:
        return model
    calls: dict[str, list[fx.Node]] = {}  # owner -> the calls its own forward makes, in order
    for n in targets[0].graph.nodes:
        if n.op in ("call_function", "call_method"):
            calls.setdefault(owner_of(n), []).append(n)
    wanted = set(targets)
    for owner, made in calls.items():
        picks = [i for i, n in enumerate(made) if n in wanted]
        if not picks:
            continue
        new = _insert_local(model.get_submodule(owner), picks, made, make, owner)
        if new is not None and owner:
            set_submodule(model, owner, new)
        elif new is not None:
            model = new
    return model


def _insert_local(
    module: nn.Module, picks: list[int], whole: list[fx.Node], make: Callable[[str, fx.Node], nn.Module], owner: str
) -> fx.GraphModule | None:
    try:
        graph = _ShallowTracer(module).trace(module)
    except Exception:  # traced within the whole model only (data-dependent control flow on its own)
        return None
    local = [n for n in graph.nodes if n.op in ("call_function", "call_method")]
    if [n.target for n in local] != [n.target for n in whole]:
        return None
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    for i in picks:
        node = local[i]
        child = f"{node.name}_out"
        gm.add_submodule(child, make(f"{owner}.{child}" if owner else child, whole[i]))
        with graph.inserting_after(node):
            new = graph.call_module(child, args=(node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    graph.lint()
    gm.recompile()
    return gm


def _fx_activation(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The activation module ``node`` applies (a fresh one for a functional call, a copy for a module), if any."""
    if node.op == "call_function" and node.target in _FX_FUNCS:
        return _FX_FUNCS[node.target](node)
    if node.op == "call_method" and node.target in _FX_METHODS:
        return _FX_METHODS[node.target](node)
    if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), ACTIVATIONS):
        return copy.deepcopy(gm.get_submodule(str(node.target)))
    return None


def _fx_unsupported(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _FX_UNSUPPORTED_FUNCS or node.target in (operator.matmul, torch.matmul)
    return False


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)
