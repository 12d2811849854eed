"""Run exported models: ONNX Runtime (CPU execution provider), or OpenVINO (:mod:`dfq.export.openvino`)."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dfq.errors import DFQError

__all__ = ["FLOAT_OPS", "INTEGER_OPS", "RUNTIMES", "OnnxClassifier", "import_onnxruntime", "optimized_op_counts",
           "read_metadata", "runner", "session"]  # fmt: skip

RUNTIMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}  # name -> what reports call it

# Operators that compute on integers in ONNX Runtime's optimized graph.
INTEGER_OPS = ("QLinearConv", "QLinearAdd", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger",
               "QLinearGlobalAveragePool", "QLinearAveragePool", "MatMulIntegerToFloat", "QLinearConcat", "QLinearMul",
               "QLinearSigmoid", "QLinearLeakyRelu")  # fmt: skip
# Float operators that do a layer's or an addition's arithmetic, including ONNX Runtime's fusions of them
# (FusedConv is a float Conv with its activation or a residual Add folded in).
FLOAT_OPS = ("Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "Add", "Sum",
             "NhwcFusedConv", "QuickGelu")  # fmt: skip


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise DFQError("running ONNX models needs onnxruntime: pip install 'dfq[export]'") from None
    return onnxruntime


def session(model: str | Path | bytes, *, threads: int | None = None, optimized_path: str | Path | None = None):
    """An ONNX Runtime CPU session with all graph optimizations (the fusions into integer kernels)."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    source = model if isinstance(model, bytes) else str(model)
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise DFQError(f"ONNX model not found: {model}")
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # a file that is not ONNX, or an invalid graph
        raise DFQError(f"ONNX Runtime cannot load {model if not isinstance(model, bytes) else 'the model'}: "
                       f"{str(e).splitlines()[0]}") from None  # fmt: skip


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The model's ``metadata_props``, JSON-decoded (values that are not JSON stay strings)."""
    meta = session(path).get_modelmeta().custom_metadata_map
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:  # written by another tool
            out[k] = v
    return out


def optimized_op_counts(model: str | Path | bytes) -> dict[str, int]:
    """Operator counts of the graph ONNX Runtime actually executes, after its fusions.

    The evidence that integer kernels run: quantized convolutions appear as
    ``QLinearConv`` instead of ``DequantizeLinear -> Conv``.
    """
    onnx = __import__("onnx")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        session(model, optimized_path=path)
        graph = onnx.load(str(path)).graph
    return dict(Counter(n.op_type for n in graph.node))


def runner(
    model: str | Path | bytes, runtime: str = "onnxruntime", *, threads: int | None = None
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A function from an input batch to every output of the ONNX model, by name, on ``runtime``."""
    if runtime not in RUNTIMES:
        raise DFQError(f"unknown runtime '{runtime}'; available: {', '.join(RUNTIMES)}")
    if runtime == "openvino":
        from dfq.export.openvino import compile_model, run_outputs

        compiled = compile_model(model, threads=threads)
        return lambda x: run_outputs(compiled, x)
    sess = session(model, threads=threads)
    names, input_name = [o.name for o in sess.get_outputs()], sess.get_inputs()[0].name
    return lambda x: dict(zip(names, sess.run(None, {input_name: np.ascontiguousarray(x, np.float32)}), strict=True))


class OnnxClassifier(nn.Module):
    """An exported classifier behind the ``nn.Module`` interface that :func:`dfq.evaluate.evaluate` takes."""

    def __init__(self, path: str | Path, threads: int | None = None, runtime: str = "onnxruntime") -> None:
        super().__init__()
        self.path = Path(path)
        self.runtime = runtime
        self.run = runner(path, runtime, threads=threads)
        self.metadata = read_metadata(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.run(x.detach().cpu().numpy())
        return torch.from_numpy(next(iter(outputs.values())))
