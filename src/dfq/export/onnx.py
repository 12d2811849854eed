"""Export a deploy-protocol quantized classifier (or a float one) to ONNX in QDQ form.

Every activation quantizer becomes ``QuantizeLinear -> [Clip] -> DequantizeLinear`` on
uint8 (signed grids with zero point 128); bit-widths below 8 live in that 8-bit
container and the integer ``Clip`` keeps their exact range. Weights have per-channel
``DequantizeLinear`` scales on int8 codes; codes of 4 bits or fewer are stored packed
(INT4 or INT2 initializers, opset 21 or 25) and widened by a ``Cast`` to int8, which
runtimes fold at load time, so the file shrinks and the kernels stay integer. BatchNorm folds into those scales: with
``w = s * n``, ``g * w = (g * s) * n``, so the integer codes ``n`` do not move (a
negative ``g`` flips their sign). Biases are int32 on the accumulator grid
``s_x * s_w``, as Q adds them under the deploy protocol. Values that only move
through pooling, slicing, padding or reshaping stay in the integer domain. ONNX
Runtime fuses these patterns into integer kernels (QLinearConv, QLinearAdd, ...).

The graph is built from the model's torch.fx dataflow with ``onnx.helper`` rather than
``torch.onnx.export``, which cannot express sub-8-bit ranges or integer weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.errors import DFQError, UnsupportedLayerError
from dfq.export.activations import emit_activation
from dfq.export.functions import BY_NAME, FUNCTIONS, METHODS, static_check
from dfq.export.onnx_attrs import (
    INT32_LIMIT,
    active,
    check_container_bits,
    conv_attrs,
    is_spatial_mean,
    keeps_dims,
    layer_bias,
    pair,
    pool_attrs,
    signed_codes,
    upsample_scales,
)
from dfq.export.shapes import BATCH, adaptive_avg_pool, node_shapes, shape_attr
from dfq.export.values import QTensor, Value
from dfq.quant import ActQuantizer, QuantActivation, QuantConv2d, QuantLinear
from dfq.quant.functional import quantize_affine
from dfq.quant.graph import ADD_FUNCTIONS, ADD_METHODS, following_batchnorm, trace
from dfq.quant.modules import batchnorm_affine, bias_grid, folded_weight_scale
from dfq.quant.prepare import ACTIVATIONS, RELUS

__all__ = ["OPSET", "WEIGHT_STORAGES", "build_onnx", "import_onnx", "packed_type", "write_onnx"]

OPSET = 17  # without packed weights
WEIGHT_STORAGES = ("packed", "int4", "int8")
_PACKED_OPSET = {"int4": 21, "int2": 25}  # the first opsets whose Cast reads INT4 / INT2
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def import_onnx():
    try:
        import onnx
    except ImportError:
        raise DFQError("ONNX export needs the onnx package: pip install 'dfq[export]'") from None
    return onnx


class _Builder:
    def __init__(
        self, model: nn.Module, expose_sites: bool, shapes: dict[fx.Node, tuple[int, ...]], weight_storage: str
    ) -> None:
        self.onnx = import_onnx()
        self.weight_storage = weight_storage
        self.opset = OPSET
        self.shapes = shapes
        self.helper = self.onnx.helper
        self.model = model
        self.modules = dict(model.named_modules())
        self.expose_sites = expose_sites
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.site_outputs: list[str] = []
        self.values: dict[fx.Node, Any] = {}  # a tensor (Value), a tuple of them, a dimension or a marker
        self._names: set[str] = set()

    # -- small helpers -------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        name, i = hint, 1
        while name in self._names:
            name, i = f"{hint}_{i}", i + 1
        self._names.add(name)
        return name

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.fresh(hint)
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def as_float(self, value: Value, name: str | None = None) -> str:
        """The float tensor of ``value``, dequantizing it (once) if needed."""
        if value.float_name is None:
            q = value.q
            assert q is not None
            value.float_name = self.op("DequantizeLinear", [q.name, q.scale_name, q.zp_name], name or f"{q.name}_dq")
        return value.float_name

    def value(self, arg: Any) -> Value:
        v = self.values.get(arg) if isinstance(arg, fx.Node) else None
        if not isinstance(v, Value):
            raise UnsupportedLayerError(f"cannot export: expected a tensor, got {arg!r}")
        return v

    # -- quantization sites ----------------------------------------------------------------
    def quantize_site(self, value: Value, aq: ActQuantizer, site: str, code_cap: int | None = None) -> Value:
        """``value`` quantized by ``aq``; ``code_cap`` lowers the largest code (a ReLU6 folded in)."""
        if not active(aq):
            return value
        if int(aq.num_updates) == 0:
            raise DFQError(f"cannot export: activation quantizer {site} was never calibrated")
        if not aq.spec.symmetric:
            raise DFQError(f"cannot export {site}: asymmetric activations; quantize with --protocol deploy")
        check_container_bits(aq.spec.bits, site)
        scale, _, qmin, qmax = aq.qparams()
        # Every activation is uint8 (signed grids offset by 128), since ONNX Runtime fuses
        # convolutions only when their input and output share a type.
        zp = 0 if qmin >= 0 else 128
        scale_name = self.const(f"{site}_scale", np.float32(float(scale)))
        zp_name = self.const(f"{site}_zp", np.uint8(zp))
        q = self.op("QuantizeLinear", [self.as_float(value), scale_name, zp_name], f"{site}_q")
        qmax = qmax if code_cap is None else min(qmax, code_cap)
        if (qmin + zp, qmax + zp) != (0, 255):
            lo, hi = self.const(f"{site}_qmin", np.uint8(qmin + zp)), self.const(f"{site}_qmax", np.uint8(qmax + zp))
            q = self.op("Clip", [q, lo, hi], f"{site}_clip")
        out = Value(q=QTensor(q, float(scale), scale_name, zp_name))
        if self.expose_sites:  # named after its PyTorch module, for parity reports
            self.site_outputs.append(self.as_float(out, site))
        return out

    # -- layers ----------------------------------------------------------------------------
    def weighted(self, node: fx.Node, layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | None) -> Value:
        name = str(node.target)
        x = self.value(node.args[0])
        if isinstance(layer, QuantConv2d | QuantLinear) and layer.input_quantizer is not None:
            x = self.quantize_site(x, layer.input_quantizer, f"{name}.input_quantizer")
        bias = layer_bias(layer).double()
        gain = torch.ones(layer.weight.shape[0], dtype=torch.float64)
        if bn is not None:
            gain, shift = batchnorm_affine(bn)
            bias = gain * bias + shift
        integer = isinstance(layer, QuantConv2d | QuantLinear) and layer.weight_step() is not None
        inputs = [self.as_float(x), self.integer_weight(name, layer, gain) if integer else self.float_weight(
            name, layer, gain)]  # fmt: skip
        if bn is not None or layer.bias is not None:
            grid = layer.accumulator_grid(gain) if integer and x.q is not None else None
            inputs.append(self.bias_input(name, bias, grid))
        if isinstance(layer, nn.Conv2d):
            out = self.op("Conv", inputs, f"{name}_out", **conv_attrs(layer, name))
        else:
            out = self.op("Gemm", inputs, f"{name}_out", transB=1)
        return Value(float_name=out)

    def float_weight(self, name: str, layer: nn.Module, gain: torch.Tensor) -> str:
        wq = getattr(layer, "weight_quantizer", None)
        if wq is not None and not wq.spec.is_noop:
            raise DFQError(f"cannot export {name}: asymmetric weights; quantize with --protocol deploy")
        weight = layer.weight.detach().double()
        folded = weight * gain.reshape(-1, *([1] * (weight.dim() - 1)))
        return self.const(f"{name}_weight", folded.float().numpy())

    def integer_weight(self, name: str, layer: QuantConv2d | QuantLinear, gain: torch.Tensor) -> str:
        """int8 codes of the quantized weight; a folded gain only rescales (and maybe negates) them."""
        wq = layer.weight_quantizer
        check_container_bits(wq.spec.bits, name)
        codes = signed_codes(layer, gain).numpy().astype(np.int8)
        w = self.weight_codes(f"{name}_weight_q", codes, packed_type(wq.spec.bits, self.weight_storage))
        s = self.const(f"{name}_weight_scale", folded_weight_scale(layer.weight_step(), gain).float().numpy())
        z = self.const(f"{name}_weight_zp", np.zeros(codes.shape[0], np.int8))
        return self.op("DequantizeLinear", [w, s, z], f"{name}_weight", axis=0)

    def weight_codes(self, hint: str, codes: np.ndarray, packed: str | None) -> str:
        """int8 codes, stored as they are or packed into ``packed`` ("int4"/"int2") and widened by a Cast."""
        if packed is None:
            return self.const(hint, codes)
        import ml_dtypes  # a dependency of onnx, which packs these types

        stored = self.const(f"{hint}_{packed}", codes.astype(getattr(ml_dtypes, packed)))
        self.opset = max(self.opset, _PACKED_OPSET[packed])
        return self.op("Cast", [stored], hint, to=self.onnx.TensorProto.INT8)

    def bias_input(self, name: str, bias: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor] | None) -> str:
        """int32 bias on the accumulator grid ``s_x * s_w`` when input and weights are integer, else float."""
        if grid is None:
            return self.const(f"{name}_bias", bias.float().numpy())
        codes, step = bias_grid(bias, *grid)
        if codes.abs().max() > INT32_LIMIT:
            raise DFQError(f"cannot export {name}: its bias does not fit in int32 on the accumulator grid")
        b = self.const(f"{name}_bias_q", codes.numpy().astype(np.int32))
        s = self.const(f"{name}_bias_scale", step.numpy())
        z = self.const(f"{name}_bias_zp", np.zeros(len(codes), np.int32))
        return self.op("DequantizeLinear", [b, s, z], f"{name}_bias", axis=0)

    def batchnorm(self, node: fx.Node, bn: nn.BatchNorm2d) -> Value:
        if bn.running_var is None:
            raise UnsupportedLayerError(f"cannot export {node.target}: a BatchNorm without running statistics")
        gain, shift = batchnorm_affine(bn)
        name = str(node.target)
        x = self.as_float(self.value(node.args[0]))
        scale = self.const(f"{name}_scale", gain.float().numpy())
        zero_mean = self.const(f"{name}_mean", np.zeros(len(gain), np.float32))
        one_var = self.const(f"{name}_var", np.ones(len(gain), np.float32))
        b = self.const(f"{name}_bias", shift.float().numpy())
        return Value(self.op("BatchNormalization", [x, scale, b, zero_mean, one_var], f"{name}_out", epsilon=0.0))

    def activation(self, x: Value, act: nn.Module, hint: str) -> Value:
        return Value(emit_activation(self.op, self.const, self.as_float(x), act, hint))

    def grid_op(self, x: Value, op_type: str, hint: str, extra: list[str] | None = None, **attrs: Any) -> Value:
        """An op that moves values: on the integer tensor when there is one (no rounding involved)."""
        extra = extra or []
        if x.q is not None:
            q = x.q
            out = self.op(op_type, [q.name, *extra], hint, **attrs)
            return Value(q=QTensor(out, q.scale, q.scale_name, q.zp_name))
        return Value(self.op(op_type, [self.as_float(x), *extra], hint, **attrs))

    # -- graph walk ------------------------------------------------------------------------
    def build(self, graph: fx.Graph, input_shape: tuple[int, ...]) -> Any:
        folded: set[fx.Node] = set()
        for node in graph.nodes:
            if node in folded:
                continue
            if node.op == "placeholder":
                self._names.add(INPUT_NAME)
                self.values[node] = Value(INPUT_NAME)
            elif node.op == "output":
                out = self.as_float(self.value(node.args[0]))
                self.nodes.append(self.helper.make_node("Identity", [out], [OUTPUT_NAME], name=OUTPUT_NAME))
            elif node.op == "call_module":
                self.values[node] = self.call_module(node, folded)
            elif node.op == "call_function":
                self.values[node] = self.call_function(node)
            elif node.op == "call_method":
                self.values[node] = self.call_method(node)
            elif node.op == "get_attr":
                raise UnsupportedLayerError(f"cannot export: the model reads the tensor attribute {node.target}")
        return self.graph(input_shape)

    def call_module(self, node: fx.Node, folded: set[fx.Node]) -> Value:
        name, m = str(node.target), self.modules[str(node.target)]
        if isinstance(m, nn.Conv2d | nn.Linear):
            bn = following_batchnorm(node, self.modules) if isinstance(m, nn.Conv2d) else None
            out = self.weighted(node, m, bn[1] if bn else None)
            if bn is None:
                return self.output_site(out, m, name)
            folded.add(bn[0])
            self.values[bn[0]] = self.output_site(out, bn[1], str(bn[0].target))
            return Value()
        if isinstance(m, nn.BatchNorm2d):
            return self.output_site(self.batchnorm(node, m), m, name)
        if isinstance(m, QuantActivation):
            return self.activation_site(self.value(node.args[0]), m, name)
        if isinstance(m, ACTIVATIONS):
            return self.activation(self.value(node.args[0]), m, name)
        if isinstance(m, ActQuantizer):
            return self.quantize_site(self.value(node.args[0]), m, name)
        if isinstance(m, nn.Identity | nn.Dropout):
            return self.value(node.args[0])
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return self.grid_op(self.value(node.args[0]), "Flatten", f"{name}_out", axis=1)
        if isinstance(m, nn.MaxPool2d):
            return self.grid_op(self.value(node.args[0]), "MaxPool", f"{name}_out", **pool_attrs(m, name))
        if isinstance(m, nn.Upsample):
            scales = self.const(f"{name}_scales", np.array(upsample_scales(m, name), np.float32))
            return self.grid_op(self.value(node.args[0]), "Resize", f"{name}_out", ["", scales], mode="nearest",
                                coordinate_transformation_mode="asymmetric", nearest_mode="floor")  # fmt: skip
        if isinstance(m, nn.AvgPool2d):
            attrs = pool_attrs(m, name)
            attrs["count_include_pad"] = int(m.count_include_pad)
            return Value(self.op("AveragePool", [self.as_float(self.value(node.args[0]))], f"{name}_out", **attrs))
        if isinstance(m, nn.AdaptiveAvgPool2d) and pair(m.output_size) == (1, 1):
            return Value(self.op("GlobalAveragePool", [self.as_float(self.value(node.args[0]))], f"{name}_out"))
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return adaptive_avg_pool(self, node, m.output_size)
        raise UnsupportedLayerError(f"cannot export layer {name} ({type(m).__name__}) to ONNX")

    def activation_site(self, x: Value, m: QuantActivation, name: str) -> Value:
        """An activation and its quantizer. On an unsigned grid the quantizer's saturation at code 0
        is a ReLU and ReLU6 is a cap on the codes, so no float op stays between a convolution
        and its output quantizer (ONNX Runtime then fuses them into one integer kernel); other
        activations run in float between the two."""
        aq, site = m.act_quantizer, f"{name}.act_quantizer"
        if not active(aq) or aq.qparams()[2] < 0 or not isinstance(m.act, RELUS):
            return self.quantize_site(self.activation(x, m.act, name), aq, site)
        cap = None
        if isinstance(m.act, nn.ReLU6):  # codes of min(x, 6): at most the code of 6 (monotonic rounding)
            cap = int(quantize_affine(torch.tensor(6.0), *aq.qparams(), divide=aq.spec.deploy))
        return self.quantize_site(x, aq, site, code_cap=cap)

    def output_site(self, out: Value, m: nn.Module, name: str) -> Value:
        """A residual site on a BatchNorm (folded) or on a layer's own output (QLinearConv's output grid)."""
        oq = getattr(m, "output_quantizer", None)
        return self.quantize_site(out, oq, f"{name}.output_quantizer") if isinstance(oq, ActQuantizer) else out

    def call_function(self, node: fx.Node) -> Value | str:
        t = node.target
        if t in FUNCTIONS:
            return FUNCTIONS[t](self, node)
        if getattr(t, "__name__", None) in BY_NAME:
            return BY_NAME[t.__name__](self, node)
        if t in ADD_FUNCTIONS:
            return self.add(node)
        if t is torch.flatten:
            return self.flatten(node, node.args[1:], node.kwargs)
        if t in (F.relu, torch.relu):
            return self.activation(self.value(node.args[0]), nn.ReLU(), node.name)
        if t is F.relu6:
            return self.activation(self.value(node.args[0]), nn.ReLU6(), node.name)
        if t is getattr and node.args[1] == "shape":
            return shape_attr(self, node)
        if t is getattr:
            return static_check(self, node)
        raise UnsupportedLayerError(f"cannot export the call {getattr(t, '__name__', t)} ({node.name}) to ONNX")

    def call_method(self, node: fx.Node) -> Value | str:
        t = node.target
        if t in ADD_METHODS:
            return self.add(node)
        if t == "size" and node.args[1:] == (0,):
            return BATCH
        if t in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1 and self._is_batch(node.args[1]):
            return self.grid_op(self.value(node.args[0]), "Flatten", f"{node.name}_out", axis=1)
        if t == "flatten":
            return self.flatten(node, node.args[1:], node.kwargs)
        if t == "contiguous":
            return self.value(node.args[0])
        if t == "mean" and is_spatial_mean(node):
            pooled = self.op("GlobalAveragePool", [self.as_float(self.value(node.args[0]))], f"{node.name}_pool")
            return Value(pooled if keeps_dims(node) else self.op("Flatten", [pooled], f"{node.name}_out", axis=1))
        if t in ("relu", "relu_"):
            return self.activation(self.value(node.args[0]), nn.ReLU(), node.name)
        if t in METHODS:
            return METHODS[t](self, node)
        raise UnsupportedLayerError(f"cannot export the method call .{t}() ({node.name}) to ONNX")

    def _is_batch(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and self.values.get(arg) == BATCH

    def add(self, node: fx.Node) -> Value:
        a, b = node.args[:2]
        return Value(self.op("Add", [self.as_float(self.value(a)), self.as_float(self.value(b))], f"{node.name}_out"))

    def flatten(self, node: fx.Node, args: tuple, kwargs: dict) -> Value:
        start = kwargs.get("start_dim", args[0] if args else 0)
        end = kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
        if (start, end) != (1, -1):
            raise UnsupportedLayerError(f"cannot export flatten({start}, {end}) ({node.name}); only flatten(1)")
        return self.grid_op(self.value(node.args[0]), "Flatten", f"{node.name}_out", axis=1)

    def graph(self, input_shape: tuple[int, ...]) -> Any:
        helper, tp = self.helper, self.onnx.TensorProto
        x = helper.make_tensor_value_info(INPUT_NAME, tp.FLOAT, ["batch", *input_shape])
        y = helper.make_tensor_value_info(OUTPUT_NAME, tp.FLOAT, ["batch", None])
        return helper.make_graph(self.nodes, "dfq", [x], [y], self.initializers)


def packed_type(bits: int, storage: str) -> str | None:
    """The packed ONNX type of ``bits``-bit weight codes under ``storage``, or None for int8.

    ``packed``: INT2 for 2 bits, INT4 for 3-4 bits; ``int4``: INT4 for 2-4 bits (OpenVINO 2026.4 reads INT4 but
    not INT2); ``int8``: every code in an int8 container, opset 17 (runtimes without opset 21).
    """
    if storage not in WEIGHT_STORAGES:
        raise DFQError(f"unknown weight storage {storage!r}; choose one of {', '.join(WEIGHT_STORAGES)}")
    if storage == "int8" or bits > 4:
        return None
    return "int2" if bits <= 2 and storage == "packed" else "int4"


def build_onnx(
    model: nn.Module,
    input_shape: tuple[int, ...],
    metadata: dict[str, Any] | None = None,
    *,
    expose_sites=False,
    weight_storage: str = "packed",
):
    """The ONNX ``ModelProto`` of ``model`` (float or deploy-quantized, in eval mode).

    Args:
        input_shape: ``(C, H, W)``; the batch dimension is dynamic.
        metadata: written to the model's ``metadata_props``, each value JSON-encoded.
        expose_sites: also output every activation quantizer's dequantized tensor, named
            after its PyTorch module (for per-layer parity checks).
        weight_storage: how weight codes of 4 bits or fewer are stored (:func:`packed_type`).
    """
    onnx = import_onnx()
    model = model.eval()
    traced = trace(model, "ONNX export")
    packed_type(8, weight_storage)  # an unknown storage fails before the build
    builder = _Builder(model, expose_sites, node_shapes(model, traced, tuple(input_shape)), weight_storage)
    with torch.no_grad():
        graph = builder.build(traced, tuple(input_shape))
    opsets = [onnx.helper.make_opsetid("", builder.opset)]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, producer_name="dfq")
    proto.ir_version = onnx.helper.find_min_ir_version_for(opsets)  # readable by the oldest runtime that can
    for key, val in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(val)
    onnx.checker.check_model(proto, full_check=True)
    if builder.site_outputs:  # declared with the shapes ONNX infers for them
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(proto).graph.value_info}
        proto.graph.output.extend(inferred[name] for name in builder.site_outputs)
    return proto


def write_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, ...],
    metadata: dict[str, Any] | None = None,
    weight_storage: str = "packed",
) -> Path:
    """Write ``model`` as ONNX to ``path`` (atomically) and return the path."""
    from dfq.utils.io import atomic_write

    proto = build_onnx(model, input_shape, metadata, weight_storage=weight_storage)
    data = proto.SerializeToString()
    return atomic_write(path, lambda f: f.write(data))
