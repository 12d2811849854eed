"""Divergence checks: a NaN/Inf in a loss, a gradient, a range or a state stops the step with :class:`Diverged`,
which the loop answers with a rollback."""

from __future__ import annotations

import torch

from dfq.distributed import DistContext

__all__ = ["Diverged", "check_finite", "check_grads"]


class Diverged(Exception):
    """A NaN/Inf appeared; the loop rolls back to the last good state."""


def check_finite(value: torch.Tensor, what: str, dist: DistContext | None = None) -> None:
    """Raise :class:`Diverged` on a NaN/Inf; with ``dist``, on every rank if one rank has it (a value that
    differs between ranks must not send them down different branches)."""
    bad = not bool(torch.isfinite(value).all())
    if dist is not None:
        bad = dist.any(bad)
    if bad:
        raise Diverged(f"the {what} became non-finite")


def check_grads(opt: torch.optim.Optimizer, what: str) -> None:
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        check_finite(torch.nn.utils.get_total_norm(grads), what)
