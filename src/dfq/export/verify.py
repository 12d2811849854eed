"""Parity between a PyTorch quantized model and its ONNX export, site by site.

Where parity is not exact, the source is ONNX Runtime's ``QLinearConv`` requantization: it rounds
``float32(acc) * float32(s_x * s_w / s_y)`` with ``acc`` the exact int32 accumulator, where Q rounds
``y / s_y`` with ``y`` from a float32 convolution, BatchNorm and bias. The two differ in the last bits,
so an output within ~1e-6 of a half code rounds the other way (7 of 800k elements at Lite0's stem; an
emulation of that formula matches ONNX Runtime bit for bit). Such 1-LSB flips are rare, but a
depthwise layer multiplies an input LSB by up to ``|w * s_x / s_y|`` output LSBs, so in
MobileNet-style networks they grow layer by layer (Lite0 W8A8: up to 54 LSB at the head on real images); in
ResNets they stay small (ResNet-8: at most 5 LSB). Float ``Add`` nodes are exact (DequantizeLinear and Add in float32).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from dfq.export.onnx import OUTPUT_NAME, build_onnx
from dfq.export.runtime import runner
from dfq.quant import act_quantizers

__all__ = ["verify"]


@torch.no_grad()
def verify(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batches: Iterable[torch.Tensor],
    *,
    weight_storage: str = "packed",
    runtime: str = "onnxruntime",
) -> dict[str, Any]:
    """Compare every activation quantization site and the logits of ``model`` and its ONNX export on ``runtime``.

    Site errors are reported in grid steps (``max_lsb``: 1.0 means one code apart) with the
    fraction of elements whose code differs; logits by max abs error and top-1 agreement.
    """
    model = model.eval()
    sites = dict(act_quantizers(model))
    proto = build_onnx(model, input_shape, expose_sites=True, weight_storage=weight_storage)
    run = runner(proto.SerializeToString(), runtime)
    captured: dict[str, torch.Tensor] = {}
    hooks = [q.register_forward_hook(_capture(captured, name)) for name, q in sites.items()]
    stats: dict[str, dict[str, float]] = {}
    agree = n = 0
    logit_err = 0.0
    try:
        for x in batches:
            ref = model(x).numpy()
            outs = run(x.numpy())
            agree += int((outs[OUTPUT_NAME].argmax(1) == ref.argmax(1)).sum())
            n += len(ref)
            logit_err = max(logit_err, float(np.abs(outs[OUTPUT_NAME] - ref).max()))
            for name in sites.keys() & outs.keys():
                _accumulate(stats, name, captured[name].numpy(), outs[name], _step(sites[name]))
    finally:
        for h in hooks:
            h.remove()
    layers = [{"site": k, "max_lsb": v["max_lsb"], "mismatch": v["bad"] / v["n"]} for k, v in stats.items()]
    agreement = agree / max(n, 1)
    return {"runtime": runtime, "images": n, "top1_agreement": agreement, "logits_max_abs_error": logit_err,
            "sites": layers}  # fmt: skip


def _capture(store: dict[str, torch.Tensor], name: str):
    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        store[name] = output.detach().clone()  # an in-place op later in the forward (x += y) must not change it

    return hook


def _step(q: nn.Module) -> float:
    return float(q.qparams()[0])


def _accumulate(stats: dict, name: str, ref: np.ndarray, out: np.ndarray, step: float) -> None:
    lsb = np.abs(out - ref) / step
    s = stats.setdefault(name, {"max_lsb": 0.0, "bad": 0, "n": 0})
    s["max_lsb"] = max(s["max_lsb"], float(lsb.max()))
    s["bad"] += int((lsb > 0.5).sum())
    s["n"] += lsb.size
