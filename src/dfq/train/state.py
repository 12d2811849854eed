"""Resumable state: where a run is (:class:`TrainState`), snapshots of it together with the game's state, and
the run directory's files (``checkpoint.pt``, ``metrics.jsonl``), written atomically and checked before any
state changes. A snapshot holds everything needed to continue bit-identically on the CPU, the global random
stream included."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import dfq
from dfq.distributed import DistContext
from dfq.errors import DFQError
from dfq.quant.learning import LEARNED_SUFFIXES
from dfq.rundir import METRICS, TRAIN_CHECKPOINT
from dfq.train.finite import check_finite
from dfq.train.game import Game
from dfq.train.streams import stream_states
from dfq.utils.io import atomic_write, load_payload, save_torch
from dfq.utils.state import state_dict_mismatch

__all__ = ["TRAIN_CHECKPOINT", "RunFiles", "TrainState", "read_train_checkpoint", "restore", "snapshot"]

_FORMAT = "dfq-train-v1"


@dataclass
class TrainState:
    """Where a run is; everything here goes into checkpoints."""

    epoch: int = 0  # epoch in progress (or next to run)
    iteration: int = 0  # next iteration within ``epoch``
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluations
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # logged values summed over the epoch so far
    lr_scale: float = 1.0  # lowered by each rollback after a divergence


def snapshot(game: Game, state: TrainState, identity: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to continue bit-identically (tensors copied, not aliased); ``identity`` is what the
    run must have been configured with to resume from it. Collective in a data-parallel run."""
    return copy.deepcopy(
        {
            "format": _FORMAT,
            "dfq_version": dfq.__version__,
            "config": identity,
            "epoch": state.epoch,
            "iteration": state.iteration,
            "sums": state.sums,
            "lr_scale": state.lr_scale,
            "train_seconds": state.train_seconds,
            "history": state.history,
            **game.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
    )


def restore(game: Game, saved: dict[str, Any]) -> TrainState:
    """Put ``game`` (and the global random stream) in the state of ``saved``; returns where the run was."""
    game.load_state_dict(saved)
    torch.set_rng_state(saved["torch_rng"])
    return TrainState(
        saved["epoch"],
        saved["iteration"],
        saved["train_seconds"],
        list(saved["history"]),
        dict(saved["sums"]),
        saved["lr_scale"],
    )


def check_models_finite(game: Game) -> None:
    """Never keep a NaN model: every floating-point tensor of Q's and G's state must be finite."""
    for name, model in (("quantized model", game.student), ("generator", game.generator)):
        for t in model.state_dict().values():
            if t.is_floating_point():
                check_finite(t, f"{name} state")


class RunFiles:
    """The run directory's training files (nothing on disk without one); rank 0 writes, every rank reads."""

    def __init__(self, run_dir: str | Path | None, dist: DistContext) -> None:
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.dist = dist

    @property
    def writes(self) -> bool:
        return self.run_dir is not None and self.dist.main

    def save_checkpoint(self, snap: dict[str, Any]) -> None:
        if self.writes:
            save_torch(snap, self.run_dir / TRAIN_CHECKPOINT)

    def load_checkpoint(self, identity: dict[str, Any], game: Game) -> dict[str, Any]:
        """The checkpoint of this run directory, refused (before any state changes) unless it was written with
        ``identity`` and fits ``game``."""
        if self.run_dir is None or not (self.run_dir / TRAIN_CHECKPOINT).is_file():
            raise DFQError(f"nothing to resume: no {TRAIN_CHECKPOINT} in {self.run_dir}")
        ckpt = read_train_checkpoint(self.run_dir)
        if ckpt["config"] != identity:
            raise DFQError(
                f"the checkpoint in {self.run_dir} was written with a different configuration; "
                "resume with the run's own config.yaml"
            )
        streams = len(stream_states(ckpt["sampler"]))
        if streams != game.streams.shards:
            raise DFQError(f"the checkpoint in {self.run_dir} has {streams} noise streams, this run "
                           f"{game.streams.shards}")  # fmt: skip
        for name, module in (("student", game.student), ("generator", game.generator)):
            current = module.state_dict()
            # Learned steps and rounding exist only while they learn: checked when the restore has opened the phase.
            saved = {k: v for k, v in ckpt[name].items() if k in current or not k.endswith(LEARNED_SUFFIXES)}
            problem = state_dict_mismatch(current, saved)
            if problem:
                raise DFQError(f"the checkpoint in {self.run_dir} does not fit this run's {name}: {problem}")
        return ckpt

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Add an epoch's record to ``metrics.jsonl``, dropping records of epochs a resumed run is redoing;
        rewritten atomically (a kill never leaves half a line)."""
        if not self.writes:
            return
        path = self.run_dir / METRICS
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [ln for ln in lines if json.loads(ln)["epoch"] < record["epoch"]]
        text = "".join(ln + "\n" for ln in [*kept, json.dumps(record)])
        atomic_write(path, lambda f: f.write(text.encode()))


def read_train_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """Load a training checkpoint safely (tensors and plain containers only)."""
    return load_payload(Path(run_dir) / TRAIN_CHECKPOINT, _FORMAT, "dfq training checkpoint")
