"""Export a quantized run (or a float zoo model) to ONNX, with metadata and optional parity check."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dfq
from dfq.errors import DFQError
from dfq.export.onnx import export_onnx
from dfq.export.runtime import INTEGER_OPS, optimized_op_counts
from dfq.export.verify import verify
from dfq.models import CIFAR10_CLASSES

__all__ = ["export", "load_target"]


def load_target(target: str | Path, weights: str | None = None, progress: bool = True) -> tuple[nn.Module, dict]:
    """A quantized run directory / ``model.pt``, or a zoo model name (float), with its metadata."""
    from dfq.checkpoint import load_quantized
    from dfq.models import create_model

    path = Path(target)
    if path.is_dir() or path.suffix == ".pt":
        if weights:
            raise DFQError("--weights applies to a model name, not to a run directory")
        model, config = load_quantized(path)
        q = config.quant
        if q.protocol != "deploy":
            raise DFQError(
                f"{target} was quantized under the papers' protocol (asymmetric weights, float input and "
                "unfolded BatchNorm), which integer runtimes cannot run; quantize with --protocol deploy to export"
            )
        meta = {"method": config.method, "wbits": q.wbits, "abits": q.abits, "protocol": q.protocol,
                "input_bits": q.input_bits, "quantize_residual": q.quantize_residual}  # fmt: skip
    else:
        model = create_model(str(target), pretrained=weights is None, weights=weights, progress=progress)
        meta = {"method": "none", "wbits": 32, "abits": 32, "protocol": "float"}
    info = model.dfq_info
    meta = {
        "dfq_version": dfq.__version__,
        "model": info.name,
        "dataset": info.dataset,
        "num_classes": info.num_classes,
        "input_size": list(info.input_size),
        "mean": list(info.mean),
        "std": list(info.std),
        **meta,
    }
    if info.dataset == "cifar10":
        meta["class_names"] = list(CIFAR10_CLASSES)
    return model.eval(), meta


def export(
    model: nn.Module,
    out: str | Path,
    metadata: dict[str, Any],
    *,
    verify_batches: Iterable[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Write ``model`` to ``out`` as ONNX; with ``verify_batches``, compare it site by site with PyTorch."""
    input_size = tuple(metadata["input_size"])
    path = export_onnx(model, out, input_size, metadata)
    ops = optimized_op_counts(path)
    result = {
        "out": str(path),
        "bytes": path.stat().st_size,
        "integer_ops": {k: v for k, v in ops.items() if k in INTEGER_OPS},
        "float_ops": {k: v for k, v in ops.items() if k in ("Conv", "Gemm", "MatMul", "Add")},
    }
    if verify_batches is not None:
        result["verify"] = verify(model, input_size, verify_batches)
    return result
