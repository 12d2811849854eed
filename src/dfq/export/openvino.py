"""Run exported models with OpenVINO (CPU plugin), the second runtime dfq checks its exports on.

OpenVINO reads dfq's ONNX directly and turns every ``DequantizeLinear -> Conv`` / ``Gemm`` pattern into an int8
kernel (its low-precision transformations). Its CPU plugin runs float layers in bfloat16 on CPUs that have it
unless told otherwise; dfq asks for float32, so a float model is the float model and Q's float parts (activations
between grids, the classifier's output) compute as they do in ONNX Runtime.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from dfq.errors import DFQError

__all__ = ["compile_model", "executed_precisions", "run_outputs"]

# Layer types whose runtime precision shows whether the arithmetic is integer (u8/i8) or float.
COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Eltwise")


def _ov():
    try:
        import openvino
    except ImportError:
        raise DFQError("running ONNX models on OpenVINO needs the openvino package: pip install openvino") from None
    return openvino


def compile_model(model: str | Path | bytes, *, threads: int | None = None):
    """An OpenVINO CPU ``CompiledModel`` of an ONNX file (or its bytes), with float32 inference precision."""
    ov = _ov()
    core = ov.Core()
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise DFQError(f"ONNX model not found: {model}")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        read = core.read_model(model, b"") if isinstance(model, bytes) else core.read_model(str(model))
        return core.compile_model(read, "CPU", config)
    except Exception as e:  # not ONNX, or a type or operator OpenVINO does not read (e.g. INT2 weights)
        message = str(e).strip().splitlines()
        detail = next((line for line in reversed(message) if line.strip()), "unknown error")
        raise DFQError(f"OpenVINO cannot load {model if not isinstance(model, bytes) else 'the model'}: "
                       f"{detail.strip()}") from None  # fmt: skip


def run_outputs(compiled: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of ``compiled`` on ``x``, in order, under each of its ONNX names (OpenVINO merges the names of
    a tensor that is both a node's output and a graph output)."""
    result = compiled({0: np.ascontiguousarray(x, dtype=np.float32)})
    return {name: np.asarray(result[port]) for port in compiled.outputs for name in sorted(port.get_names())}


def executed_precisions(compiled: Any) -> dict[str, int]:
    """``"Layer:precision"`` counts of the compute layers OpenVINO executes (``Convolution:u8`` = an int8 kernel)."""
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in COMPUTE_LAYERS:
            counts[f"{kind}:{info['runtimePrecision'].astype(str)}"] += 1
    return dict(counts)
