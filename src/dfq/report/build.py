"""``write_report``: the table, the plots and the two documents of a set of run directories."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfq.errors import DFQError
from dfq.report.document import Block, html, markdown, write_text
from dfq.report.plots import (
    NewFigure,
    figure_factory,
    has_hnorm,
    loss_keys,
    plot_hnorm,
    plot_losses,
    plot_pareto,
    plot_top1,
)
from dfq.report.runs import METRICS, TRAIN_CHECKPOINT, Run, h_band, load_run, name_runs
from dfq.report.samples import plot_samples
from dfq.report.tables import HEADER, MISSING, cells, progress, row

_TABLE_NOTE = (
    "Final top-1 is the model at the end of training. The best top-1 is the maximum over the "
    "evaluations during training, so it is selected on the test set (the papers' protocol) and "
    "is optimistic. Epochs count from 0, as in `metrics.jsonl`. Wall time is the time spent "
    "quantizing (for generator-based methods, the training iterations, without evaluations). "
    f"{MISSING}: not known."
)


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and the PNG plots of ``run_dirs`` to ``out_dir``.

    Returns ``{"out_dir", "markdown", "html", "images": [...], "rows": [...], "notes": [...]}``
    (paths as strings; ``rows`` are the table's values, ``None`` where unknown).
    """
    runs = _load_runs(run_dirs)
    new_figure = figure_factory()  # before any file is written: a missing matplotlib leaves no trace
    writer = _Writer(_make_dir(Path(out_dir)), new_figure)
    rows = [row(r) for r in runs]
    blocks = _table(rows) + writer.pareto(rows) + writer.top1(runs)
    for i, run in enumerate(runs):
        if run.trains:
            blocks += writer.section(run, i)
    if writer.notes:
        blocks += [("h2", "Notes"), *(("p", n) for n in writer.notes)]
    md = write_text(writer.out / "report.md", markdown(blocks))
    page = write_text(writer.out / "report.html", html(blocks, "dfq report"))
    return {
        "out_dir": str(writer.out),
        "markdown": str(md),
        "html": str(page),
        "images": [str(p) for p in writer.images],
        "rows": rows,
        "notes": writer.notes,
    }


def _load_runs(run_dirs: list[str | Path]) -> list[Run]:
    """The runs, each directory once, with unique names."""
    if not run_dirs:
        raise DFQError("no run directories to report on")
    runs: dict[Path, Run] = {}
    for d in run_dirs:
        run = load_run(d)
        runs.setdefault(run.path.resolve(), run)
    name_runs(list(runs.values()))
    return list(runs.values())


def _make_dir(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise DFQError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DFQError(f"cannot create {out}: {e.strerror or e}") from e
    return out


def _table(rows: list[dict[str, Any]]) -> list[Block]:
    blocks: list[Block] = [("h1", "dfq report"), ("h2", "Runs"), ("table", (HEADER, [cells(r) for r in rows]))]
    blocks.append(("p", _TABLE_NOTE))
    in_progress = [r for r in rows if r["status"] != "finished"]
    if in_progress:
        what = "; ".join(progress(r) for r in in_progress)
        source = f"no summary.json yet; reported from {METRICS} and {TRAIN_CHECKPOINT}"
        blocks.append(("p", f"In progress ({source}): {what}."))
    return blocks


@dataclass
class _Writer:
    """Draws the plots into ``out``, collecting their paths and the notes on what was left out."""

    out: Path
    new_figure: NewFigure
    images: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def pareto(self, rows: list[dict[str, Any]]) -> list[Block]:
        """Top-1 against size and BOPs of the evaluated deploy-protocol runs (when they have different costs)."""
        costed = [r for r in rows if r["top1"] is not None and r["weight_bytes"] is not None and r["bops"]]
        if len({(r["weight_bytes"], r["bops"]) for r in costed}) < 2:
            return []
        self.images.append(plot_pareto(self.new_figure, costed, self.out / "pareto.png"))
        text = (
            "Weight size counts the weight codes at their bit-widths; bit-operations are each convolution's and "
            "linear layer's multiply-accumulates times its weight and input bits (HAWQ-V3, Bayesian Bits)."
        )
        return [("h2", "Top-1 against size and compute"), ("img", ("pareto.png", "top-1 against size and BOPs")),
                ("p", text)]  # fmt: skip

    def top1(self, runs: list[Run]) -> list[Block]:
        evaluated = [(i, r) for i, r in enumerate(runs) if r.evaluations]
        if not evaluated:
            self.notes.append("no run has evaluations during training: no top-1 plot")
            return []
        self.images.append(plot_top1(self.new_figure, evaluated, self.out / "top1.png"))
        return [("h2", "Top-1 during training"), ("img", ("top1.png", "top-1 over iterations"))]

    def section(self, run: Run, i: int) -> list[Block]:
        """A training run's losses, H′ (where logged) and generator samples; empty if it has none."""
        section = self._losses(run, i) + self._hnorm(run, i) + self._samples(run)
        return [("h2", f"{run.name} ({run.method_name})"), *section] if section else []

    def _losses(self, run: Run, i: int) -> list[Block]:
        if not loss_keys(run):
            self.notes.append(f"{run.name}: no metrics.jsonl records yet")
            return []
        name = f"losses_{run.slug}.png"
        self.images.append(plot_losses(self.new_figure, run, i, self.out / name))
        return [("h3", "Loss components"), ("img", (name, f"{run.name} loss components"))]

    def _hnorm(self, run: Run, i: int) -> list[Block]:
        if not has_hnorm(run):
            return []
        name = f"hnorm_{run.slug}.png"
        path, quantiles = plot_hnorm(self.new_figure, run, i, self.out / name)
        self.images.append(path)
        alt = f"{run.name} H′ " + ("against the λ_l–λ_u band" if h_band(run) else "per epoch")
        blocks: list[Block] = [("h3", "Sample adaptability H′"), ("img", (name, alt))]
        if not quantiles:
            blocks.append(("p", "This run logged only the batch mean of H′ (written before quantiles were)."))
        return blocks

    def _samples(self, run: Run) -> list[Block]:
        if not run.has_checkpoint:
            self.notes.append(f"{run.name}: no {TRAIN_CHECKPOINT}, no generator samples")
            return []
        name = f"samples_{run.slug}.png"
        try:
            self.images.append(plot_samples(self.new_figure, run, self.out / name))
        except DFQError as e:  # an unreadable checkpoint costs its plot, not the report
            self.notes.append(f"{run.name}: no samples ({e})")
            return [("p", f"No generator samples: {e}")]
        return [("h3", "Generator samples"), ("img", (name, f"{run.name} generator samples"))]
