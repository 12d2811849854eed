"""Reports of run directories: a comparison table and plots (``dfq report``).

``write_report(run_dirs, out_dir)`` reads what each run directory holds
(``config.yaml``, and where present ``summary.json``, ``metrics.jsonl``,
``checkpoint.pt``) and writes ``report.md``, ``report.html`` and PNG plots:

- ``top1.png``: top-1 over iterations of every evaluated run, final and best points marked
  (the best is selected on the test set), full precision dashed;
- ``losses_<run>.png``: each logged loss component over epochs;
- ``hnorm_<run>.png`` (runs that log H′): H′ per epoch against the method's [λ_l, λ_u] band;
- ``samples_<run>.png``: synthetic images of the run's generator, per class.

Runs without ``summary.json`` are reported as in progress with what exists; runs without
``metrics.jsonl`` or ``checkpoint.pt`` (post-training methods) get a table row only. The plots
need matplotlib (the ``plot`` extra), imported only with the Agg canvas.

Modules: ``runs`` (reading run directories; the only one that reads a run's config),
``tables`` (rows and cells), ``plots`` and ``samples`` (figures), ``document`` (Markdown and
HTML) and ``build`` (``write_report``).
"""

from dfq.report.build import write_report
from dfq.report.runs import Run, load_run
from dfq.report.samples import generator_samples

__all__ = ["Run", "generator_samples", "load_run", "write_report"]
