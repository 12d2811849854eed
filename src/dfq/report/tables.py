"""The comparison table: one row of values per run, and its cells as text.

Rows keep the values (``None`` where unknown) for ``--json``; cells format them for the documents.
"""

from __future__ import annotations

from typing import Any

from dfq.report.runs import Run

MISSING = "–"

HEADER = (
    "run",
    "method",
    "model",
    "bits",
    "final top-1",
    "best top-1 (test-selected)",
    "full precision",
    "wall time",
    "iterations",
    "batch size",
)


def row(run: Run) -> dict[str, Any]:
    """The run's values: the summary's where it has them, else what the config and metrics say."""
    s, training = run.summary or {}, _training(run)
    wbits, abits = run.bits
    values: dict[str, Any] = {
        "run": run.name,
        "path": str(run.path),
        "status": "finished" if run.finished else "in progress",
        "method": s.get("method", run.method_name),
        "model": s.get("model", run.model),
        "wbits": s.get("wbits", wbits),
        "abits": s.get("abits", abits),
        "mixed": bool(s.get("mixed")),
        "weight_bytes": s.get("weight_bytes"),
        "bops": s.get("bops"),
        "top1": s.get("top1"),
        "top1_best": training.pop("top1_best"),
        "best_epoch": training.pop("best_epoch"),
        "fp_top1": s.get("fp_top1"),
        "seconds": _seconds(run),
        **training,
    }
    evals = run.evaluations
    if not run.finished and evals:
        values["top1_latest"] = evals[-1][1]
    return values


def _seconds(run: Run) -> Any:
    seconds = (run.summary or {}).get("seconds")
    if seconds is None and run.metrics:
        seconds = run.metrics[-1].get("train_seconds")
    return seconds


def _training(run: Run) -> dict[str, Any]:
    """The columns only generator-based runs have (``None`` for the others)."""
    keys = ("top1_best", "best_epoch", "epochs", "epochs_done", "iters_per_epoch", "iterations", "batch_size")
    if not run.trains:
        return dict.fromkeys(keys)
    s = run.summary or {}
    best_top1, best_epoch = s.get("top1_best"), s.get("best_epoch")
    if best_top1 is None and run.evaluations:
        best_epoch, best_top1 = max(run.evaluations, key=lambda e: e[1])
    return {
        "top1_best": best_top1,
        "best_epoch": best_epoch,
        "epochs": run.epochs,
        "epochs_done": len(run.metrics),
        "iters_per_epoch": run.iters_per_epoch,
        "iterations": run.epochs * run.iters_per_epoch,
        "batch_size": int(s.get("batch_size") or run.batch_size),
    }


def cells(values: dict[str, Any]) -> list[str]:
    """The row as the table's text, in :data:`HEADER`'s order."""
    finished = values["status"] == "finished"
    best = pct(values["top1_best"])
    if values["best_epoch"] is not None and values["top1_best"] is not None:
        best += f" (epoch {values['best_epoch']})"
    iters = _int(values["iterations"])
    if not finished and values["iterations"] is not None:
        iters = f"{_int((values['epochs_done'] or 0) * values['iters_per_epoch'])} of {iters}"
    return [
        values["run"] + ("" if finished else " (in progress)"),
        values["method"],
        values["model"],
        "mixed" if values["mixed"] else f"W{values['wbits']}A{values['abits']}",
        pct(values["top1"]),
        best,
        pct(values["fp_top1"]),
        duration(values["seconds"]),
        iters,
        _int(values["batch_size"]),
    ]


def progress(values: dict[str, Any]) -> str:
    """One in-progress run in a sentence: how far it got and its latest top-1."""
    text = values["run"]
    if values["epochs"] is not None:
        text += f" at {values['epochs_done']} of {values['epochs']} epochs"
    if values.get("top1_latest") is not None:
        text += f", latest top-1 {values['top1_latest']:.2f}"
    return text


def pct(v: Any) -> str:
    return MISSING if v is None else f"{float(v):.2f}"


def _int(v: Any) -> str:
    return MISSING if v is None else f"{int(v):,}"


def duration(s: Any) -> str:
    if s is None:
        return MISSING
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"
