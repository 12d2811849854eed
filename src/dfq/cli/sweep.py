"""``dfq sweep``: uniform and mixed-precision runs of one model, then their report (top-1 against size and BOPs).

Each point is an ordinary run directory under ``--out`` (``uniform-w4a4``, ``mixed-w4a4``); finished points are
kept, so an interrupted sweep continues where it stopped. A mixed point ``W4A4`` is solved under the size and the
bit-operations of uniform W4A4, and every mixed point reuses the sensitivities the first one measured when it
searches the same bit-widths (``recon`` searches each budget's own weight bits, so each of its points measures).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from dfq import rundir
from dfq.errors import DFQError

__all__ = ["cmd_sweep", "sweep_points"]


def sweep_points(uniform: str | None, mixed: str | None) -> list[tuple[str, dict[str, Any]]]:
    """(run name, config overrides) of every point, uniform ones first."""
    from dfq.mixed import parse_uniform

    points = []
    for kind, text in (("uniform", uniform), ("mixed", mixed)):
        for item in [s.strip() for s in (text or "").split(",") if s.strip()]:
            w, a = parse_uniform(item, f"--{kind}")
            settings: dict[str, Any] = {"quant.wbits": w, "quant.abits": a}
            if kind == "mixed":
                settings.update({"mixed.size": f"W{w}A{a}", "mixed.bops": f"W{w}A{a}"})
            points.append((f"{kind}-w{w}a{a}", settings))
    if not points:
        raise DFQError("give the points of the sweep: --uniform W8A8,W4A4 and/or --mixed W4A4,W3A3")
    return points


def cmd_sweep(args: argparse.Namespace) -> int:
    from dfq.api import run
    from dfq.cli.commands import _emit, _make_evaluator
    from dfq.config import load_yaml, parse_set, resolve_config
    from dfq.models import get_model_info
    from dfq.report import write_report

    points = sweep_points(args.uniform, args.mixed)
    base = {"model": args.model, "method.name": args.method, "weights": args.weights, "seed": args.seed,
            **parse_set(args.settings)}  # fmt: skip
    preset = load_yaml(args.config) if args.config else {}
    configs = [(name, resolve_config(preset, {**_for_point(base, "mixed.size" in s), **s})) for name, s in points]
    if args.weights and not Path(args.weights).is_file():
        raise DFQError(f"weights file not found: {args.weights}")
    info = get_model_info(args.model)
    evaluator = _make_evaluator(args, info)[0] if args.data else None
    out, done, cache = Path(args.out), [], None
    for name, config in configs:
        run_dir = out / name
        if (run_dir / rundir.SUMMARY).is_file():
            print(f"{name}: finished earlier, kept")
        else:
            if config.mixed is not None and cache is not None:
                run_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cache, run_dir / rundir.SENSITIVITY)
            print(f"{name}: quantizing -> {run_dir}")
            run(config, run_dir, evaluate=evaluator, overwrite=True, progress=not args.no_progress)
        if config.mixed is not None and cache is None:
            cache = run_dir / rundir.SENSITIVITY
        done.append(run_dir)
    report = write_report(done, out / "report")
    rows = [f"  {r['run']:<16} top-1 {_pct(r['top1'])}  {r['weight_bytes'] / 1e3:9.1f} KB  {r['bops'] / 1e9:8.4f} GBOPs"
            for r in report["rows"]]  # fmt: skip
    _emit(args, "\n".join([f"sweep of {args.model} -> {out}", *rows, f"report -> {report['markdown']}"]), report)
    return 0


def _for_point(settings: dict[str, Any], mixed: bool) -> dict[str, Any]:
    """The shared settings, without the mixed-precision ones for a uniform point."""
    return {k: v for k, v in settings.items() if mixed or not k.startswith("mixed.")}


def _pct(v: Any) -> str:
    return "   –  " if v is None else f"{v:6.2f}"
