"""The Python API, and the run driver behind ``dfq quantize``.

``quantize(model, QuantConfig(...), method=...)`` works on any float classifier built from supported
layers; its input size and class count come from ``example_inputs`` (or a zoo model's metadata) and one
forward pass. ``run(config, out_dir)`` is what ``dfq quantize`` does: build P, quantize it data-free,
save the run directory. Real data reaches a run only through the ``evaluate`` callback, so the methods
stay data-free by construction.

Both run data-parallel when the process group is initialised (under ``torchrun``, see
:mod:`dfq.distributed`): every rank calls them, rank 0 alone writes files and evaluates.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dfq
from dfq import rundir
from dfq.checkpoint import save_quantized
from dfq.config import RunConfig, load_yaml, resolve_config
from dfq.distributed import DistContext
from dfq.errors import DFQError
from dfq.generators import InputStats
from dfq.methods import DEFAULT_METHOD, Method, MethodContext, create_method, method_of_config
from dfq.methods.base import Evaluator
from dfq.mixed import Allocation, MixedConfig, allocate, cost_summary
from dfq.models import create_model
from dfq.quant import QuantConfig
from dfq.utils.io import remove_stale_temporaries, save_json, save_yaml
from dfq.utils.seed import seed_everything

__all__ = ["Evaluator", "QuantizationResult", "describe", "load_run_config", "quantize", "run"]


@dataclass
class QuantizationResult:
    """What :func:`quantize` returns.

    Attributes:
        model: Q, the quantized model (fake-quantized PyTorch modules; export it with :func:`dfq.export_onnx`).
        summary: method, bits, seconds and, with ``evaluate``, ``top1``/``top5`` (games: also ``top1_best``).
        quant: the resolved quantization config (the method's defaults filled in).
        method: the method's resolved config.
        input_size: (C, H, W) of one input.
        allocation: the bits chosen under a mixed-precision budget (``None``: none was given).
    """

    model: nn.Module
    summary: dict[str, Any]
    quant: QuantConfig
    method: Any
    input_size: tuple[int, ...]
    allocation: Allocation | None = None

    @property
    def method_name(self) -> str:
        return str(self.summary["method"])


def quantize(
    model: nn.Module,
    quant_config: QuantConfig | None = None,
    method: str | Any = DEFAULT_METHOD,
    *,
    example_inputs: torch.Tensor | None = None,
    evaluate: Evaluator | None = None,
    seed: int = 0,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    mixed: MixedConfig | None = None,
) -> QuantizationResult:
    """Quantize a float classifier without data.

    Args:
        model: the float classifier P; not modified.
        quant_config: bits and protocol (default ``QuantConfig()``: W4A4 under the deploy protocol).
        method: a registered method's name (``dfq.list_methods()``), or its config object, e.g.
            ``dfq.methods.ReconConfig(iters=200)``.
        example_inputs: one batch of inputs (only the shape is used); optional for zoo models.
        evaluate: optional callback ``model -> {"top1": ..., "top5": ...}`` on real data.
        seed: seed of every random stream.
        run_dir: where generator-based methods keep checkpoints and metrics (``resume`` continues them).
        device: where the generator-based methods train ("cpu", "cuda"; default: the process group's, else
            the CPU); Q is returned there.
        mixed: choose every layer's bits under a budget (e.g. ``MixedConfig(size="W4A4", bops="W4A4")``); the
            sensitivities are cached in ``run_dir``.

    Example:
        >>> import torch, dfq
        >>> p = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        ...                         torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> result = dfq.quantize(p, dfq.QuantConfig(wbits=8, abits=8), dfq.methods.ZeroQConfig(steps=2),
        ...                       example_inputs=torch.randn(1, 3, 8, 8), progress=False)
        >>> result.summary["method"], result.summary["wbits"]
        ('zeroq', 8)
    """
    chosen = _method(method)
    quant = (quant_config or QuantConfig()).resolved(**chosen.quant_defaults())
    chosen.check(quant)
    input_size, num_classes = describe(model, example_inputs)
    dist = DistContext.current(device)
    chosen.check_launch(dist)
    quant, input_stats = from_preprocessing(model, quant)
    ctx = MethodContext(input_size, num_classes, seed, evaluate=evaluate, progress=progress, dist=dist, resume=resume,
                        run_dir=None if run_dir is None else Path(run_dir), input_stats=input_stats)  # fmt: skip
    allocation = None
    if mixed is not None:
        quant, allocation = with_allocation(model, quant, mixed.for_method(chosen.learns_rounding), ctx)
    return _quantize(model, quant, chosen, ctx, allocation)


def with_allocation(
    model: nn.Module, quant: QuantConfig, mixed: MixedConfig, ctx: MethodContext
) -> tuple[QuantConfig, Allocation]:
    """``quant`` with the bits chosen under ``mixed``'s budgets as overrides (after the user's, so they win)."""
    if ctx.dist.active:
        raise DFQError("mixed precision runs on one process; launch it without torchrun or --nproc")
    cache = None if ctx.run_dir is None else ctx.run_dir / rundir.SENSITIVITY
    seed_everything(ctx.seed)  # seeded as the method is: a sweep's later points allocate as a fresh run would
    allocation = allocate(model, quant, mixed, ctx.input_size, generator=torch.Generator().manual_seed(ctx.seed),
                          seed=ctx.seed, input_stats=ctx.input_stats, cache=cache, progress=ctx.progress)  # fmt: skip
    return dataclasses.replace(quant, overrides={**quant.overrides, **allocation.overrides()}), allocation


def from_preprocessing(model: nn.Module, quant: QuantConfig) -> tuple[QuantConfig, InputStats | None]:
    """What a zoo model's preprocessing record gives a run: the input range the deploy protocol's input quantizer
    keeps (unless ``quant`` names one), and where synthetic images must lie (``None``: standardised inputs)."""
    info = getattr(model, "dfq_info", None)
    if info is None:
        return quant, None
    if quant.protocol == "deploy" and quant.input_range is None:
        quant = dataclasses.replace(quant, input_range=info.input_range())
    return quant, info.input_stats()


def _method(method: str | Any) -> Method:
    if isinstance(method, str):
        return create_method(method)
    if isinstance(method, Method):
        return method
    return method_of_config(method)(method)


def describe(model: nn.Module, example_inputs: torch.Tensor | None = None) -> tuple[tuple[int, ...], int]:
    """(C, H, W) of one input and the number of classes, from ``example_inputs`` (or a zoo model's input size)
    and one forward pass in eval mode."""
    if example_inputs is None:
        info = getattr(model, "dfq_info", None)
        if info is None:
            raise DFQError("example_inputs is required for a model outside the dfq zoo (torch.randn(1, 3, 224, 224))")
        example_inputs = torch.zeros(1, *info.input_size)
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 2:
        raise DFQError("example_inputs must be a batch tensor, e.g. torch.randn(1, 3, 224, 224)")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example_inputs[:1].to(device))
    except RuntimeError as e:
        raise DFQError(f"the model does not run on example inputs of shape {tuple(example_inputs.shape)}: {e}") from e
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise DFQError("dfq quantizes classifiers: the model's output must be a (batch, classes) tensor")
    return tuple(example_inputs.shape[1:]), int(out.shape[1])


def _quantize(
    model: nn.Module, quant: QuantConfig, method: Method, ctx: MethodContext, allocation: Allocation | None = None
) -> QuantizationResult:
    seed_everything(ctx.seed)  # the one seeding of a run; the method's own stream is ctx.generator
    ctx.generator = torch.Generator().manual_seed(ctx.seed)
    start = time.perf_counter()
    q, summary = method.quantize(model, quant, ctx)
    summary = {"method": method.name, "wbits": quant.wbits, "abits": quant.abits, **summary}
    summary.setdefault("seconds", round(time.perf_counter() - start, 3))  # unless the method counts its own
    if quant.protocol == "deploy":
        summary.update(cost_summary(q, ctx.input_size))
    if allocation is not None:
        summary.update(mixed=True, predicted_loss=allocation.predicted_loss, sensitivity_s=allocation.sensitivity_s)
    if ctx.evaluate and ctx.dist.main and "top1" not in summary:
        metrics = ctx.evaluate(q)
        summary.update(top1=metrics["top1"], top5=metrics["top5"])
    return QuantizationResult(q, summary, quant, method.config, ctx.input_size, allocation)


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved configuration saved in a run directory (earlier layouts migrated)."""
    path = Path(run_dir) / rundir.CONFIG
    if not path.is_file():
        raise DFQError(f"nothing to resume in {run_dir}: no config.yaml (was a run started there?)")
    return resolve_config(load_yaml(path))


def run(
    config: RunConfig,
    out_dir: str | Path,
    *,
    evaluate: Evaluator | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Quantize ``config.model``; write ``config.yaml``, ``model.pt``, ``summary.json`` (and, for
    generator-based methods, ``checkpoint.pt`` and ``metrics.jsonl``) to ``out_dir``.

    The summary's ``top1`` is the final model's accuracy; ``top1_best`` is the best over the
    evaluations during training, which selects on the test set (the papers' protocol). In a
    data-parallel run every rank calls this; rank 0 writes and evaluates, and ``out_dir`` must be
    on a filesystem every rank reads (a resumed run reads the checkpoint on every rank).
    """
    dist = DistContext.current(device)
    method = config.create_method()
    method.check_launch(dist)
    out = Path(out_dir)
    if dist.main:
        remove_stale_temporaries(out)
    started = (out / rundir.MODEL).exists() or (out / rundir.TRAIN_CHECKPOINT).exists()
    if resume and not (out / rundir.TRAIN_CHECKPOINT).exists():
        raise DFQError(f"nothing to resume in {out}: no {rundir.TRAIN_CHECKPOINT}")
    if started and not (overwrite or resume):
        raise DFQError(
            f"run directory {out} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    # Load P before touching the run directory: a bad weights file must not cost the previous run.
    p = create_model(
        config.model, pretrained=config.weights is None, weights=config.weights, progress=progress and dist.main
    )
    input_size, num_classes = describe(p)
    quant, input_stats = from_preprocessing(p, config.quant)
    if not resume:  # config.yaml records what this launch fixed (the noise streams of a game, the input range)
        config = dataclasses.replace(config, method=method.for_launch(dist.world_size), quant=quant)
        method = config.create_method()
    evaluate = evaluate if dist.main else None
    if dist.main:
        if overwrite and not resume:
            for name in (rundir.TRAIN_CHECKPOINT, rundir.METRICS):
                (out / name).unlink(missing_ok=True)
        save_yaml(config.to_dict(), out / rundir.CONFIG)
    summary: dict[str, Any] = {"model": config.model, "dfq_version": dfq.__version__}
    if evaluate:
        fp = evaluate(p)
        summary.update(fp_top1=fp["top1"], fp_top5=fp["top5"], n=fp["n"])
    ctx = MethodContext(input_size, num_classes, config.seed, evaluate=evaluate, run_dir=out, resume=resume,
                        progress=progress, dist=dist, model_name=config.model, input_stats=input_stats)  # fmt: skip
    allocation = None
    if config.mixed is not None and not resume:  # a resumed run's config.yaml holds the chosen bits already
        quant, allocation = with_allocation(p, config.quant, config.mixed, ctx)
        config = dataclasses.replace(config, quant=quant)
        if dist.main:
            save_yaml(config.to_dict(), out / rundir.CONFIG)
            save_json(allocation.to_dict(), out / rundir.ALLOCATION)
    result = _quantize(p, config.quant, method, ctx, allocation)
    summary.update(result.summary)
    if dist.main:
        save_quantized(out / rundir.MODEL, result.model, config, summary=summary)
    if "top1" in summary and "fp_top1" in summary:
        summary["drop"] = round(summary["fp_top1"] - summary["top1"], 2)
    if dist.main:
        save_json(summary, out / rundir.SUMMARY)
    return summary
