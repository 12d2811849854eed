"""Reports of run directories: a comparison table and plots (``dfq report``).

``write_report(run_dirs, out_dir)`` reads what each run directory holds
(``config.yaml``, and where present ``summary.json``, ``metrics.jsonl``,
``checkpoint.pt``) and writes ``report.md``, ``report.html`` and PNG plots:

- ``top1.png``: top-1 over iterations of every evaluated run, final and best points marked
  (the best is selected on the test set), full precision dashed;
- ``losses_<run>.png``: each logged loss component over epochs;
- ``hnorm_<run>.png`` (AdaSG/AdaDFQ): H′ per batch against the run's [λ_l, λ_u] band;
- ``samples_<run>.png``: synthetic images of the run's generator, per class.

Runs without ``summary.json`` are reported as in progress with what exists;
ZeroQ runs (no metrics, no generator) get a table row only. The plots need
matplotlib (the ``plot`` extra), imported only here and only with the Agg canvas.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfq.config import POST_TRAINING, RunConfig, from_dict, load_yaml
from dfq.engine import TRAIN_CHECKPOINT, read_train_checkpoint
from dfq.errors import DFQError
from dfq.models import CIFAR10_CLASSES

__all__ = ["generator_samples", "load_run", "write_report"]

MISSING = "–"
SAMPLES_PER_CLASS = 8
MAX_CLASSES = 10
SAMPLE_SEED = 0


# What the logged components are (METHODS.md); unknown keys are shown by name only.
_COMPONENTS = {
    "g_loss": "G: total",
    "g_bg": "G: balance gap L_BG",
    "g_ds": "G: disagreement CE",
    "g_as": "G: agreement CE",
    "g_bns": "G: BN statistics",
    "g_ce": "G: cross-entropy",
    "g_l1": "G: output discrepancy",
    "g_scrm": "G: feature discrepancy",
    "g_act": "G: activation regulariser",
    "q_loss": "Q: total",
    "q_kd": "Q: distillation",
    "q_ce": "Q: cross-entropy",
    "q_l1": "Q: output discrepancy",
    "q_scrm": "Q: feature discrepancy",
}


@dataclass
class Run:
    """What one run directory holds (missing files as ``None`` / empty)."""

    path: Path
    name: str
    config: RunConfig
    summary: dict[str, Any] | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    has_checkpoint: bool = False
    slug: str = ""

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def trains(self) -> bool:
        """A generator-based run (epochs, iterations and a generator)."""
        return self.config.method not in POST_TRAINING

    @property
    def iters_per_epoch(self) -> int:
        return int((self.summary or {}).get("iters_per_epoch") or self.config.train.iters_per_epoch)

    @property
    def epochs(self) -> int:
        return int((self.summary or {}).get("epochs") or self.config.train.epochs)

    @property
    def evaluations(self) -> list[tuple[int, float]]:
        return [(int(r["epoch"]), float(r["top1"])) for r in self.metrics if r.get("top1") is not None]


# ------------------------------------------------------------------ reading
def load_run(run_dir: str | Path) -> Run:
    """Read a run directory; a missing directory or ``config.yaml`` is a :class:`DFQError`."""
    path = Path(run_dir)
    if not path.is_dir():
        raise DFQError(f"run directory not found: {path}")
    if not (path / "config.yaml").is_file():
        raise DFQError(f"{path} is not a run directory: it has no config.yaml")
    config = from_dict(RunConfig, load_yaml(path / "config.yaml"))
    summary = None
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DFQError(f"{path / 'summary.json'} is not valid JSON: {e}") from e
        if not isinstance(summary, dict):
            raise DFQError(f"{path / 'summary.json'} must hold a JSON object")
    return Run(
        path=path,
        name=path.resolve().name or str(path),
        config=config,
        summary=summary,
        metrics=_read_metrics(path / "metrics.jsonl"),
        has_checkpoint=(path / TRAIN_CHECKPOINT).is_file(),
    )


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DFQError(f"{path} line {i} is not valid JSON: {e}") from e
        if not isinstance(record, dict) or "epoch" not in record:
            raise DFQError(f"{path} line {i} is not a metrics record")
        by_epoch[int(record["epoch"])] = record  # a redone epoch replaces the earlier record
    return [by_epoch[e] for e in sorted(by_epoch)]


def _name_runs(runs: list[Run]) -> None:
    """Unique display names (parent/name on clashes) and file-name slugs."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    slugs: set[str] = set()
    for r in runs:
        if counts[r.name] > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", r.name).strip("._") or "run"
        slug, k = base, 2
        while slug in slugs:
            slug, k = f"{base}-{k}", k + 1
        slugs.add(slug)
        r.slug = slug


def _model_info(name: str) -> Any:
    from dfq.models import get_model_info

    try:
        return get_model_info(name)
    except DFQError:
        return None


# ------------------------------------------------------------------ table
def _row(run: Run) -> dict[str, Any]:
    s, c = run.summary or {}, run.config
    evals = run.evaluations
    best_top1, best_epoch = s.get("top1_best"), s.get("best_epoch")
    if best_top1 is None and evals:
        best_epoch, best_top1 = max(evals, key=lambda e: e[1])
    seconds = s.get("seconds")
    if seconds is None and run.metrics:
        seconds = run.metrics[-1].get("train_seconds")
    row: dict[str, Any] = {
        "run": run.name,
        "path": str(run.path),
        "status": "finished" if run.finished else "in progress",
        "method": s.get("method", c.method),
        "model": s.get("model", c.model),
        "wbits": s.get("wbits", c.quant.wbits),
        "abits": s.get("abits", c.quant.abits),
        "top1": s.get("top1"),
        "top1_best": best_top1 if run.trains else None,
        "best_epoch": best_epoch if run.trains else None,
        "fp_top1": s.get("fp_top1"),
        "seconds": seconds,
        "epochs": run.epochs if run.trains else None,
        "epochs_done": len(run.metrics) if run.trains else None,
        "iters_per_epoch": run.iters_per_epoch if run.trains else None,
        "iterations": run.epochs * run.iters_per_epoch if run.trains else None,
        "batch_size": int(s.get("batch_size") or c.train.batch_size) if run.trains else None,
    }
    if not run.finished and evals:
        row["top1_latest"] = evals[-1][1]
    return row


_HEADER = (
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


def _cells(row: dict[str, Any]) -> list[str]:
    run = row["run"] + (" (in progress)" if row["status"] != "finished" else "")
    best = _pct(row["top1_best"])
    if row["best_epoch"] is not None and row["top1_best"] is not None:
        best += f" (epoch {row['best_epoch']})"
    iters = _int(row["iterations"])
    if row["status"] != "finished" and row["iterations"] is not None:
        iters = f"{_int((row['epochs_done'] or 0) * row['iters_per_epoch'])} of {iters}"
    return [
        run,
        row["method"],
        row["model"],
        f"W{row['wbits']}A{row['abits']}",
        _pct(row["top1"]),
        best,
        _pct(row["fp_top1"]),
        _duration(row["seconds"]),
        iters,
        _int(row["batch_size"]),
    ]


def _pct(v: Any) -> str:
    return MISSING if v is None else f"{float(v):.2f}"


def _int(v: Any) -> str:
    return MISSING if v is None else f"{int(v):,}"


def _duration(s: Any) -> str:
    if s is None:
        return MISSING
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


# ------------------------------------------------------------------ plots
def _matplotlib() -> Any:
    """The Figure class, with the Agg canvas (no pyplot, no global backend change)."""
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


def _save(fig: Any, path: Path, dpi: int = 110, tight: bool = True) -> Path:
    try:
        fig.savefig(path, dpi=dpi, bbox_inches="tight" if tight else None)
    except OSError as e:
        raise DFQError(f"cannot write {path}: {e.strerror or e}") from e
    return path


def _color(i: int) -> str:
    return f"C{i % 10}"


def _series(run: Run, key: str) -> tuple[list[int], list[float]]:
    """Epochs and values of one metric (NaN where an epoch did not log it)."""
    epochs = [int(r["epoch"]) for r in run.metrics]
    values = [float(r[key]) if r.get(key) is not None else math.nan for r in run.metrics]
    return epochs, values


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


def _plot_top1(new_figure: Any, runs: list[tuple[int, Run]], path: Path) -> Path:
    fig = new_figure(figsize=(8.5, 5.0))
    ax = fig.add_subplot()
    fps: dict[tuple[str, float], int] = {}
    for i, run in runs:
        ipe, evals, color = run.iters_per_epoch, run.evaluations, _color(i)
        xs = [(e + 1) * ipe for e, _ in evals]
        ys = [v for _, v in evals]
        ax.plot(xs, ys, "-o", color=color, ms=3.5, lw=1.4, label=run.name)
        best_e, best_v = max(evals, key=lambda e: e[1])
        ax.plot(
            [(best_e + 1) * ipe],
            [best_v],
            "*",
            color=color,
            ms=15,
            mec="black",
            mew=0.7,
            zorder=5,
            label=f"{run.name}: best (test-selected) {best_v:.2f}% at epoch {best_e}",
        )
        last_e, last_v = evals[-1]
        what = "final" if run.finished else "latest (in progress)"
        ax.plot(
            [(last_e + 1) * ipe],
            [last_v],
            "o",
            ms=9,
            mfc="white" if not run.finished else color,
            mec=color,
            mew=2,
            zorder=4,
            label=f"{run.name}: {what} {last_v:.2f}%",
        )
        fp = (run.summary or {}).get("fp_top1")
        if fp is not None:
            fps.setdefault((run.config.model, float(fp)), i)
    for (model, fp), i in fps.items():
        color = "0.3" if len(fps) == 1 else _color(i)
        ax.axhline(fp, ls="--", color=color, lw=1.2, label=f"full precision {model}: {fp:.2f}%")
    ax.set_xlabel("iterations")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Top-1 of the quantized model during training")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_formatter(_thousands())
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1 if len(runs) == 1 else 2, fontsize=8.5)
    return _save(fig, path)


def _thousands() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}")


def _is_loss(key: str) -> bool:
    """A logged loss component (not a learning rate, not H′)."""
    return key[:2] in ("g_", "q_") and key not in ("g_lr", "q_lr") and "h_norm" not in key


def _loss_keys(run: Run) -> list[str]:
    keys: list[str] = []
    for r in run.metrics:
        keys += [k for k in r if k not in keys and _is_loss(k)]

    def order(k: str) -> tuple[int, int, str]:
        return (k[0] == "q", k[2:] != "loss", k)

    return sorted(keys, key=order)


def _plot_losses(new_figure: Any, run: Run, i: int, path: Path) -> Path:
    keys = _loss_keys(run)
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = new_figure(figsize=(4.2 * ncols, 2.9 * nrows + 0.6), layout="constrained")
    for k, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        warm, drops = _epoch_axis(ax, run)
        epochs, values = _series(run, key)
        ax.plot(epochs, values, "-o", color=_color(i), ms=2.5, lw=1.3)
        ax.set_title(f"{_COMPONENTS.get(key, key)}  ({key})", fontsize=9.5)
        ax.set_xlabel("epoch", fontsize=8.5)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
    fig.suptitle(f"{run.name}: loss components, mean per epoch{_epoch_note(warm, drops)}", fontsize=11)
    return _save(fig, path, tight=False)


def _plot_hnorm(new_figure: Any, run: Run, i: int, path: Path) -> tuple[Path, bool]:
    cfg = getattr(run.config, run.config.method)
    lo, hi = cfg.lambda_l, cfg.lambda_u
    fig = new_figure(figsize=(8.0, 4.6))
    ax = fig.add_subplot()
    warm, drops = _epoch_axis(ax, run)
    band = rf"target band [$\lambda_l$, $\lambda_u$] = [{lo:g}, {hi:g}]"
    ax.axhspan(lo, hi, color="tab:green", alpha=0.13, lw=0, label=band)
    for y in (lo, hi):
        ax.axhline(y, color="tab:green", lw=0.8, alpha=0.6)
    epochs, mean = _series(run, "g_h_norm")
    _, p10 = _series(run, "g_h_norm_p10")
    _, p50 = _series(run, "g_h_norm_p50")
    _, p90 = _series(run, "g_h_norm_p90")
    quantiles = any(not math.isnan(v) for v in p50)
    color = _color(i)
    if quantiles:
        ax.fill_between(epochs, p10, p90, color=color, alpha=0.25, lw=0, label="H′ p10–p90 within a batch")
        ax.plot(epochs, p50, "-o", color=color, ms=2.5, lw=1.5, label="H′ median within a batch")
    ax.plot(
        epochs,
        mean,
        "--" if quantiles else "-o",
        color="black" if quantiles else color,
        ms=2.5,
        lw=1.1 if quantiles else 1.5,
        label="H′ batch mean",
    )
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
    return _save(fig, path), quantiles


def generator_samples(run_dir: str | Path, per_class: int = SAMPLES_PER_CLASS) -> dict[str, Any]:
    """Synthetic images from a run's generator (``checkpoint.pt``), de-normalised to [0, 1].

    Conditional generators: ``per_class`` images for each of up to 10 classes (evenly spaced
    over the classes), one row per class; unconditional ones: 64 images. The generator runs in
    train mode (batch statistics, as in training) under ``torch.no_grad()`` with a fixed seed,
    leaving the global random state alone. Returns ``images`` (N, C, H, W), ``classes`` (one per
    row, or ``None``), ``per_row``, ``epoch``/``iteration`` of the checkpoint and ``normalised``
    (False when the model is unknown and mean 0 / std 1 was assumed).
    """
    from dfq.methods import method_class
    from dfq.utils.state import state_dict_mismatch

    run_dir = Path(run_dir)
    ckpt = read_train_checkpoint(run_dir)
    config = from_dict(RunConfig, ckpt["config"])
    state = ckpt["generator"]
    info = _model_info(config.model)
    if info is not None:
        (channels, size, _), num_classes = info.input_size, info.num_classes
    else:  # a model outside the zoo: read the shapes off the generator's weights
        channels = int(state["conv3.weight"].shape[0])
        size = 4 * math.isqrt(int(state["l1.weight"].shape[0]) // 128)
        emb = state.get("label_emb.weight", state.get("bn0.gamma.weight"))
        num_classes = int(emb.shape[0]) if emb is not None else 1
    method = method_class(config.method)
    name = config.generator.name or method.generator or ("cifar" if size <= 64 else "imagenet")
    from dfq.generators import create_generator

    with torch.random.fork_rng(devices=[]):
        gen: nn.Module = create_generator(
            name, num_classes, size, config.generator.latent_dim or method.latent_dim, channels=channels
        )
    problem = state_dict_mismatch(gen.state_dict(), state)
    if problem:
        raise DFQError(f"the generator in {run_dir / TRAIN_CHECKPOINT} does not fit the run's config: {problem}")
    gen.load_state_dict(state)
    gen.train()  # batch statistics, as the engine runs it
    sampler = torch.Generator().manual_seed(SAMPLE_SEED)
    conditional = getattr(gen, "conditional", True)
    if conditional:
        k = min(num_classes, MAX_CLASSES)
        classes = torch.linspace(0, num_classes - 1, k).round().long().unique()
        y = classes.repeat_interleave(per_class)
        per_row = per_class
    else:
        classes, per_row = None, 8
        y = None
    n = len(y) if y is not None else 64
    z = torch.randn(n, gen.latent_dim, generator=sampler)
    with torch.no_grad():
        x = gen(z, y).float()
    mean, std = (info.mean, info.std) if info is not None else ((0.0,) * channels, (1.0,) * channels)
    x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    return {
        "images": x.clamp(0, 1),
        "classes": classes.tolist() if classes is not None else None,
        "per_row": per_row,
        "epoch": ckpt.get("epoch"),
        "iteration": ckpt.get("iteration"),
        "normalised": info is not None,
        "dataset": info.dataset if info is not None else None,
    }


def _plot_samples(new_figure: Any, run: Run, path: Path) -> Path:
    s = generator_samples(run.path)
    images, per_row = s["images"], s["per_row"]
    n, c, h, w = images.shape
    rows = math.ceil(n / per_row)
    pad = max(1, h // 16)
    grid = torch.ones(c, rows * (h + pad) - pad, per_row * (w + pad) - pad)
    for k in range(n):
        r, col = divmod(k, per_row)
        grid[:, r * (h + pad) : r * (h + pad) + h, col * (w + pad) : col * (w + pad) + w] = images[k]
    array = grid.permute(1, 2, 0).numpy()
    cell = 0.62 if h <= 64 else 1.0
    fig = new_figure(figsize=(per_row * cell + 1.6, rows * cell + 0.9))
    ax = fig.add_subplot()
    ax.imshow(array[..., 0] if c == 1 else array, cmap="gray" if c == 1 else None, interpolation="nearest")
    ax.set_xticks([])
    if s["classes"] is not None:
        names = CIFAR10_CLASSES if s["dataset"] == "cifar10" else None
        ax.set_yticks([r * (h + pad) + h / 2 for r in range(rows)])
        ax.set_yticklabels([f"{y} {names[y]}" if names else f"class {y}" for y in s["classes"]], fontsize=9)
        ax.tick_params(axis="y", length=0)
    else:
        ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if s["iteration"]:
        where = f"at epoch {s['epoch']}, iteration {s['iteration']}"
    else:
        where = f"after {s['epoch']} epoch{'s' if s['epoch'] != 1 else ''}"
    kind = "one row per class" if s["classes"] is not None else "unconditional"
    ax.set_title(f"{run.name}: generator samples ({kind})\ncheckpoint {where}, seed {SAMPLE_SEED}", fontsize=10)
    return _save(fig, path, dpi=130)


# ------------------------------------------------------------------ documents
def _markdown(blocks: list[tuple[str, Any]]) -> str:
    out: list[str] = []
    for kind, value in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {value}")
        elif kind == "p":
            out.append(value)
        elif kind == "img":
            alt = str(value[1]).replace("[", "(").replace("]", ")")
            out.append(f"![{alt}]({value[0]})")
        elif kind == "table":
            header, rows = value

            def esc(s: str) -> str:
                return str(s).replace("|", "\\|")

            out.append("| " + " | ".join(map(esc, header)) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
        out.append("")
    return "\n".join(out)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:0.92em}th,td{border:1px solid #ccc;padding:0.3em 0.6em;"
    "text-align:left}th{background:#f3f3f3}img{max-width:100%;display:block;margin:0.5em 0 1.5em}"
    "code{background:#f3f3f3;padding:0 0.2em}"
)


def _html(blocks: list[tuple[str, Any]], title: str) -> str:
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
    ]
    for kind, value in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{esc(value)}</{kind}>")
        elif kind == "p":
            text = re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(value))
            out.append(f"<p>{text}</p>")
        elif kind == "img":
            out.append(f'<img src="{esc(value[0])}" alt="{esc(value[1])}">')
        elif kind == "table":
            header, rows = value
            out.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in rows]
            out.append("</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _write_text(path: Path, text: str) -> Path:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise DFQError(f"cannot write {path}: {e.strerror or e}") from e
    return path


# ------------------------------------------------------------------ entry point
def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and the PNG plots of ``run_dirs`` to ``out_dir``.

    Returns ``{"out_dir", "markdown", "html", "images": [...], "rows": [...], "notes": [...]}``
    (paths as strings; ``rows`` are the table's values, ``None`` where unknown).
    """
    if not run_dirs:
        raise DFQError("no run directories to report on")
    runs, seen = [], set()
    for d in run_dirs:
        run = load_run(d)
        key = run.path.resolve()
        if key not in seen:
            seen.add(key)
            runs.append(run)
    _name_runs(runs)
    new_figure = _matplotlib()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DFQError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DFQError(f"cannot create {out}: {e.strerror or e}") from e

    rows = [_row(r) for r in runs]
    images: list[Path] = []
    notes: list[str] = []
    blocks: list[tuple[str, Any]] = [
        ("h1", "dfq report"),
        ("h2", "Runs"),
        ("table", (_HEADER, [_cells(r) for r in rows])),
        (
            "p",
            "Final top-1 is the model at the end of training. The best top-1 is the maximum over the "
            "evaluations during training, so it is selected on the test set (the papers' protocol) and "
            "is optimistic. Epochs count from 0, as in `metrics.jsonl`. Wall time is the time spent "
            "quantizing (for generator-based methods, the training iterations, without evaluations). "
            f"{MISSING}: not known.",
        ),
    ]
    in_progress = [r for r in rows if r["status"] != "finished"]
    if in_progress:
        blocks.append(
            (
                "p",
                "In progress (no summary.json yet; reported from metrics.jsonl and checkpoint.pt): "
                + "; ".join(_progress(r) for r in in_progress)
                + ".",
            )
        )

    evaluated = [(i, r) for i, r in enumerate(runs) if r.evaluations]
    if evaluated:
        images.append(_plot_top1(new_figure, evaluated, out / "top1.png"))
        blocks += [("h2", "Top-1 during training"), ("img", ("top1.png", "top-1 over iterations"))]
    else:
        notes.append("no run has evaluations during training: no top-1 plot")

    for i, run in enumerate(runs):
        if not run.trains:
            continue
        section: list[tuple[str, Any]] = [("h2", f"{run.name} ({run.config.method})")]
        if _loss_keys(run):
            name = f"losses_{run.slug}.png"
            images.append(_plot_losses(new_figure, run, i, out / name))
            section += [("h3", "Loss components"), ("img", (name, f"{run.name} loss components"))]
        else:
            notes.append(f"{run.name}: no metrics.jsonl records yet")
        if run.config.method in ("adasg", "adadfq") and any(r.get("g_h_norm") is not None for r in run.metrics):
            name = f"hnorm_{run.slug}.png"
            path, quantiles = _plot_hnorm(new_figure, run, i, out / name)
            images.append(path)
            section += [("h3", "Sample adaptability H′"), ("img", (name, f"{run.name} H′ against the λ_l–λ_u band"))]
            if not quantiles:
                section.append(("p", "This run logged only the batch mean of H′ (written before quantiles were)."))
        if run.has_checkpoint:
            name = f"samples_{run.slug}.png"
            try:
                images.append(_plot_samples(new_figure, run, out / name))
                section += [("h3", "Generator samples"), ("img", (name, f"{run.name} generator samples"))]
            except DFQError as e:  # an unreadable checkpoint costs its plot, not the report
                notes.append(f"{run.name}: no samples ({e})")
                section.append(("p", f"No generator samples: {e}"))
        else:
            notes.append(f"{run.name}: no {TRAIN_CHECKPOINT}, no generator samples")
        if len(section) > 1:
            blocks += section
    if notes:
        blocks += [("h2", "Notes"), *(("p", n) for n in notes)]

    md = _write_text(out / "report.md", _markdown(blocks))
    page = _write_text(out / "report.html", _html(blocks, "dfq report"))
    return {
        "out_dir": str(out),
        "markdown": str(md),
        "html": str(page),
        "images": [str(p) for p in images],
        "rows": rows,
        "notes": notes,
    }


def _progress(row: dict[str, Any]) -> str:
    text = row["run"]
    if row["epochs"] is not None:
        text += f" at {row['epochs_done']} of {row['epochs']} epochs"
    if row.get("top1_latest") is not None:
        text += f", latest top-1 {row['top1_latest']:.2f}"
    return text
