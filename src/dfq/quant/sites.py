"""Where the deploy protocol puts activation quantizers, found on the traced dataflow (see :mod:`dfq.quant.api`).

Every tensor that enters an integer operator is put on a grid: the inputs of additions and concatenations, the
input of an activation outside the ReLU family, every Conv2d/Linear input, and the output of every addition,
concatenation, BatchNorm or layer that is not read by exactly one layer or ReLU quantizing it itself. A site goes on
the module that computes the tensor (a BatchNorm's or layer's ``output_quantizer``, a layer's ``input_quantizer``), or
is a module of its own after an addition or concatenation (``blocks.5.add_out``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx, nn

from dfq.quant.graph import (
    CONCAT_FUNCTIONS,
    following_batchnorm,
    is_add,
    is_grid_preserving,
    is_shape,
    producer_chain,
    trace,
)
from dfq.quant.modules import QuantActivation, QuantBatchNorm2d, QuantConv2d, QuantLinear
from dfq.quant.prepare import RELUS, insert_after, set_submodule
from dfq.quant.quantizer import ActQuantizer
from dfq.quant.spec import QuantSpec

if TYPE_CHECKING:
    from dfq.quant.api import QuantConfig

__all__ = ["add_deploy_sites"]


def _deploy_act_quantizer(
    bits: int, config: QuantConfig, fixed_range: tuple[float, float] | None = None
) -> ActQuantizer:
    spec = QuantSpec(bits, symmetric=True, deploy=True)
    return ActQuantizer(spec, config.act_observer, config.act_momentum, fixed_range=fixed_range)


def add_deploy_sites(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Place the deploy protocol's residual and input quantizers (see the module docstring); returns the model
    (rewritten where an addition's or a concatenation's output gets a grid).

    Each Conv2d/Linear then learns which quantizer produced its input and whether a
    BatchNorm folds into it, so its bias can be added on the accumulator grid.
    """
    graph = trace(model, "the deploy protocol")
    modules = dict(model.named_modules())
    joins = _ungridded_joins(graph, modules, config)
    if joins:  # their grids are new modules: trace the rewritten model again
        model = insert_after(model, joins, lambda name, join: _output_quantizer(name, join, modules, config))
        graph = trace(model, "the deploy protocol")
        modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    for node in nodes:
        for arg in _grid_inputs(node, modules, config):
            _quantize_output(model, producer_chain(arg, modules), modules, config)
        if config.quantize_residual and _is_layer_output(node, modules) and not _one_quantizing_reader(node, modules):
            _quantize_output(model, node, modules, config)  # e.g. a squeeze-excitation's input: pooling and a product
    for node in nodes:
        layer = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(layer, QuantConv2d | QuantLinear):
            _prepare_integer_layer(model, node, layer, modules, config)
    return model


def _grid_inputs(node: fx.Node, modules: dict, config: QuantConfig) -> list[fx.Node]:
    """The inputs of ``node`` that must be on a grid: both inputs of an addition and every input of a
    concatenation (with ``quantize_residual``), the input of an activation outside the ReLU family (which an
    integer runtime runs in float between a dequantized input and a quantized output)."""
    if config.quantize_residual and is_add(node):
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if config.quantize_residual and node.op == "call_function" and node.target in CONCAT_FUNCTIONS:
        return [a for a in node.kwargs.get("tensors", node.args[0] if node.args else ()) if isinstance(a, fx.Node)]
    act = modules.get(str(node.target)) if node.op == "call_module" else None
    if isinstance(act, QuantActivation) and not isinstance(act.act, RELUS):
        return [node.args[0]]
    return []


def _ungridded_joins(graph: fx.Graph, modules: dict, config: QuantConfig) -> list[fx.Node]:
    """With ``quantize_residual``, the additions and concatenations that are not read by exactly one layer or ReLU
    that quantizes them itself (the chained residual additions of MobileNetV2 and EfficientNet, where one block's sum
    is the next block's shortcut; a sum that pooling or two layers read; the concatenations of GhostNet and DenseNet):
    each gets a quantizer of its own, named after the operation (``blocks.5.add_out``, ``cat_out``), so that it runs
    on an integer kernel too; everything that reads it shares the grid."""
    if not config.quantize_residual:
        return []
    joins = [n for n in graph.nodes if is_add(n) or (n.op == "call_function" and n.target in CONCAT_FUNCTIONS)]
    return [n for n in joins if not _one_quantizing_reader(n, modules)]


def _readers(node: fx.Node, modules: dict) -> list[fx.Node]:
    """The nodes that read ``node``'s values, looking through grid-preserving operations."""
    out = []
    for user in node.users:
        passes = is_grid_preserving(user, modules) and user.args and user.args[0] is node
        out += _readers(user, modules) if passes else [user]
    return out


def _is_layer_output(node: fx.Node, modules: dict) -> bool:
    m = modules.get(str(node.target)) if node.op == "call_module" else None
    return type(m) is nn.BatchNorm2d or isinstance(m, QuantConv2d | QuantLinear)


def _one_quantizing_reader(node: fx.Node, modules: dict) -> bool:
    """Whether one node alone reads ``node`` and puts it on a grid of its own: a Conv2d/Linear (its input quantizer)
    or a ReLU-family activation (its site, which the export folds into the codes); or nothing reads its values."""
    readers = [r for r in _readers(node, modules) if r.op != "output" and not is_shape(r)]
    if not readers:  # the model's output (logits), or only its shape is read
        return True
    m = modules.get(str(readers[0].target)) if len(readers) == 1 and readers[0].op == "call_module" else None
    return isinstance(m, QuantConv2d | QuantLinear) or (isinstance(m, QuantActivation) and isinstance(m.act, RELUS))


def _prepare_integer_layer(
    model: nn.Module, node: fx.Node, layer: QuantConv2d | QuantLinear, modules: dict, config: QuantConfig
) -> None:
    source = producer_chain(node.args[0], modules)
    site = layer.input_quantizer or _site(source, modules)
    if site is None:
        if source.op == "placeholder":
            site = _deploy_act_quantizer(config.input_bits, config, config.input_range)
        else:
            site = _deploy_act_quantizer(config.bits_for(str(node.target))[1], config)
        layer.input_quantizer = site
    follower = following_batchnorm(node, modules) if isinstance(layer, QuantConv2d) else None
    if follower is not None:
        name, bn = str(follower[0].target), follower[1]
        if not isinstance(bn, QuantBatchNorm2d):
            bn = modules[name] = QuantBatchNorm2d.from_float(bn)
            set_submodule(model, name, bn)
        bn.set_conv(layer)
    layer.set_input_site(site, bn_follows=follower is not None)


def _quantize_output(model: nn.Module, source: fx.Node, modules: dict, config: QuantConfig) -> None:
    """Quantize the BatchNorm, or the Conv2d/Linear with no BatchNorm after it, that computes one input of a
    residual addition, of a concatenation, or of an activation outside the ReLU family (which an integer
    runtime runs in float between a dequantized input and a quantized output), so that the layer runs on an
    integer kernel.

    An input that an addition or a concatenation computes has its own quantizer after it (:func:`_ungridded_joins`).
    """
    if source.op != "call_module" or _site(source, modules) is not None:
        return
    name = str(source.target)
    m = modules[name]
    if type(m) is nn.BatchNorm2d:
        modules[name] = QuantBatchNorm2d.from_float(m, _output_quantizer(name, source, modules, config))
        set_submodule(model, name, modules[name])
    elif isinstance(m, QuantConv2d | QuantLinear) and following_batchnorm(source, modules) is None:
        m.output_quantizer = _output_quantizer(name, source, modules, config)


def _output_quantizer(name: str, node: fx.Node, modules: dict, config: QuantConfig) -> ActQuantizer:
    """The grid of the output site ``name`` on ``node``: ``abits`` where a Conv2d/Linear reads it, else
    ``output_bits`` (see :class:`dfq.quant.QuantConfig`)."""
    readers = [modules[str(r.target)] for r in _readers(node, modules) if r.op == "call_module"]
    layer_reads = any(isinstance(m, QuantConv2d | QuantLinear) for m in readers)
    return _deploy_act_quantizer(config.output_bits_for(name, layer_reads=layer_reads), config)


def _site(node: fx.Node, modules: dict) -> ActQuantizer | None:
    """The activation quantizer whose output ``node`` is, if any."""
    m = modules.get(str(node.target)) if node.op == "call_module" else None
    if isinstance(m, QuantActivation):
        return m.act_quantizer
    if isinstance(m, QuantBatchNorm2d | QuantConv2d | QuantLinear):
        return m.output_quantizer
    return m if isinstance(m, ActQuantizer) else None
