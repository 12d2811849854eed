"""Timing of the real training iteration against the lower bound of its math on this machine.

``bench(...)`` builds the game (:class:`dfq.train.Game`) on randomly initialised weights (timings do not
depend on them), puts Q in its steady state (ranges frozen, Q training) and times full iterations.
It also times, in the same process and in alternation with them, the *lower bound*: the
same forwards and backwards done by plain PyTorch modules and built-in ops (Q's fake
quantization by ``torch.fake_quantize_per_{channel,tensor}_affine``, P's BNS statistics by
``torch.var_mean`` in forward hooks, no bookkeeping, sums for losses); and the *float floor*:
the same iteration with no fake quantization and no BNS at all, which no implementation of
the math reaches (what quantization and the BNS loss cost at the least). A per-phase
breakdown is measured the same way.
"""

from __future__ import annotations

import copy
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from dfq.config import resolve_config
from dfq.errors import DFQError
from dfq.methods import GameMethod
from dfq.models import create_model, get_model_info
from dfq.quant import calibrate, quant_disabled
from dfq.train import Game
from dfq.utils.seed import seed_everything

__all__ = ["PlainBNS", "WeightFQ", "bench", "median_ms", "peak_rss_mib", "wall_times"]


def wall_times(fn: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_ms(fn: Callable[[], Any], iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``iters`` calls after ``warmup`` untimed ones."""
    return 1e3 * statistics.median(wall_times(fn, iters, warmup))


def _alternate(fns: list[Callable[[], Any]], iters: int, warmup: int) -> list[list[float]]:
    """Time ``fns`` in alternation, so that a shared machine's drift weighs on all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    rounds = [[1e3 * wall_times(fn, 1, 0)[0] for fn in fns] for _ in range(iters)]
    return [list(column) for column in zip(*rounds, strict=True)]


def peak_rss_mib() -> float:
    """Peak resident memory of this process since it started (``VmHWM``: unlike ``ru_maxrss``, it does not
    include the memory of the parent that forked it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # kB on Linux


class WeightFQ(nn.Module):
    """Per-output-channel min/max fake quantization of a weight, recomputed at every forward."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.qmax = 2**bits - 1

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        flat = w.detach().flatten(1)
        lo, hi = flat.amin(1).clamp(max=0), flat.amax(1).clamp(min=0)
        scale = ((hi - lo) / self.qmax).clamp(min=1e-8)
        zero_point = (-lo / scale).round().int()
        return torch.fake_quantize_per_channel_affine(w, scale, zero_point, 0, 0, self.qmax)


def _act_fq(qmax: int) -> Callable[..., torch.Tensor]:
    """A forward hook that fake-quantizes a ReLU's output on a fixed unsigned grid."""
    return lambda _module, _inputs, out: torch.fake_quantize_per_tensor_affine(out, 4.0 / qmax, 0, 0, qmax)


def _plain_student(teacher: nn.Module, bits: tuple[int, int] | None) -> nn.Module:
    """A trainable copy of P, made into Q with PyTorch's own fake-quantization ops (frozen activation grids) when
    ``bits`` = (wbits, abits) is given."""
    q = copy.deepcopy(teacher)
    if bits is not None:
        wbits, abits = bits
        act_qmax = 2**abits - 1
        for module in list(q.modules()):
            if isinstance(module, nn.Conv2d | nn.Linear):
                parametrize.register_parametrization(module, "weight", WeightFQ(wbits))
            elif isinstance(module, nn.ReLU | nn.ReLU6):
                module.register_forward_hook(_act_fq(act_qmax))
    for param in q.parameters():
        param.requires_grad_(True)
    return q


class PlainBNS:
    """P's BatchNorm-statistics loss in its most direct form: ``torch.var_mean`` in forward hooks."""

    def __init__(self, teacher: nn.Module) -> None:
        self.terms: list[torch.Tensor] = []
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.register_forward_hook(self._hook)

    def _hook(self, m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        if not torch.is_grad_enabled():  # only the G phase needs the statistics
            return
        var, mean = torch.var_mean(inputs[0].float(), dim=(0, 2, 3), unbiased=False)
        self.terms.append(F.mse_loss(mean, m.running_mean) + F.mse_loss(var, m.running_var))

    def loss(self) -> torch.Tensor:
        terms, self.terms = self.terms, []
        return torch.stack(terms).mean() if terms else torch.zeros(())


class _Plain:
    """The iteration's forwards and backwards on plain PyTorch modules.

    ``same_math``: with Q's fake quantization and P's BNS statistics (the lower bound of the math with
    PyTorch's own ops); without, float work only (a floor no implementation of the math reaches).
    """

    def __init__(self, game: Game, same_math: bool = True) -> None:
        self.game, m, quant, train = game, game.method, game.quant, game.train
        self.g = copy.deepcopy(game.generator)
        self.p = copy.deepcopy(game.teacher)  # its own hooks, none on the game's P
        self.bns = PlainBNS(self.p) if m.uses_bns and same_math else None
        bits = (quant.wbits, quant.abits) if same_math else None
        self.q = _plain_student(game.teacher, bits).train(m.student_bn_train)
        self.g_opt = torch.optim.Adam(self.g.parameters(), betas=(0.5, 0.999))
        self.q_opt = torch.optim.SGD(self.q.parameters(), lr=1e-9, momentum=0.9, nesterov=train.q_nesterov,
                                     weight_decay=train.q_weight_decay)  # fmt: skip
        self.shared = game.shares_forward(True)

    def _teacher_loss(self, x: torch.Tensor) -> torch.Tensor:
        loss = self.p(x).sum()
        return loss + self.bns.loss() if self.bns is not None else loss

    def _x(self, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        z, y = self.game.sample()
        with torch.set_grad_enabled(grad):
            return self.g(z, y), y

    # The game interface (what a method's ``iteration`` calls), so the method's own order of steps drives it.
    def generator_then_student(self, train_q: bool) -> dict:
        x, _ = self.generator_step()
        if not self.shared:
            self.student_step(x, train_q)
        return {}

    def generator_step(self) -> tuple[torch.Tensor, dict]:
        m = self.game.method
        x, _ = self._x(True)
        loss = self._teacher_loss(x)
        if m.generator_uses_student:
            q = self.q(x)
            if self.shared:  # one Q forward serves both steps; the Q step is its backward only
                g_grads = torch.autograd.grad(loss + q.sum(), list(self.g.parameters()), retain_graph=True)
                q_grads = torch.autograd.grad(q.sum(), list(self.q.parameters()))
                for p_, g_ in zip([*self.g.parameters(), *self.q.parameters()], [*g_grads, *q_grads], strict=True):
                    p_.grad = g_
                self.g_opt.step()
                self.q_opt.step()
                return x, {}
            loss = loss + q.sum()
        self.g_opt.zero_grad()
        params = list(self.g.parameters())
        for p_, g_ in zip(params, torch.autograd.grad(loss, params), strict=True):
            p_.grad = g_
        self.g_opt.step()
        return x, {}

    def fresh_batch(self) -> torch.Tensor:
        x, _ = self._x(False)
        with torch.no_grad():
            self.p(x)
        return x

    def student_step(self, x: torch.Tensor, train_q: bool = True) -> dict:
        self.q_opt.zero_grad()
        self.q(x.detach()).sum().backward()
        self.q_opt.step()
        return {}

    @staticmethod
    def logs(g_losses: dict, q_losses: dict | None) -> dict:
        return {}

    def iteration(self) -> None:
        self.game.method.iteration(self, True)


def bench(
    model: str,
    method: str,
    batch_size: int,
    *,
    iters: int = 30,
    warmup: int = 5,
    wbits: int = 4,
    abits: int = 4,
    fast: bool = False,
) -> dict[str, Any]:
    """Time ``iters`` real iterations (after ``warmup``), the plain-PyTorch lower bound of the same math, and the
    float floor (the same iteration without fake quantization and BNS)."""
    info = get_model_info(model)
    config = resolve_config(
        None,
        {
            "method.name": method,
            "model": model,
            "method.train.batch_size": batch_size,
            "method.train.q_lr": 1e-9,  # random weights: keep Q finite; a step costs the same at any learning rate
            "quant.wbits": wbits,
            "quant.abits": abits,
            "method.train.fast": fast,
        },
    )
    method_obj = config.create_method()
    if not isinstance(method_obj, GameMethod):
        raise DFQError(f"dfq bench times the iteration of a generator-based method; '{method}' has none")
    seed_everything(0)  # the entry point: P's random weights and G's initial ones from one seed
    game = Game(method_obj, create_model(model), config.quant, num_classes=info.num_classes,
                input_size=info.input_size)  # fmt: skip
    calibrate(game.student, [torch.randn(batch_size, *info.input_size)])  # steady state: ranges frozen
    game.iteration(True)
    peak = peak_rss_mib()  # the game's own high-water mark, before the reference models exist
    plain, floor = _Plain(game), _Plain(game, same_math=False)

    def in_precision(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> None:
            with game.precision():
                fn()

        return run

    times, plain_times, floor_times = _alternate(
        [lambda: game.iteration(True), in_precision(plain.iteration), in_precision(floor.iteration)], iters, warmup
    )
    lower, float_floor = statistics.median(plain_times), statistics.median(floor_times)
    with game.precision():
        phases = _phases(game, max(3, iters // 3), 2)
    return {
        "model": model,
        "method": method,
        "batch_size": batch_size,
        "fast": fast,
        "wbits": wbits,
        "abits": abits,
        "iters": iters,
        "threads": torch.get_num_threads(),
        "shared_student_forward": game.shares_forward(True),
        "ms_median": round(statistics.median(times), 2),
        "ms_min": round(min(times), 2),
        "ms_max": round(max(times), 2),
        "lower_bound_ms": round(lower, 2),
        "ratio_to_lower_bound": round(statistics.median(times) / lower, 3),
        "float_floor_ms": round(float_floor, 2),
        "ratio_to_float_floor": round(statistics.median(times) / float_floor, 3),
        "peak_rss_mib": peak,
        "phases_ms": phases,
    }


def _phases(game: Game, iters: int, warmup: int) -> dict[str, float]:
    """Median cost of each part of an iteration, each timed on its own."""
    m, out = game.method, {}
    x = game.images(game.generator, *game.sample()).detach()
    if m.uses_bns:

        def teacher(with_bns: bool) -> None:
            xi = x.clone().requires_grad_()
            logits, bns, _ = game.teacher_forward(xi, with_bns)
            (logits.sum() + (bns if bns is not None else 0)).backward()

        out["teacher_fwd_bwd"] = median_ms(lambda: teacher(False), iters, warmup)
        out["bns"] = median_ms(lambda: teacher(True), iters, warmup) - out["teacher_fwd_bwd"]

    def student() -> None:
        game.q_opt.zero_grad()
        game.student(x).sum().backward()

    out["student_fwd_bwd"] = median_ms(student, iters, warmup)
    with quant_disabled(game.student):
        out["fake_quantization"] = out["student_fwd_bwd"] - median_ms(student, iters, warmup)
    game.q_opt.zero_grad()
    out["generator_step"] = median_ms(game.generator_step, iters, warmup)
    return {k: round(v, 2) for k, v in out.items()}
