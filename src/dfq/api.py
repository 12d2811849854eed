"""Python API and the run driver used by the CLI.

``quantize(model, ...)`` works on any float classifier built from supported
layers. ``run(config, out_dir, evaluate=...)`` is what ``dfq quantize`` does:
build P, quantize it data-free, save the run directory. Real data reaches a
run only through the ``evaluate`` callback, so the methods stay data-free by
construction.

Both run data-parallel when the process group is initialised (under ``torchrun``,
see :mod:`dfq.distributed`): every rank calls them, rank 0 alone writes files and
evaluates.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dfq
from dfq.checkpoint import CHECKPOINT_NAME, save_quantized
from dfq.config import DEFAULT_METHOD, POST_TRAINING, RunConfig, from_dict, load_yaml, resolve_config
from dfq.distributed import DistContext, with_shards
from dfq.engine import TRAIN_CHECKPOINT, Engine, Evaluator
from dfq.errors import DFQError
from dfq.methods.recon import recon
from dfq.methods.zeroq import zeroq
from dfq.models import create_model
from dfq.utils.io import remove_stale_temporaries, save_json, save_yaml
from dfq.utils.seed import seed_everything

__all__ = ["Evaluator", "load_run_config", "quantize", "run"]


def quantize(
    model: nn.Module,
    method: str = DEFAULT_METHOD,
    wbits: int = 4,
    abits: int = 4,
    *,
    num_classes: int | None = None,
    input_size: tuple[int, int, int] | None = None,
    seed: int = 0,
    evaluate: Evaluator | None = None,
    run_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    **options: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize a float classifier without data; returns ``(Q, summary)``.

    Args:
        model: float classifier (Conv2d/Linear/BatchNorm/ReLU/ReLU6 and pooling); not modified.
        method: "zeroq", "recon", "gdfq", "zaq", "adasg" or "adadfq".
        wbits, abits: weight and activation bit-widths.
        num_classes, input_size: the model's outputs and (C, H, W) input; taken from
            ``model.dfq_info`` for zoo models.
        seed: seed of every random stream.
        evaluate: optional callback ``model -> {"top1": ...}`` on real data.
        run_dir: optional directory for checkpoints and metrics of generator-based methods.
        device: where the generator-based methods train ("cpu", "cuda"; default: the process
            group's device, else the CPU); Q is returned there.
        options: dotted config overrides, e.g. ``**{"train.epochs": 10, "adadfq.lambda_l": 0.3}``.

    Example:
        >>> from dfq.models import create_model
        >>> q, summary = quantize(create_model("resnet20a_cifar10"), "zeroq", wbits=8, abits=8,
        ...                       progress=False, **{"zeroq.steps": 2, "zeroq.num_samples": 4})
        >>> summary["method"], summary["wbits"]
        ('zeroq', 8)
    """
    info = getattr(model, "dfq_info", None)
    size = input_size or (info.input_size if info else None)
    classes = num_classes or (info.num_classes if info else None)
    if size is None:
        raise DFQError("input_size=(C, H, W) is required for a model outside the dfq zoo")
    if classes is None and method not in ("zeroq", "recon"):
        raise DFQError(f"num_classes is required by '{method}' for a model outside the dfq zoo")
    config = resolve_config(
        None, {"method": method, "seed": seed, "quant.wbits": wbits, "quant.abits": abits, **options}
    )
    return _quantize(
        model,
        config,
        int(classes or 0),
        tuple(size),
        evaluate=evaluate,
        run_dir=run_dir,
        progress=progress,
        dist=DistContext.current(device),
    )


def _quantize(
    model: nn.Module,
    config: RunConfig,
    num_classes: int,
    input_size: tuple[int, ...],
    *,
    evaluate: Evaluator | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    dist: DistContext | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    seed_everything(config.seed)
    dist = dist or DistContext.current()
    _check_processes(config, dist)
    if config.method in POST_TRAINING:
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(config.seed)
        timings: dict[str, float] = {}
        if config.method == "zeroq":
            q, _ = zeroq(model, config.quant, config.zeroq, input_size, generator=gen, progress=progress)
        else:
            q, _ = recon(model, config.quant, config.recon, input_size, generator=gen, progress=progress,
                         timings=timings)  # fmt: skip
        summary = {
            "method": config.method,
            "wbits": config.quant.wbits,
            "abits": config.quant.abits,
            "seconds": round(time.perf_counter() - start, 3),
            **timings,
        }
        if evaluate:
            metrics = evaluate(q)
            summary.update(top1=metrics["top1"], top5=metrics["top5"])
        return q, summary
    engine = Engine(
        config,
        model,
        num_classes=num_classes,
        input_size=input_size,
        run_dir=run_dir,
        evaluate=evaluate,
        progress=progress,
        dist=dist,
    )
    return engine.run(resume=resume)


def _check_processes(config: RunConfig, dist: DistContext) -> None:
    if dist.active and config.method in POST_TRAINING:
        raise DFQError(f"'{config.method}' runs on one process; launch it without torchrun or --nproc")


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved configuration saved in a run directory."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise DFQError(f"nothing to resume in {run_dir}: no config.yaml (was a run started there?)")
    return from_dict(RunConfig, load_yaml(path))


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
    _check_processes(config, dist)
    out = Path(out_dir)
    if dist.main:
        remove_stale_temporaries(out)
    started = (out / CHECKPOINT_NAME).exists() or (out / TRAIN_CHECKPOINT).exists()
    if resume and not (out / TRAIN_CHECKPOINT).exists():
        raise DFQError(f"nothing to resume in {out}: no {TRAIN_CHECKPOINT}")
    if started and not (overwrite or resume):
        raise DFQError(
            f"run directory {out} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    # Load P before touching the run directory: a bad weights file must not cost the previous run.
    p = create_model(
        config.model, pretrained=config.weights is None, weights=config.weights, progress=progress and dist.main
    )
    info = p.dfq_info
    if config.method not in POST_TRAINING and not resume:
        config = with_shards(config, dist.world_size)  # config.yaml records the shards this run draws
    evaluate = evaluate if dist.main else None
    if dist.main:
        if overwrite and not resume:
            for name in (TRAIN_CHECKPOINT, "metrics.jsonl"):
                (out / name).unlink(missing_ok=True)
        save_yaml(config.to_dict(), out / "config.yaml")
    summary: dict[str, Any] = {"model": config.model, "dfq_version": dfq.__version__}
    if evaluate:
        fp = evaluate(p)
        summary.update(fp_top1=fp["top1"], fp_top5=fp["top5"], n=fp["n"])
    q, result = _quantize(
        p,
        config,
        info.num_classes,
        info.input_size,
        evaluate=evaluate,
        run_dir=out,
        resume=resume,
        progress=progress,
        dist=dist,
    )
    summary.update(result)
    if dist.main:
        save_quantized(out / CHECKPOINT_NAME, q, config, summary=summary)
    if "top1" in summary and "fp_top1" in summary:
        summary["drop"] = round(summary["fp_top1"] - summary["top1"], 2)
    if dist.main:
        save_json(summary, out / "summary.json")
    return summary
