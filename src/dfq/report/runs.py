"""Reading run directories, and the only module that knows the shape of a run's configuration.

The rest of the report asks :class:`Run` and the helpers here (``method_name``, ``model``,
``bits``, ``batch_size``, ``method_settings``, ``h_band``, ``rebuild_generator``) instead of
reading ``RunConfig`` fields, so a change of the config's layout is adapted here alone.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfq.config import RunConfig, load_yaml, resolve_config
from dfq.errors import DFQError
from dfq.rundir import CONFIG, METRICS, SUMMARY
from dfq.train import TRAIN_CHECKPOINT, read_train_checkpoint  # the training checkpoint, for the whole report

__all__ = [
    "METRICS",
    "TRAIN_CHECKPOINT",
    "Run",
    "h_band",
    "load_run",
    "method_settings",
    "name_runs",
    "read_train_checkpoint",
    "rebuild_generator",
]


@dataclass
class Run:
    """What one run directory holds (missing files as ``None`` / empty)."""

    path: Path
    name: str
    config: RunConfig
    summary: dict[str, Any] | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    has_metrics: bool = False
    has_checkpoint: bool = False
    slug: str = ""

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def trains(self) -> bool:
        """A generator-based run, told by the files only training writes (not by the method's name)."""
        return self.has_metrics or self.has_checkpoint

    @property
    def evaluations(self) -> list[tuple[int, float]]:
        return [(int(r["epoch"]), float(r["top1"])) for r in self.metrics if r.get("top1") is not None]

    # -- the run's configuration: every read of ``self.config`` is below.
    @property
    def method_name(self) -> str:
        return self.config.method_name

    @property
    def log_labels(self) -> dict[str, str]:
        """What the method's logged components are (its ``log_labels``); unknown keys are shown by name."""
        from dfq.methods import method_of_config

        return dict(method_of_config(self.config.method).log_labels)

    @property
    def model(self) -> str:
        return self.config.model

    @property
    def bits(self) -> tuple[int, int]:
        return self.config.quant.wbits, self.config.quant.abits

    @property
    def batch_size(self) -> int:
        return self.config.method.train.batch_size

    @property
    def iters_per_epoch(self) -> int:
        return int((self.summary or {}).get("iters_per_epoch") or self.config.method.train.iters_per_epoch)

    @property
    def epochs(self) -> int:
        return int((self.summary or {}).get("epochs") or self.config.method.train.epochs)


def method_settings(run: Run) -> Any:
    """The method's own config section (``None`` where the method has none)."""
    return run.config.method


def h_band(run: Run) -> tuple[float, float] | None:
    """The method's target band [λ_l, λ_u] for H′, where its settings have one."""
    settings = method_settings(run)
    lo, hi = getattr(settings, "lambda_l", None), getattr(settings, "lambda_u", None)
    return None if lo is None or hi is None else (float(lo), float(hi))


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory; a missing directory or ``config.yaml`` is a :class:`DFQError`."""
    path = Path(run_dir)
    if not path.is_dir():
        raise DFQError(f"run directory not found: {path}")
    if not (path / CONFIG).is_file():
        raise DFQError(f"{path} is not a run directory: it has no config.yaml")
    return Run(
        path=path,
        name=path.resolve().name or str(path),
        config=resolve_config(load_yaml(path / CONFIG)),  # earlier layouts migrated
        summary=_read_summary(path / SUMMARY),
        metrics=_read_metrics(path / METRICS),
        has_metrics=(path / METRICS).is_file(),
        has_checkpoint=(path / TRAIN_CHECKPOINT).is_file(),
    )


def _read_summary(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DFQError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(summary, dict):
        raise DFQError(f"{path} must hold a JSON object")
    return summary


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


def name_runs(runs: list[Run]) -> None:
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


def rebuild_generator(run_config: RunConfig, state: dict[str, torch.Tensor], where: Path) -> tuple[nn.Module, Any]:
    """The generator a run's config describes, loaded with ``state``.

    Returns the generator and the model's ``ModelInfo`` (``None`` for a model outside the zoo,
    whose shapes are read off the weights). This is the one place that knows how a run builds
    its generator; the global random state is left alone.
    """
    from dfq.generators import create_generator
    from dfq.utils.state import state_dict_mismatch

    info = _model_info(run_config.model)
    if info is not None:
        (channels, size, _), num_classes = info.input_size, info.num_classes
    else:
        channels, size, num_classes = _shapes_from_weights(state)
    settings = run_config.method.generator
    name, latent_dim = settings.pick(size), settings.latent_dim
    with torch.random.fork_rng(devices=[]):
        gen = create_generator(name, num_classes, size, latent_dim, channels=channels)
    problem = state_dict_mismatch(gen.state_dict(), state)
    if problem:
        raise DFQError(f"the generator in {where} does not fit the run's config: {problem}")
    gen.load_state_dict(state)
    return gen, info


def _model_info(name: str) -> Any:
    from dfq.models import get_model_info

    try:
        return get_model_info(name)
    except DFQError:
        return None


def _shapes_from_weights(state: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(channels, image size, classes) of a generator, for a model outside the zoo."""
    channels = int(state["conv3.weight"].shape[0])
    size = 4 * math.isqrt(int(state["l1.weight"].shape[0]) // 128)
    emb = state.get("label_emb.weight", state.get("bn0.gamma.weight"))
    return channels, size, int(emb.shape[0]) if emb is not None else 1
