"""The training loop of the generator-based methods: epochs, schedules, evaluation, rollback, stop signals.

:class:`Trainer` runs a :class:`~dfq.train.game.Game` for ``train.epochs`` epochs of ``train.iters_per_epoch``
iterations: warm-up epochs in which only G trains, the activation-range observation window then frozen ranges,
per-epoch multi-step learning rates, an evaluation every ``train.eval_every`` epochs through a callback (the loop
never reads real data), ``metrics.jsonl`` and a resumable checkpoint every ``train.checkpoint_every`` epochs. A
NaN/Inf rolls the run back to the last good state with lower learning rates; SIGINT/SIGTERM stop it with a
checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dfq.distributed import DistContext
from dfq.errors import DFQError
from dfq.generators import InputStats
from dfq.quant import ActMode, QuantConfig, act_quantizers
from dfq.train.finite import Diverged, check_finite
from dfq.train.game import Game
from dfq.train.state import RunFiles, TrainState, check_models_finite, restore, snapshot

__all__ = ["Evaluator", "RunInterrupted", "Trainer", "multistep_lr"]

Evaluator = Callable[[nn.Module], dict[str, Any]]


def multistep_lr(base: float, milestones: list[int], gamma: float, epoch: int) -> float:
    """Per-epoch multi-step schedule: one factor ``gamma`` per milestone already reached.

    Not ``torch.optim.lr_scheduler.MultiStepLR``: it multiplies the current rate by ``gamma`` at each milestone,
    and ``base·γ·γ`` is not ``base·γ²`` in floating point (1e-3: 1e-05 against 1.0000000000000003e-05), its
    closed form is reachable only through the deprecated ``step(epoch)``, and a rollback's ``lr_scale`` must
    multiply the scheduled rate, not the base one; so the run's rates, and its results, would change.
    """
    return base * gamma ** sum(1 for m in milestones if epoch >= m)


class Trainer:
    """Run a game method on a float teacher: ``Trainer(method, teacher, quant, ...).run() -> (Q, summary)``.

    Args:
        method: the game (its config holds ``train``, ``generator`` and ``plugins``).
        teacher, quant, num_classes, input_size, seed, dist, input_stats: as :class:`~dfq.train.game.Game` takes
            them.
        run_dir: where checkpoints and metrics go (``None``: nothing on disk).
        evaluate: callback returning ``{"top1": ...}`` (and ``"top5"``) for Q on real data.
        progress: show a progress bar (rank 0).
        model_name: the teacher's registry name, for the message that says how to resume.
    """

    def __init__(
        self, method: Any, teacher: nn.Module, quant: QuantConfig, *, num_classes: int,
        input_size: tuple[int, int, int], seed: int = 0, run_dir: str | Path | None = None,
        evaluate: Evaluator | None = None, progress: bool = True, dist: DistContext | None = None,
        model_name: str = "MODEL", input_stats: InputStats | None = None,
    ) -> None:  # fmt: skip
        self.state = TrainState()
        self.game = Game(method, teacher, quant, num_classes=num_classes, input_size=input_size, seed=seed,
                         dist=dist, clock=self._global_iteration, input_stats=input_stats)  # fmt: skip
        self.dist, self.train, self.quant, self.seed = self.game.dist, self.game.train, quant, seed
        self.files = RunFiles(run_dir, self.dist)
        self.evaluate, self.progress, self.model_name = evaluate, progress, model_name
        self.rollbacks = 0
        self._last_good: dict[str, Any] | None = None
        self._stop: list[int] = []  # the signal that asked the run to stop, once one has
        self._bar = tqdm(disable=True)

    def _global_iteration(self) -> int:
        return self.state.epoch * self.train.iters_per_epoch + self.state.iteration

    # --------------------------------------------------------------------------------------------- run
    def run(self, resume: bool = False) -> tuple[nn.Module, dict[str, Any]]:
        """Train (or continue the run saved in ``run_dir``) and return ``(Q, summary)``.

        SIGINT/SIGTERM finish the current iteration, write a checkpoint and raise :class:`RunInterrupted`;
        ``run(resume=True)`` in a new trainer then continues to the same result.
        """
        if resume:
            self.restore(self.files.load_checkpoint(self.identity(), self.game))
        t = self.train
        self._bar = tqdm(total=t.epochs * t.iters_per_epoch, initial=self._global_iteration(),
                         desc=self.game.method.name, disable=not (self.progress and self.dist.main),
                         dynamic_ncols=True)  # fmt: skip
        if self._last_good is None:
            self._last_good = self.snapshot()  # a divergence before the first checkpoint restarts from here
        try:
            with _stop_requests() as self._stop:
                while self.state.epoch < t.epochs:
                    try:
                        self.train_epoch()
                    except Diverged as e:
                        self._rollback(str(e))
        finally:
            self._bar.close()
            self._bar, self._stop = tqdm(disable=True), []
        return self.game.finish(), self.summary()

    def train_epoch(self) -> None:
        """Run the rest of epoch ``state.epoch`` (from ``state.iteration``), then evaluate, log and checkpoint it
        as the schedule says. Raises :class:`~dfq.train.finite.Diverged` on a NaN/Inf (``run`` rolls back)."""
        t, st = self.train, self.state
        epoch = st.epoch
        self._begin_epoch(epoch)
        train_q = epoch >= t.warmup_epochs
        while st.iteration < t.iters_per_epoch:
            self._iteration(epoch, train_q)
            if st.iteration == t.iters_per_epoch:
                break
            if t.checkpoint_every_iters and self._global_iteration() % t.checkpoint_every_iters == 0:
                self.save_checkpoint()
            if self._stop_requested():
                self.save_checkpoint()
                raise RunInterrupted(self._stop[0], epoch, st.iteration, self.files.run_dir, self.model_name)
        self._end_epoch(epoch, train_q)
        if self._stop_requested() and epoch < t.epochs - 1:
            self.save_checkpoint()
            raise RunInterrupted(self._stop[0], epoch + 1, 0, self.files.run_dir, self.model_name)

    def _begin_epoch(self, epoch: int) -> None:
        """The epoch's learning rates, the ranges' mode (learned steps keep theirs) and the plug-ins' phase."""
        t, g, scale = self.train, self.game, self.state.lr_scale
        for opt, base, milestones in ((g.q_opt, t.q_lr, t.q_milestones), (g.g_opt, t.g_lr, t.g_milestones)):
            for group in opt.param_groups:
                group["lr"] = multistep_lr(base, milestones, t.lr_gamma, epoch) * scale
        mode = ActMode.OBSERVE if epoch < t.observe_epochs else ActMode.FROZEN
        for _, q in act_quantizers(g.student):
            if q.get_mode() is not ActMode.LEARNED:
                q.set_mode(mode)
        g.plugins.begin_epoch(epoch, scale)

    def _iteration(self, epoch: int, train_q: bool) -> None:
        st, start = self.state, time.perf_counter()
        logs = self._mean_over_ranks(self.game.iteration(train_q))
        if epoch < self.train.observe_epochs:
            ranges = [v for _, q in act_quantizers(self.game.student) for v in (q.lo, q.hi)]
            if ranges:
                check_finite(torch.stack(ranges), "activation range")
        for k, v in logs.items():
            st.sums[k] = st.sums.get(k, 0) + v
        st.iteration += 1
        st.train_seconds += time.perf_counter() - start
        self._bar.update(1)
        if st.iteration % 20 == 1 or st.iteration == self.train.iters_per_epoch:
            self._bar.set_postfix({k: f"{float(v):.3g}" for k, v in logs.items() if k.endswith("loss")}, refresh=False)

    def _mean_over_ranks(self, logs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logged values averaged over ranks (one collective): the global batch's."""
        if not (self.dist.active and logs):
            return logs
        return dict(zip(logs, self.dist.mean(torch.stack([v.float() for v in logs.values()])), strict=True))

    def _stop_requested(self) -> bool:
        """A SIGINT/SIGTERM seen by any rank stops every rank at the same iteration."""
        signum = self.dist.max_int(self._stop[0] if self._stop else 0)
        if signum and not self._stop:
            self._stop.append(signum)
        return bool(signum)

    def _end_epoch(self, epoch: int, train_q: bool) -> None:
        t, st, g = self.train, self.state, self.game
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_q": train_q,
            "q_lr": g.q_opt.param_groups[0]["lr"],
            "g_lr": g.g_opt.param_groups[0]["lr"],
            **{k: float(v) / t.iters_per_epoch for k, v in st.sums.items()},
        }
        last = epoch == t.epochs - 1
        if self.evaluate and self.dist.main and ((epoch + 1) % t.eval_every == 0 or last):
            with g.evaluated() as q:
                metrics = self.evaluate(q)
            record.update(top1=metrics["top1"], top5=metrics.get("top5"))
            st.history.append({"epoch": epoch, "top1": metrics["top1"]})
            self._bar.write(f"epoch {epoch}: top-1 {metrics['top1']:.2f}%")
        record["train_seconds"] = round(st.train_seconds, 3)
        st.epoch, st.iteration, st.sums = epoch + 1, 0, {}
        self.files.append_metrics(record)  # before the checkpoint: a resumed run rewrites redone epochs
        if (epoch + 1) % t.checkpoint_every == 0 or last:
            self.save_checkpoint()

    def _rollback(self, reason: str) -> None:
        """Return to the last good state with lower learning rates, or stop with a clear error."""
        t = self.train
        self.rollbacks += 1
        if self.rollbacks > t.max_rollbacks:
            raise DFQError(
                f"{reason} again after {t.max_rollbacks} rollback(s) with lower learning rates; "
                "the run stopped without saving a diverged model (lower train.q_lr / train.g_lr)"
            )
        scale = self.state.lr_scale
        self.restore(self._last_good)
        self.state.lr_scale = scale * t.rollback_lr_factor
        self._bar.n = self._global_iteration()
        if self.dist.main:
            self._bar.write(
                f"{reason} at epoch {self.state.epoch}: rolled back to epoch {self.state.epoch}, iteration "
                f"{self.state.iteration} with learning rates x{self.state.lr_scale:g} "
                f"(rollback {self.rollbacks}/{t.max_rollbacks})"
            )

    # ------------------------------------------------------------------------------------------ state
    def identity(self) -> dict[str, Any]:
        """What a checkpoint must have been written with to be resumed by this run."""
        method = {"name": self.game.method.name, **dataclasses.asdict(self.game.config)}
        return {"seed": self.seed, "quant": self.quant.to_dict(), "method": method}

    def snapshot(self) -> dict[str, Any]:
        """The run's state now (what a checkpoint holds)."""
        return snapshot(self.game, self.state, self.identity())

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from ``saved`` (a :meth:`snapshot` or a checkpoint), which becomes the last good state."""
        self.state = restore(self.game, saved)
        self._last_good = saved

    def save_checkpoint(self) -> None:
        """Keep the current state as the last good one, in memory and (atomically) in ``run_dir``."""
        check_models_finite(self.game)
        self._last_good = self.snapshot()
        self.files.save_checkpoint(self._last_good)

    def summary(self) -> dict[str, Any]:
        st, t = self.state, self.train
        out: dict[str, Any] = {
            "method": self.game.method.name,
            "model": self.model_name,
            "wbits": self.quant.wbits,
            "abits": self.quant.abits,
            "epochs": t.epochs,
            "iters_per_epoch": t.iters_per_epoch,
            "batch_size": t.batch_size,
            "shards": t.shards,
            "processes": self.dist.world_size,
            "device": str(self.dist.device),
            "seconds": round(st.train_seconds, 3),
            "rollbacks": self.rollbacks,
        }
        if st.history:
            best = max(st.history, key=lambda r: r["top1"])
            out.update(top1_best=best["top1"], best_epoch=best["epoch"])
            if st.history[-1]["epoch"] == t.epochs - 1:  # "top1" is the final model's, never an earlier one
                out["top1"] = st.history[-1]["top1"]
        return out


class RunInterrupted(DFQError):
    """A run stopped by SIGINT/SIGTERM after writing a checkpoint it can resume from."""

    def __init__(self, signum: int, epoch: int, iteration: int, run_dir: Path | None, model: str = "MODEL") -> None:
        self.exit_code = 128 + signum
        where = f"epoch {epoch}, iteration {iteration}"
        if run_dir is None:
            super().__init__(f"interrupted by {signal.Signals(signum).name} at {where} (no run directory: not saved)")
        else:
            super().__init__(
                f"interrupted by {signal.Signals(signum).name} at {where}; checkpoint saved, continue "
                f"with: dfq quantize {model} --out {run_dir} --resume"
            )


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """Turn the first SIGINT/SIGTERM into a stop request (a list holding the signal number).

    A second signal gets the default behaviour, so a stuck run can still be killed.
    Outside the main thread (where handlers cannot be installed) nothing is caught.
    """
    stop: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def request(signum: int, _frame: object) -> None:
        stop.append(signum)
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    for sig in previous:
        signal.signal(sig, request)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
