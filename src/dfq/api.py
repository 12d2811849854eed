"""Python API and the run driver used by the CLI.

``quantize(model, ...)`` works on any float classifier built from supported
layers. ``run(config, out_dir, evaluate=...)`` is what ``dfq quantize`` does:
build P, quantize it data-free, save the run directory. Real data reaches a
run only through the ``evaluate`` callback, so the methods stay data-free by
construction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dfq
from dfq.checkpoint import CHECKPOINT_NAME, save_quantized
from dfq.config import RunConfig, resolve_config
from dfq.errors import DFQError
from dfq.methods.zeroq import zeroq
from dfq.models import create_model
from dfq.utils.io import save_json, save_yaml
from dfq.utils.seed import seed_everything

__all__ = ["Evaluator", "quantize", "run"]

# model -> {"top1", "top5", "n", ...}; supplied by the caller (CLI, tests), never by a method.
Evaluator = Callable[[nn.Module], dict[str, Any]]


def quantize(
    model: nn.Module,
    method: str = "zeroq",
    wbits: int = 4,
    abits: int = 4,
    *,
    input_size: tuple[int, int, int] | None = None,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize a float classifier without data; returns ``(Q, summary)``.

    Args:
        model: float model in eval mode (Conv2d/Linear/BatchNorm/ReLU/ReLU6 and pooling).
        method: data-free method (``"zeroq"``).
        wbits, abits: weight and activation bit-widths.
        input_size: (C, H, W) of one input; taken from ``model.dfq_info`` for zoo models.
        seed: seed of the synthetic data.
        options: dotted config overrides, e.g. ``{"zeroq.steps": 200, "quant.act_observer": "minmax"}``
            passed as ``**{"zeroq.steps": 200}``.

    Example:
        >>> from dfq.models import create_model
        >>> q, summary = quantize(create_model("resnet20a_cifar10"), wbits=8, abits=8,
        ...                       progress=False, **{"zeroq.steps": 2, "zeroq.num_samples": 4})
        >>> summary["method"], summary["wbits"]
        ('zeroq', 8)
    """
    info = getattr(model, "dfq_info", None)
    size = input_size or (info.input_size if info else None)
    if size is None:
        raise DFQError("input_size=(C, H, W) is required for a model outside the dfq zoo")
    config = resolve_config(
        None, {"method": method, "seed": seed, "quant.wbits": wbits, "quant.abits": abits, **options}
    )
    return _quantize(model, config, tuple(size), progress)


def _quantize(
    model: nn.Module, config: RunConfig, input_size: tuple[int, ...], progress: bool
) -> tuple[nn.Module, dict[str, Any]]:
    seed_everything(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    q, _ = zeroq(model, config.quant, config.zeroq, input_size, generator=gen, progress=progress)
    summary = {
        "method": config.method,
        "wbits": config.quant.wbits,
        "abits": config.quant.abits,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return q, summary


def run(
    config: RunConfig,
    out_dir: str | Path,
    *,
    evaluate: Evaluator | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize ``config.model`` and write ``config.yaml``, ``model.pt`` and ``summary.json`` to ``out_dir``."""
    out = Path(out_dir)
    if (out / CHECKPOINT_NAME).exists() and not overwrite:
        raise DFQError(f"run directory {out} already holds a run; pass --overwrite to replace it")
    save_yaml(config.to_dict(), out / "config.yaml")  # early: also checks that out_dir is writable
    p = create_model(config.model, pretrained=config.weights is None, weights=config.weights, progress=progress)
    summary: dict[str, Any] = {"model": config.model, "dfq_version": dfq.__version__}
    if evaluate:
        fp = evaluate(p)
        summary.update(fp_top1=fp["top1"], fp_top5=fp["top5"])
    q, result = _quantize(p, config, p.dfq_info.input_size, progress)
    summary.update(result)
    save_quantized(out / CHECKPOINT_NAME, q, config, summary=summary)
    if evaluate:
        metrics = evaluate(q)
        summary.update(top1=metrics["top1"], top5=metrics["top5"], n=metrics["n"])
        summary["drop"] = round(summary["fp_top1"] - summary["top1"], 2)
    save_json(summary, out / "summary.json")
    return summary
