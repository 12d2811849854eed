"""Timing of the real training iteration against the lower bound of its math on this machine.

``bench(...)`` builds the engine on randomly initialised weights (timings do not depend on
them), puts Q in its steady state (ranges frozen, Q training) and times full iterations.
It also times, in the same process and in alternation with them, the *lower bound*: the
same forwards and backwards done by plain float PyTorch modules (no fake quantization, no
BNS statistics, no bookkeeping), and a per-phase breakdown measured the same way.
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

from dfq.config import resolve_config
from dfq.engine import Engine
from dfq.models import create_model, get_model_info
from dfq.quant import calibrate, quant_disabled

__all__ = ["bench", "median_ms", "peak_rss_mib"]


def _time(fn: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fn: Callable[[], Any], iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``iters`` calls after ``warmup`` untimed ones."""
    return statistics.median(_time(fn, iters, warmup))


def _alternate(a: Callable[[], Any], b: Callable[[], Any], iters: int, warmup: int) -> tuple[list[float], list[float]]:
    """Time ``a`` and ``b`` in alternation, so that a shared machine's drift weighs on both alike."""
    for _ in range(warmup):
        a()
        b()
    pairs = [(_time(a, 1, 0)[0], _time(b, 1, 0)[0]) for _ in range(iters)]
    return [t for t, _ in pairs], [t for _, t in pairs]


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


class _Plain:
    """The iteration's forwards and backwards on plain float modules: the floor of its math."""

    def __init__(self, engine: Engine) -> None:
        self.e, m = engine, engine.method
        self.g = copy.deepcopy(engine.generator)
        self.p = engine.teacher
        self.q = copy.deepcopy(engine.teacher).train(m.student_bn_train)
        for param in self.q.parameters():
            param.requires_grad_(True)
        self.g_opt = torch.optim.Adam(self.g.parameters())
        self.q_opt = torch.optim.SGD(self.q.parameters(), lr=1e-9, momentum=0.9)
        self.shared = engine._can_share_student_forward(True)

    def _x(self, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        z, y = self.e._sample()
        with torch.set_grad_enabled(grad):
            return self.g(z, y), y

    def generator_step(self) -> torch.Tensor:
        m = self.e.method
        x, _ = self._x(True)
        loss = self.p(x).sum()
        if m.generator_uses_student:
            q = self.q(x)
            if self.shared:  # one Q forward serves both steps; the Q step is its backward only
                g_grads = torch.autograd.grad(loss + q.sum(), list(self.g.parameters()), retain_graph=True)
                q_grads = torch.autograd.grad(q.sum(), list(self.q.parameters()))
                for p_, g_ in zip([*self.g.parameters(), *self.q.parameters()], [*g_grads, *q_grads], strict=True):
                    p_.grad = g_
                self.g_opt.step()
                self.q_opt.step()
                return x
            loss = loss + q.sum()
        self.g_opt.zero_grad()
        params = list(self.g.parameters())
        for p_, g_ in zip(params, torch.autograd.grad(loss, params), strict=True):
            p_.grad = g_
        self.g_opt.step()
        return x

    def student_step(self, x: torch.Tensor | None = None) -> None:
        if x is None:
            x, _ = self._x(False)
            with torch.no_grad():
                self.p(x)
        self.q_opt.zero_grad()
        self.q(x.detach()).sum().backward()
        self.q_opt.step()

    def iteration(self) -> None:
        m = self.e.method
        if m.student_first:
            for _ in range(m.student_steps):
                self.student_step()
        x = self.generator_step()
        if not m.student_first and not self.shared:
            for _ in range(m.student_steps):
                self.student_step(x)


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
    """Time ``iters`` real iterations (after ``warmup``) and the plain-PyTorch lower bound of the same math."""
    info = get_model_info(model)
    config = resolve_config(
        None,
        {
            "method": method,
            "model": model,
            "train.batch_size": batch_size,
            "train.q_lr": 1e-9,  # random weights: keep Q finite; a step costs the same at any learning rate
            "quant.wbits": wbits,
            "quant.abits": abits,
            "train.fast": fast,
        },
    )
    engine = Engine(
        config, create_model(model), num_classes=info.num_classes, input_size=info.input_size, progress=False
    )
    calibrate(engine.student, [torch.randn(batch_size, *info.input_size)])  # steady state: ranges frozen
    plain = _Plain(engine)

    def plain_iteration() -> None:
        with engine.precision():
            plain.iteration()

    times, plain_times = _alternate(lambda: engine._iteration(True), plain_iteration, iters, warmup)
    lower = statistics.median(plain_times)
    with engine.precision():
        phases = _phases(engine, batch_size, max(3, iters // 3), 2)
    return {
        "model": model,
        "method": method,
        "batch_size": batch_size,
        "fast": fast,
        "wbits": wbits,
        "abits": abits,
        "iters": iters,
        "threads": torch.get_num_threads(),
        "shared_student_forward": engine._can_share_student_forward(True),
        "ms_median": round(statistics.median(times), 2),
        "ms_min": round(min(times), 2),
        "ms_max": round(max(times), 2),
        "lower_bound_ms": round(lower, 2),
        "ratio_to_lower_bound": round(statistics.median(times) / lower, 3),
        "peak_rss_mib": peak_rss_mib(),
        "phases_ms": phases,
    }


def _phases(engine: Engine, batch_size: int, iters: int, warmup: int) -> dict[str, float]:
    """Median cost of each part of an iteration, each timed on its own."""
    m, out = engine.method, {}
    x = engine.generator(*engine._sample()).detach()
    if m.uses_bns:

        def teacher(with_bns: bool) -> None:
            xi = x.clone().requires_grad_()
            logits, bns, _ = engine._teacher_forward(xi, with_bns)
            (logits.sum() + (bns if bns is not None else 0)).backward()

        out["teacher_fwd_bwd"] = median_ms(lambda: teacher(False), iters, warmup)
        out["bns"] = median_ms(lambda: teacher(True), iters, warmup) - out["teacher_fwd_bwd"]

    def student() -> None:
        engine.q_opt.zero_grad()
        engine.student(x).sum().backward()

    out["student_fwd_bwd"] = median_ms(student, iters, warmup)
    with quant_disabled(engine.student):
        out["fake_quantization"] = out["student_fwd_bwd"] - median_ms(student, iters, warmup)
    engine.q_opt.zero_grad()
    out["generator_step"] = median_ms(engine._generator_step, iters, warmup)
    return {k: round(v, 2) for k, v in out.items()}
