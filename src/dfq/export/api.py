"""Export a quantized run (or a float zoo model) to ONNX, with metadata and optional parity check."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dfq
from dfq.errors import DFQError
from dfq.export.onnx import write_onnx
from dfq.export.runtime import FLOAT_OPS, INTEGER_OPS, optimized_op_counts
from dfq.export.verify import verify
from dfq.models import CIFAR10_CLASSES
from dfq.quant import QuantConv2d, QuantLinear

__all__ = ["describe_model", "export", "load_target", "quant_metadata"]


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
        meta = quant_metadata(config.method_name, q, mixed=config.mixed is not None)
    else:
        model = create_model(str(target), pretrained=weights is None, weights=weights, progress=progress)
        meta = {"method": "none", "wbits": 32, "abits": 32, "protocol": "float"}
    meta = describe_model(model, tuple(model.dfq_info.input_size), meta)
    return model.eval(), meta


def describe_model(model: nn.Module, input_size: tuple[int, ...], extra: dict[str, Any]) -> dict[str, Any]:
    """The metadata an exported file carries: dfq's version, the input size and, for zoo models, the dataset,
    classes and preprocessing record (what ``dfq eval model.onnx`` needs), plus ``extra``."""
    meta: dict[str, Any] = {"dfq_version": dfq.__version__, "input_size": list(input_size)}
    info = getattr(model, "dfq_info", None)
    if info is not None:
        preprocessing = {**info.preprocessing(), "input_size": list(input_size)}  # the size exported
        meta.update(model=info.name, dataset=info.dataset, num_classes=info.num_classes, **preprocessing)
        if info.dataset == "cifar10":
            meta["class_names"] = list(CIFAR10_CLASSES)
    return {**meta, **extra}


def quant_metadata(method: str, quant: Any, mixed: bool = False) -> dict[str, Any]:
    """What a deploy-protocol Q was quantized with, for the exported file's metadata (with ``mixed``, ``wbits`` and
    ``abits`` are the defaults the allocation overrode; ``layer_bits`` has the real ones)."""
    return {"method": method, "wbits": quant.wbits, "abits": quant.abits, "protocol": quant.protocol,
            "input_bits": quant.input_bits, "quantize_residual": quant.quantize_residual, "mixed": mixed}  # fmt: skip


def layer_bits(model: nn.Module) -> dict[str, list[int]]:
    """Layer name -> [weight bits, input bits] of every integer Conv2d/Linear (what a mixed-precision run chose;
    a runtime sees only 8-bit containers, so the file records the grids' real widths)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantConv2d | QuantLinear) and m.input_site is not None:
            out[name] = [m.weight_quantizer.spec.bits, m.input_site.spec.bits]
    return out


def export(
    model: nn.Module,
    out: str | Path,
    metadata: dict[str, Any],
    *,
    verify_batches: Iterable[torch.Tensor] | None = None,
    weight_storage: str = "packed",
    runtime: str = "onnxruntime",
) -> dict[str, Any]:
    """Write ``model`` to ``out`` as ONNX; with ``verify_batches``, compare it site by site with PyTorch on
    ``runtime``. ``weight_storage``: see :func:`dfq.export.onnx.packed_type`."""
    input_size = tuple(metadata["input_size"])
    metadata = {**metadata, "weight_storage": weight_storage, "layer_bits": layer_bits(model)}
    path = write_onnx(model, out, input_size, metadata, weight_storage)
    ops = optimized_op_counts(path)
    result = {
        "out": str(path),
        "bytes": path.stat().st_size,
        "integer_ops": {k: v for k, v in ops.items() if k in INTEGER_OPS},
        "float_ops": {k: v for k, v in ops.items() if k in FLOAT_OPS},
    }
    if verify_batches is not None:
        result["verify"] = verify(model, input_size, verify_batches, weight_storage=weight_storage, runtime=runtime)
    return result
