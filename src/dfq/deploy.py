"""What leaves dfq: an ONNX file of Q, and synthetic calibration images for other toolchains.

``export_onnx(result, "q.onnx")`` writes a deploy-protocol Q (the file ONNX Runtime runs on integer
kernels) with its input shape and metadata read from the result. ``synthesize(model, n)`` returns images
synthesized from the model alone, in its normalised input space: calibration data for any post-training
quantizer (ONNX Runtime's ``quantize_static``, OpenVINO NNCF, torchao PT2E, ...) when real data is off limits.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dfq.api import QuantizationResult, describe
from dfq.errors import DFQError
from dfq.export.api import describe_model, export, quant_metadata
from dfq.generators import distill_inputs, synthesize_pool
from dfq.quant import WeightQuantizer
from dfq.utils.io import atomic_write
from dfq.utils.seed import seed_everything

__all__ = ["SYNTHESIZERS", "export_onnx", "save_pool", "synthesize"]

SYNTHESIZERS = ("decoder", "pixels")


def export_onnx(
    target: QuantizationResult | nn.Module,
    path: str | Path,
    *,
    example_inputs: torch.Tensor | None = None,
    verify: bool | Iterable[torch.Tensor] = False,
    weight_storage: str = "packed",
    runtime: str = "onnxruntime",
) -> dict[str, Any]:
    """Write Q (a :class:`~dfq.api.QuantizationResult` under the deploy protocol, or a float model) as ONNX.

    Args:
        target: what :func:`dfq.quantize` returned, or an ``nn.Module`` (a float model, or a deploy-protocol Q).
        path: the ``.onnx`` file to write (atomically).
        example_inputs: a batch of inputs, for a module whose input size dfq does not know.
        verify: compare PyTorch and ``runtime`` ("onnxruntime" or "openvino") site by site: ``True`` on 256
            standard-normal inputs, or on the given batches.
        weight_storage: "packed" (weights of 2 bits as INT2, of 3-4 bits as INT4: a W4 file is about half a W8
            one), "int4" (INT4 for 2-4 bits, which OpenVINO also reads) or "int8" (8-bit containers, opset 17).

    Returns:
        the file, its size, the integer and float operators ONNX Runtime runs and, with ``verify``, the parity.
    """
    if isinstance(target, QuantizationResult):
        if target.quant.protocol != "deploy":
            raise DFQError(_PAPER_PROTOCOL)
        model, input_size = target.model, tuple(target.input_size)
        extra = quant_metadata(target.method_name, target.quant, mixed=target.allocation is not None)
    else:
        model = target
        if any(isinstance(m, WeightQuantizer) and not m.spec.deploy for m in model.modules()):
            raise DFQError(_PAPER_PROTOCOL)
        info = getattr(model, "dfq_info", None)
        input_size = tuple(example_inputs.shape[1:]) if example_inputs is not None else None
        input_size = input_size or (tuple(info.input_size) if info is not None else None)
        if input_size is None:
            raise DFQError("export_onnx needs example_inputs for a model outside the dfq zoo")
        extra = {}
    if verify is True:
        verify = list(torch.randn(256, *input_size, generator=torch.Generator().manual_seed(0)).split(64))
    meta = describe_model(model, input_size, extra)
    return export(model.eval(), path, meta, verify_batches=verify or None, weight_storage=weight_storage,
                  runtime=runtime)  # fmt: skip


_PAPER_PROTOCOL = (
    "this model was quantized under the papers' protocol (asymmetric weights, float input, unfolded BatchNorm), "
    "which integer runtimes cannot run; quantize with QuantConfig(protocol='deploy') (--protocol deploy) to export"
)


def synthesize(
    model: nn.Module,
    num_samples: int = 256,
    *,
    example_inputs: torch.Tensor | None = None,
    synthesizer: str = "decoder",
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """``num_samples`` images synthesized from ``model`` alone (matching its BatchNorm statistics).

    Args:
        model: a float model with BatchNorm layers; not modified.
        example_inputs: one batch of inputs (only the shape is used); optional for zoo models.
        synthesizer: "decoder" (latent maps and a decoder, swing convolutions: the pool of the ``recon`` method)
            or "pixels" (ZeroQ's optimisation of the pixels themselves).
        steps: optimisation steps (default: 150 per batch of 128 for "decoder", 500 for "pixels").
        seed: seed of the synthesis.

    Returns:
        a float32 tensor (N, C, H, W) in the model's input space (after its normalisation). For a model with a
        preprocessing record (a zoo model), around the input statistics it gives and clipped, channel by channel,
        to the values real images take there (pixels 0 to 255 after the normalisation), so that every image is a
        valid input; other models' images are not clipped (dfq does not know their input range).
    """
    if synthesizer not in SYNTHESIZERS:
        raise DFQError(f"unknown synthesizer '{synthesizer}'; available: {', '.join(SYNTHESIZERS)}")
    if num_samples < 1:
        raise DFQError(f"num_samples must be >= 1, got {num_samples}")
    input_size, _ = describe(model, example_inputs)
    info = getattr(model, "dfq_info", None)
    stats = info.input_stats() if info is not None else None  # raw-pixel models: images where their pixels lie
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    if synthesizer == "pixels":
        images = distill_inputs(model, input_size, num_samples, steps=steps or 500, generator=generator,
                                progress=progress, input_stats=stats)  # fmt: skip
    else:
        images = synthesize_pool(model, input_size, num_samples, steps=steps or 150, generator=generator,
                                 progress=progress, input_stats=stats)  # fmt: skip
    if info is None:
        return images
    lows, highs = (torch.tensor(v, dtype=images.dtype).view(1, -1, 1, 1) for v in info.input_bounds())
    return torch.maximum(torch.minimum(images, highs), lows)


def save_pool(images: torch.Tensor, path: str | Path, model: nn.Module | None = None) -> Path:
    """Save a synthetic pool as ``.npz`` (``images``: float32 NCHW, normalised; ``mean``/``std`` when known)
    or ``.npy`` (the images alone)."""
    path = Path(path)
    array = images.detach().cpu().float().numpy()
    if path.suffix == ".npy":
        return atomic_write(path, lambda f: np.save(f, array))
    if path.suffix != ".npz":
        raise DFQError(f"a synthetic pool is saved as .npz or .npy, got {path.name}")
    info = getattr(model, "dfq_info", None)
    extra = {"mean": np.array(info.mean, np.float32), "std": np.array(info.std, np.float32)} if info else {}
    return atomic_write(path, lambda f: np.savez(f, images=array, **extra))
