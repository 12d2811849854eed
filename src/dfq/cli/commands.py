"""The commands of ``dfq``: each reads its parsed arguments, calls the Python API and reports.

Every command that reports numbers accepts ``--json`` and then prints one JSON object as the last
line of standard output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import dfq
from dfq.errors import DFQError
from dfq.export.runtime import RUNTIMES

if TYPE_CHECKING:
    from dfq.mixed import MixedConfig


def _emit(args: argparse.Namespace, human: str, payload: dict[str, Any]) -> None:
    print(human)
    if args.json:
        print(json.dumps(payload, sort_keys=True))


def cmd_models(args: argparse.Namespace) -> int:
    from dfq.models import get_model_info, list_models

    names = list_models(args.pattern)
    rows = []
    for n in names:
        info = get_model_info(n)
        rows.append(
            {
                "name": n,
                "dataset": info.dataset,
                "num_classes": info.num_classes,
                "weights": list(info.weights),
                "description": info.description,
            }
        )
    human = "\n".join(f"{r['name']:<22} {r['dataset']:<9} {r['num_classes']:>5}  {r['description']}" for r in rows)
    human += "\n(also tv:NAME and timm:NAME: any torchvision or timm classifier, with --weights FILE)"
    _emit(args, human, {"models": rows})
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from dfq.methods import method_class

    rows = [{"name": n, "description": method_class(n).description} for n in dfq.list_methods()]
    human = "\n".join(f"{r['name']:<10} {r['description']}" for r in rows)
    _emit(args, human, {"methods": rows})
    return 0


def _make_evaluator(args: argparse.Namespace, info: Any):
    """An evaluation callback over the real test set (the only place real data is read)."""
    from dfq.data import make_loader, open_dataset
    from dfq.evaluate import evaluate

    if args.eval_batch_size < 1:
        raise DFQError(f"the evaluation batch size must be >= 1, got {args.eval_batch_size}")
    dataset = open_dataset(
        args.data, image_size=info.input_size[-1], crop_fraction=info.crop_fraction, interpolation=info.interpolation
    )
    if dataset.num_classes > info.num_classes:
        raise DFQError(
            f"{args.data} has {dataset.num_classes} classes but model '{info.name}' predicts {info.num_classes}"
        )
    if tuple(dataset.image_size) != tuple(info.input_size[1:]):
        raise DFQError(
            f"{args.data} has {dataset.image_size} images, model '{info.name}' expects {info.input_size[1:]}"
        )
    total = min(len(dataset), args.limit) if args.limit else len(dataset)

    def run_eval(model: nn.Module) -> dict[str, Any]:
        loader = make_loader(
            dataset, info.mean, info.std, batch_size=args.eval_batch_size, workers=args.workers, limit=args.limit
        )
        return evaluate(model, loader, total=total, progress=not args.no_progress)

    return run_eval, dataset


def cmd_eval(args: argparse.Namespace) -> int:
    from dfq.checkpoint import load_quantized
    from dfq.models import create_model

    target = Path(args.target)
    quantized = target.is_dir() or target.suffix == ".pt"
    if args.runtime != "onnxruntime" and target.suffix != ".onnx":
        raise DFQError("--runtime applies to an exported .onnx file; a run directory or model name runs in PyTorch")
    if target.suffix == ".onnx":
        if args.weights:
            raise DFQError("--weights applies to a model name, not to an ONNX file")
        model, name, bits = _load_onnx(target, args.runtime)
    elif quantized:
        if args.weights:
            raise DFQError("--weights applies to a model name, not to a run directory")
        model, config = load_quantized(target)
        name = config.model
        bits = {"wbits": config.quant.wbits, "abits": config.quant.abits, "method": config.method_name,
                "mixed": config.mixed is not None}  # fmt: skip
    else:
        model = create_model(
            args.target, pretrained=args.weights is None, weights=args.weights, progress=not args.no_progress
        )
        name, bits = args.target, {"wbits": 32, "abits": 32}
    run_eval, dataset = _make_evaluator(args, model.dfq_info)
    start = time.perf_counter()
    with torch.inference_mode():
        metrics = run_eval(model)
    payload = {
        "model": name,
        "data": str(args.data),
        "dataset": dataset.name,
        **bits,
        **metrics,
        "seconds": round(time.perf_counter() - start, 3),
    }
    human = (
        f"{name} on {dataset.name}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  ({metrics['n']} images)"
    )
    _emit(args, human, payload)
    return 0


def _load_onnx(path: Path, runtime: str) -> tuple[nn.Module, str, dict[str, Any]]:
    """An exported model behind the evaluation interface, with the model info its metadata records."""
    from dfq.export.runtime import OnnxClassifier
    from dfq.models import ModelInfo

    model = OnnxClassifier(path, runtime=runtime)
    meta = model.metadata
    missing = [k for k in ("model", "dataset", "num_classes", "input_size", "mean", "std") if k not in meta]
    if missing:
        raise DFQError(f"{path} lacks dfq metadata ({', '.join(missing)}); export it with `dfq export`")
    model.dfq_info = ModelInfo(  # type: ignore[assignment]
        meta["model"], meta["dataset"], int(meta["num_classes"]), tuple(meta["input_size"]),
        tuple(meta["mean"]), tuple(meta["std"]), crop_fraction=float(meta.get("crop_fraction", 0.875)),
        interpolation=str(meta.get("interpolation", "bilinear")),
    )  # fmt: skip
    bits = {k: meta[k] for k in ("wbits", "abits", "method", "protocol", "mixed") if k in meta}
    return model, f"{meta['model']} ({RUNTIMES[runtime]})", {**bits, "runtime": runtime}


def cmd_export(args: argparse.Namespace) -> int:
    from dfq.export.api import export, load_target

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise DFQError(f"{out} exists; pass --overwrite to replace it")
    model, meta = load_target(args.target, args.weights, progress=not args.no_progress)
    batches = None
    if args.verify:
        batches = _verify_batches(args, model)
    result = export(model, out, meta, verify_batches=batches, weight_storage=args.weight_storage, runtime=args.runtime)
    human = f"exported {meta['model']} ({meta['protocol']}) -> {out} ({result['bytes'] / 1024:.0f} KiB)"
    integer = ", ".join(f"{v} {k}" for k, v in result["integer_ops"].items()) or "none"
    human += f"\n  ONNX Runtime integer kernels: {integer}"
    if "verify" in result:
        v = result["verify"]
        worst = max(v["sites"], key=lambda s: s["mismatch"], default=None)
        human += f"\n  parity on {RUNTIMES[args.runtime]}, {v['images']} images: "
        human += f"top-1 agreement {100 * v['top1_agreement']:.2f}%"
        human += f", max |logit error| {v['logits_max_abs_error']:.3g}"
        if worst is not None:
            human += (
                f"\n  worst site {worst['site']}: {100 * worst['mismatch']:.3f}% of codes differ "
                f"(max {worst['max_lsb']:.0f} steps)"
            )
    _emit(args, human, {**result, **{k: meta[k] for k in ("model", "protocol", "wbits", "abits")}})
    return 0


def _verify_batches(args: argparse.Namespace, model: nn.Module) -> list[torch.Tensor]:
    """Real images when --data is given, otherwise standard-normal inputs (data-free)."""
    if args.data:
        from dfq.data import make_loader, open_dataset

        info = model.dfq_info
        dataset = open_dataset(
            args.data,
            image_size=info.input_size[-1],
            crop_fraction=info.crop_fraction,
            interpolation=info.interpolation,
        )
        loader = make_loader(dataset, info.mean, info.std, batch_size=args.eval_batch_size, limit=args.limit or 1000)
        return [x for x, _ in loader]
    g = torch.Generator().manual_seed(0)
    n = args.limit or 256
    return list(torch.randn(n, *model.dfq_info.input_size, generator=g).split(args.eval_batch_size))


_OVERRIDE = re.compile(r"^(?P<pattern>[^=]+)=(?:W(?P<w>\d+))?(?:A(?P<a>\d+))?$", re.IGNORECASE)


def _parse_overrides(items: list[str]) -> dict[str, dict[str, int]]:
    out = {}
    for item in items:
        m = _OVERRIDE.match(item.strip())
        if not m or not (m["w"] or m["a"]):
            raise DFQError(f"--override must look like PATTERN=W8, PATTERN=A8 or PATTERN=W8A8, got '{item}'")
        out[m["pattern"]] = {k: int(v) for k, v in (("wbits", m["w"]), ("abits", m["a"])) if v}
    return out


def cmd_quantize(args: argparse.Namespace) -> int:
    from dfq.api import load_run_config
    from dfq.config import load_yaml, parse_set, resolve_config
    from dfq.models import get_model_info

    if args.nproc is not None and args.nproc < 1:
        raise DFQError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc and args.nproc > 1:
        return _launch(args.argv, args.nproc)
    if args.resume:
        return _finish_quantize(args, load_run_config(args.out), get_model_info)
    preset = load_yaml(args.config) if args.config else {}
    overrides = {
        "model": args.model,
        "method.name": args.method,
        "weights": args.weights,
        "seed": args.seed,
        "quant.wbits": args.wbits,
        "quant.abits": args.abits,
        "quant.protocol": args.protocol,
        "quant.ends_bits": args.ends_bits,
        "mixed.size": args.size_budget,
        "mixed.bops": args.bops_budget,
        "mixed.avg_wbits": args.avg_wbits,
        "mixed.pairs": None if args.pairs is None else [p for p in args.pairs.split(",") if p],
        **parse_set(args.settings),
    }
    if args.override:
        overrides["quant.overrides"] = _parse_overrides(args.override)
    return _finish_quantize(args, resolve_config(preset, overrides), get_model_info)


def _launch(argv: list[str], nproc: int) -> int:
    """Run this very command again as ``nproc`` local processes under torchrun (PyTorch's launcher)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DFQError("--nproc starts its own processes: leave it out under torchrun")
    rest, skip = [], False
    for arg in argv:
        if skip or arg == "--nproc" or arg.startswith("--nproc="):
            skip = arg == "--nproc"
            continue
        rest.append(arg)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.call([*launcher, "-m", "dfq", *rest])


def _finish_quantize(args: argparse.Namespace, config: Any, get_model_info: Any) -> int:
    from dfq.api import run
    from dfq.distributed import process_group

    info = get_model_info(config.model)
    if config.weights and not Path(config.weights).is_file():
        raise DFQError(f"weights file not found: {config.weights}")
    evaluator = _make_evaluator(args, info)[0] if args.data else None  # validates the data before any work
    if args.export:
        _check_export(Path(args.export), config.quant.protocol, args.overwrite)
    with process_group(args.device) as dist:  # the one torchrun describes, if any
        summary = run(
            config,
            args.out,
            evaluate=evaluator,
            overwrite=args.overwrite,
            resume=args.resume,
            progress=not args.no_progress,
            device=dist.device,
        )
    if not dist.main:
        return 0  # rank 0 reports
    bits = "mixed-precision" if config.mixed else f"W{config.quant.wbits}A{config.quant.abits}"
    human = f"{config.method_name} {bits} {config.model}: quantized in {summary['seconds']:.1f}s -> {args.out}"
    if config.mixed:
        human += "\n" + _describe_allocation(Path(args.out), config.mixed)
    if "top1" in summary and "fp_top1" in summary:
        human += (
            f"\n  final top-1 {summary['top1']:.2f}% (full precision {summary['fp_top1']:.2f}%, "
            f"drop {summary['drop']:.2f}) on {summary['n']} images"
        )
        if "top1_best" in summary:
            human += f"\n  best top-1 over evaluations {summary['top1_best']:.2f}% (selected on the test set)"
    payload = {**summary, "out": str(args.out)}
    if args.export:
        payload["export"] = _export_run(Path(args.out), Path(args.export), evaluator)
        human += _describe_export(payload["export"], summary)
    elif config.quant.protocol == "deploy":
        human += f"\n  to ship it: dfq export {args.out} --out model.onnx"
    _emit(args, human, payload)
    return 0


def _describe_allocation(run: Path, mixed: MixedConfig) -> str:
    """The search space, the chosen bits as a table, and the costs against the budgets."""
    from dfq import rundir
    from dfq.mixed import Allocation

    alloc = Allocation(**json.loads((run / rundir.ALLOCATION).read_text()))
    rows = [f"  searched: weights at {_bit_list(mixed.wbits)} bits, activations at {_bit_list(mixed.abits)} bits",
            f"  {'layer or site':<32} {'W':>2} {'A':>2}"]  # fmt: skip
    for key, o in alloc.overrides().items():
        rows.append(f"  {key:<32} {o.wbits or '-':>2} {o.abits or '-':>2}")
    budget = alloc.budget
    size = f"{alloc.weight_bytes / 1e3:,.1f} KB" + (f" (budget {budget['weight_bytes'] / 1e3:,.1f})"
                                                    if budget["weight_bytes"] else "")  # fmt: skip
    bops = f"{alloc.bops / 1e9:.4g} GBOPs" + (f" (budget {budget['bops'] / 1e9:.4g})" if budget["bops"] else "")
    rows.append(f"  weights {size}, {bops}, predicted loss {alloc.predicted_loss:.4g} nats; "
                f"sensitivity pass {alloc.sensitivity_s:.1f}s; bits saved in {run / rundir.ALLOCATION}")  # fmt: skip
    return "\n".join(rows)


def _bit_list(bits: list[int] | None) -> str:
    return "/".join(map(str, bits or []))


def _check_export(path: Path, protocol: str, overwrite: bool) -> None:
    """Refuse an export that would fail, before any quantization work."""
    if protocol != "deploy":
        raise DFQError("--export needs the deploy protocol; the papers' protocol is not what integer runtimes run")
    if path.suffix != ".onnx":
        raise DFQError(f"--export writes an ONNX file (.onnx), got {path.name}")
    if path.exists() and not overwrite:
        raise DFQError(f"{path} exists; pass --overwrite to replace it")
    from dfq.export.onnx import import_onnx
    from dfq.export.runtime import import_onnxruntime

    import_onnx(), import_onnxruntime()  # the export extra is installed


def _export_run(run: Path, path: Path, evaluator: Any) -> dict[str, Any]:
    """Write the finished run as ONNX and, with a test set, evaluate the file on ONNX Runtime."""
    from dfq.export.api import export, load_target
    from dfq.export.runtime import OnnxClassifier

    try:
        model, meta = load_target(run)
        result = export(model, path, meta)
    except DFQError as e:
        raise DFQError(f"{e} (the quantized run is saved in {run}; export it with `dfq export {run}`)") from None
    if evaluator is not None:
        with torch.inference_mode():
            result["onnx_top1"] = evaluator(OnnxClassifier(path))["top1"]
    return result


def _describe_export(result: dict[str, Any], summary: dict[str, Any]) -> str:
    integer = ", ".join(f"{v} {k}" for k, v in result["integer_ops"].items()) or "none"
    human = f"\n  exported -> {result['out']} ({result['bytes'] / 1024:.0f} KiB; integer kernels: {integer})"
    if "onnx_top1" in result:
        human += f"\n  ONNX Runtime top-1 {result['onnx_top1']:.2f}% (PyTorch Q {summary['top1']:.2f}%)"
    return human


def cmd_synthesize(args: argparse.Namespace) -> int:
    from dfq.deploy import save_pool
    from dfq.models import create_model

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise DFQError(f"{out} exists; pass --overwrite to replace it")
    if out.suffix not in (".npz", ".npy"):
        raise DFQError(f"--out must be a .npz or .npy file, got {out.name}")
    model = create_model(args.model, pretrained=args.weights is None, weights=args.weights,
                         progress=not args.no_progress)  # fmt: skip
    start = time.perf_counter()
    images = dfq.synthesize(model, args.num, synthesizer=args.synthesizer, steps=args.steps, seed=args.seed,
                            progress=not args.no_progress)  # fmt: skip
    save_pool(images, out, model)
    seconds = round(time.perf_counter() - start, 3)
    lo, hi = float(images.min()), float(images.max())
    human = f"{len(images)} synthetic images of {args.model} -> {out} in {seconds:.1f}s (values {lo:.2f} to {hi:.2f})"
    _emit(args, human, {"out": str(out), "num": len(images), "shape": list(images.shape), "seconds": seconds,
                        "min": lo, "max": hi, "synthesizer": args.synthesizer})  # fmt: skip
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dfq.report import write_report

    result = write_report(args.runs, args.out)
    n = len(result["rows"])
    human = f"report of {n} run{'s' if n != 1 else ''} with {len(result['images'])} plots -> {result['markdown']}"
    _emit(args, human, result)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dfq.bench import bench

    for flag in ("batch_size", "iters"):
        if getattr(args, flag) < 1:
            raise DFQError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    r = bench(
        args.model,
        args.method,
        args.batch_size,
        iters=args.iters,
        warmup=max(args.warmup, 0),
        wbits=args.bits,
        abits=args.bits,
        fast=args.fast,
    )
    human = (
        f"{r['method']} {r['model']} batch {r['batch_size']}{' fast' if r['fast'] else ''} ({r['threads']} threads): "
        f"median {r['ms_median']:.1f} ms "
        f"(min {r['ms_min']:.1f}, max {r['ms_max']:.1f}) per iteration; lower bound {r['lower_bound_ms']:.1f} ms "
        f"(x{r['ratio_to_lower_bound']:.2f}), float floor {r['float_floor_ms']:.1f} ms "
        f"(x{r['ratio_to_float_floor']:.2f}); "
        f"peak RSS {r['peak_rss_mib']:.0f} MiB\n  phases (ms): "
        + ", ".join(f"{k} {v:.1f}" for k, v in r["phases_ms"].items())
    )
    _emit(args, human, r)
    return 0
