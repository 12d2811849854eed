"""The report's matplotlib figures: top-1 over iterations, loss components, H′ per epoch, and top-1 against
model size and bit-operations.

matplotlib (the ``plot`` extra) is imported only here and in ``samples``, with the Agg canvas
and no pyplot, so a report never changes the caller's global backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfq.errors import DFQError
from dfq.report.runs import Run, h_band

_TOTALS = {"g_loss": "G: total", "q_loss": "Q: total"}  # every game logs these; the rest is the method's to name

NewFigure = Callable[..., Any]


def figure_factory() -> NewFigure:
    """A ``new_figure(**kwargs)`` on the Agg canvas; a missing matplotlib is a :class:`DFQError`."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise DFQError("dfq report needs matplotlib: pip install 'dfq[plot]'") from e

    def new_figure(**kwargs: Any) -> Any:
        fig = Figure(**kwargs)
        FigureCanvasAgg(fig)
        return fig

    return new_figure


def save(fig: Any, path: Path, dpi: int = 110, tight: bool = True) -> Path:
    try:
        fig.savefig(path, dpi=dpi, bbox_inches="tight" if tight else None)
    except OSError as e:
        raise DFQError(f"cannot write {path}: {e.strerror or e}") from e
    return path


def color(i: int) -> str:
    return f"C{i % 10}"


def _series(run: Run, key: str) -> tuple[list[int], list[float]]:
    """Epochs and values of one metric (NaN where an epoch did not log it)."""
    epochs = [int(r["epoch"]) for r in run.metrics]
    values = [float(r[key]) if r.get(key) is not None else math.nan for r in run.metrics]
    return epochs, values


# ------------------------------------------------------------------ top-1
def plot_top1(new_figure: NewFigure, runs: list[tuple[int, Run]], path: Path) -> Path:
    """Top-1 over iterations of the evaluated runs (``(colour index, run)``), full precision dashed."""
    fig = new_figure(figsize=(8.5, 5.0))
    ax = fig.add_subplot()
    fps: dict[tuple[str, float], int] = {}
    for i, run in runs:
        _top1_curve(ax, run, color(i))
        fp = (run.summary or {}).get("fp_top1")
        if fp is not None:
            fps.setdefault((run.model, float(fp)), i)
    for (model, fp), i in fps.items():
        c = "0.3" if len(fps) == 1 else color(i)
        ax.axhline(fp, ls="--", color=c, lw=1.2, label=f"full precision {model}: {fp:.2f}%")
    ax.set_xlabel("iterations")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Top-1 of the quantized model during training")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_formatter(_thousands())
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1 if len(runs) == 1 else 2, fontsize=8.5)
    return save(fig, path)


# ------------------------------------------------------------------ Pareto
def plot_pareto(new_figure: NewFigure, rows: list[dict[str, Any]], path: Path) -> Path:
    """Top-1 against weight size and against bit-operations: uniform runs as circles, mixed-precision runs as
    stars, each labelled; full precision dashed."""
    fig = new_figure(figsize=(11.0, 4.6))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, scale, label in ((axes[0], "weight_bytes", 1e3, "weight size (KB)"),
                                  (axes[1], "bops", 1e9, "bit-operations per input (GBOPs)")):  # fmt: skip
        for mixed, marker, name in ((False, "o", "uniform"), (True, "*", "mixed precision")):
            pts = sorted((r[key] / scale, r["top1"], r["run"]) for r in rows if r["mixed"] is mixed)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ms=11 if mixed else 7, ls="-",
                        lw=0.8, color="C1" if mixed else "C0", label=name)  # fmt: skip
                for x, y, text in pts:
                    ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, -11), fontsize=7.5)
        fps = {r["fp_top1"] for r in rows if r["fp_top1"] is not None}
        if len(fps) == 1:
            ax.axhline(fps.pop(), ls="--", color="0.3", lw=1.0, label="full precision")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[0].legend(fontsize=8.5, loc="lower right")
    fig.suptitle(f"Top-1 against size and compute: {', '.join(sorted({r['model'] for r in rows}))}")
    return save(fig, path)


def _top1_curve(ax: Any, run: Run, c: str) -> None:
    """One run's evaluations, its best (a star, selected on the test set) and its last point."""
    ipe, evals = run.iters_per_epoch, run.evaluations
    ax.plot([(e + 1) * ipe for e, _ in evals], [v for _, v in evals], "-o", color=c, ms=3.5, lw=1.4, label=run.name)
    best_e, best_v = max(evals, key=lambda e: e[1])
    best = f"{run.name}: best (test-selected) {best_v:.2f}% at epoch {best_e}"
    ax.plot([(best_e + 1) * ipe], [best_v], "*", color=c, ms=15, mec="black", mew=0.7, zorder=5, label=best)
    last_e, last_v = evals[-1]
    last = f"{run.name}: {'final' if run.finished else 'latest (in progress)'} {last_v:.2f}%"
    mfc = c if run.finished else "white"
    ax.plot([(last_e + 1) * ipe], [last_v], "o", ms=9, mfc=mfc, mec=c, mew=2, zorder=4, label=last)


def _thousands() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}")


# ------------------------------------------------------------------ per-epoch plots
def _lr_drops(run: Run) -> list[int]:
    """Epochs whose learning rate (Q's or G's) is below the previous epoch's."""
    drops, prev = [], None
    for r in run.metrics:
        lrs = (r.get("q_lr"), r.get("g_lr"))
        lower = [a is not None and b is not None and a < b * 0.999 for a, b in zip(lrs, prev or lrs, strict=True)]
        if any(lower):
            drops.append(int(r["epoch"]))
        prev = lrs
    return drops


def _epoch_axis(ax: Any, run: Run) -> tuple[bool, bool]:
    """Integer epoch ticks, a grey band over the warm-up epochs (only G trains) and dotted lines
    at learning-rate drops; returns (warm-up shown, drops shown)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    warm = [int(r["epoch"]) for r in run.metrics if r.get("train_q") is False]
    if warm:
        ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="0.9", zorder=0, lw=0)
    drops = _lr_drops(run)
    for e in drops:
        ax.axvline(e - 0.5, ls=":", color="0.35", lw=1.1, zorder=1)
    return bool(warm), bool(drops)


def _epoch_note(warm: bool, drops: bool) -> str:
    parts = (["grey: warm-up, only G trains"] if warm else []) + (["dotted: learning-rate drop"] if drops else [])
    return f"  ({'; '.join(parts)})" if parts else ""


def _is_loss(key: str) -> bool:
    """A logged loss component (not a learning rate, not H′)."""
    return key[:2] in ("g_", "q_") and key not in ("g_lr", "q_lr") and "h_norm" not in key


def loss_keys(run: Run) -> list[str]:
    """The run's logged loss components: G's before Q's, each side's total first."""
    keys: list[str] = []
    for r in run.metrics:
        keys += [k for k in r if k not in keys and _is_loss(k)]
    return sorted(keys, key=lambda k: (k[0] == "q", k[2:] != "loss", k))


def plot_losses(new_figure: NewFigure, run: Run, i: int, path: Path) -> Path:
    """One panel per loss component, mean per epoch."""
    keys = loss_keys(run)
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = new_figure(figsize=(4.2 * ncols, 2.9 * nrows + 0.6), layout="constrained")
    for k, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        warm, drops = _epoch_axis(ax, run)
        ax.plot(*_series(run, key), "-o", color=color(i), ms=2.5, lw=1.3)
        label = {**_TOTALS, **run.log_labels}.get(key, key)
        ax.set_title(f"{label}  ({key})", fontsize=9.5)
        ax.set_xlabel("epoch", fontsize=8.5)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
    fig.suptitle(f"{run.name}: loss components, mean per epoch{_epoch_note(warm, drops)}", fontsize=11)
    return save(fig, path, tight=False)


def has_hnorm(run: Run) -> bool:
    """Whether the run logged H′ (sample adaptability), whatever its method."""
    return any(r.get("g_h_norm") is not None for r in run.metrics)


def plot_hnorm(new_figure: NewFigure, run: Run, i: int, path: Path) -> tuple[Path, bool]:
    """H′ per epoch (median and p10–p90 where logged, else the mean) against the method's band;
    returns the path and whether quantiles were logged."""
    fig = new_figure(figsize=(8.0, 4.6))
    ax = fig.add_subplot()
    warm, drops = _epoch_axis(ax, run)
    band = h_band(run)
    if band is not None:
        label = rf"target band [$\lambda_l$, $\lambda_u$] = [{band[0]:g}, {band[1]:g}]"
        ax.axhspan(*band, color="tab:green", alpha=0.13, lw=0, label=label)
        for y in band:
            ax.axhline(y, color="tab:green", lw=0.8, alpha=0.6)
    quantiles = _hnorm_curves(ax, run, color(i))
    if warm:
        ax.plot([], [], "s", color="0.9", ms=10, label="warm-up (only G trains)")
    if drops:
        ax.plot([], [], ls=":", color="0.35", lw=1.1, label="learning-rate drop")
    ax.set_ylim(0, 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel(r"H′: normalised entropy of softmax($z_p - z_q$)")
    title = f"{run.name}: sample adaptability H′, per-epoch means"
    if not quantiles:
        title += "\n(this run logged only the batch mean of H′, no quantiles)"
    ax.set_title(title, fontsize=10.5)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8.5)
    return save(fig, path), quantiles


def _hnorm_curves(ax: Any, run: Run, c: str) -> bool:
    """The batch mean of H′, and its within-batch median and p10–p90 where logged (returned)."""
    epochs, mean = _series(run, "g_h_norm")
    p10, p50, p90 = (_series(run, f"g_h_norm_{q}")[1] for q in ("p10", "p50", "p90"))
    quantiles = any(not math.isnan(v) for v in p50)
    if quantiles:
        ax.fill_between(epochs, p10, p90, color=c, alpha=0.25, lw=0, label="H′ p10–p90 within a batch")
        ax.plot(epochs, p50, "-o", color=c, ms=2.5, lw=1.5, label="H′ median within a batch")
        ax.plot(epochs, mean, "--", color="black", ms=2.5, lw=1.1, label="H′ batch mean")
    else:
        ax.plot(epochs, mean, "-o", color=c, ms=2.5, lw=1.5, label="H′ batch mean")
    return quantiles
