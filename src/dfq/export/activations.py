"""ONNX subgraphs of the activations a quantized model may hold, in opset-17 operators.

In a QDQ model they run in float between a DequantizeLinear and a QuantizeLinear, as ONNX Runtime and OpenVINO run
every nonlinearity they have no integer kernel for. Each subgraph computes what the PyTorch module computes, up to
float32 rounding (ONNX's HardSigmoid multiplies by 1/6 where PyTorch divides by 6: a last-bit difference, which
can move a value lying exactly on a rounding boundary of the next quantizer by one code).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from torch import nn

from dfq.errors import UnsupportedLayerError

__all__ = ["emit_activation"]

Op = Callable[..., str]  # (op_type, inputs, hint, **attrs) -> output name
Const = Callable[[str, np.ndarray], str]  # (hint, array) -> initializer name


def emit_activation(op: Op, const: Const, x: str, act: nn.Module, hint: str) -> str:
    """The output name of ``act`` applied to the float tensor ``x``."""
    out = f"{hint}_out"
    if isinstance(act, nn.ReLU6):
        return op("Clip", [x, const(f"{hint}_lo", np.float32(0)), const(f"{hint}_hi", np.float32(6))], out)
    simple = {nn.ReLU: "Relu", nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh", nn.Hardswish: "HardSwish"}
    if type(act) in simple:
        return op(simple[type(act)], [x], out)
    if isinstance(act, nn.SiLU):
        return op("Mul", [x, op("Sigmoid", [x], f"{hint}_sigmoid")], out)
    if isinstance(act, nn.Hardsigmoid):
        return op("HardSigmoid", [x], out, alpha=1.0 / 6.0, beta=0.5)
    if isinstance(act, nn.LeakyReLU):
        return op("LeakyRelu", [x], out, alpha=float(act.negative_slope))
    if isinstance(act, nn.ELU):
        return op("Elu", [x], out, alpha=float(act.alpha))
    if isinstance(act, nn.Mish):  # x * tanh(softplus(x)); Mish itself is opset 18
        return op("Mul", [x, op("Tanh", [op("Softplus", [x], f"{hint}_softplus")], f"{hint}_tanh")], out)
    if isinstance(act, nn.GELU):
        return _gelu(op, const, x, act.approximate, hint)
    raise UnsupportedLayerError(f"cannot export the activation {hint} ({type(act).__name__}) to ONNX")


def _gelu(op: Op, const: Const, x: str, approximate: str, hint: str) -> str:
    """``x/2 * (1 + erf(x/sqrt(2)))``, or the tanh form (Gelu itself is opset 20)."""
    c = lambda name, v: const(f"{hint}_{name}", np.float32(v))  # noqa: E731
    if approximate == "tanh":
        cube = op("Mul", [op("Mul", [x, x], f"{hint}_x2"), x], f"{hint}_x3")
        inner = op("Add", [x, op("Mul", [cube, c("k", 0.044715)], f"{hint}_kx3")], f"{hint}_inner")
        core = op("Tanh", [op("Mul", [inner, c("s", math.sqrt(2 / math.pi))], f"{hint}_scaled")], f"{hint}_tanh")
    else:
        core = op("Erf", [op("Div", [x, c("sqrt2", math.sqrt(2))], f"{hint}_div")], f"{hint}_erf")
    half_x = op("Mul", [x, c("half", 0.5)], f"{hint}_half")
    return op("Mul", [half_x, op("Add", [core, c("one", 1.0)], f"{hint}_1p")], f"{hint}_out")
