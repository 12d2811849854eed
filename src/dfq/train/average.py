"""``train.ema_decay``: an exponential moving average of Q's parameters, which evaluations and the returned Q use.

PyTorch's :class:`~torch.optim.swa_utils.AveragedModel` with ``get_ema_multi_avg_fn`` keeps it: the first update
copies Q's parameters, every later one is ``avg.lerp_(p, 1 - decay)``, exactly the average dfq defines (updated
after every Q step, from Q's first step on). The average lives in its own copy of Q; Q itself keeps training on
its own weights, and takes the average's values only inside :meth:`WeightAverage.swapped_in` and at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["NoAverage", "WeightAverage", "weight_average"]


class WeightAverage:
    def __init__(self, student: nn.Module, decay: float) -> None:
        self.student = student
        self.model = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(decay))

    def update(self) -> None:
        """After a Q step."""
        self.model.update_parameters(self.student)

    @property
    def started(self) -> bool:
        return int(self.model.n_averaged) > 0

    def values(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.model.module.parameters()]

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Q with the averaged parameters inside the block, its own ones again after it."""
        if not self.started:
            yield
            return
        own = [p.detach().clone() for p in self.student.parameters()]
        _load(self.student, self.values())
        try:
            yield
        finally:
            _load(self.student, own)

    def apply(self) -> None:
        """Q takes the averaged parameters for good (the end of the run)."""
        if self.started:
            _load(self.student, self.values())

    def state(self) -> list[torch.Tensor] | None:
        return self.values() if self.started else None

    @torch.no_grad()
    def load_state(self, saved: list[torch.Tensor] | None) -> None:
        if saved is None:
            self.model.n_averaged.zero_()
            return
        for p, v in zip(self.model.module.parameters(), saved, strict=True):
            p.copy_(v)
        self.model.n_averaged.fill_(1)


class NoAverage:
    """``train.ema_decay: 0``: Q is the last iterate."""

    def update(self) -> None:
        pass

    def swapped_in(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def apply(self) -> None:
        pass

    def state(self) -> None:
        return None

    def load_state(self, saved: None) -> None:
        pass


def weight_average(student: nn.Module, decay: float) -> WeightAverage | NoAverage:
    return WeightAverage(student, decay) if decay else NoAverage()


@torch.no_grad()
def _load(model: nn.Module, values: list[torch.Tensor]) -> None:
    for p, v in zip(model.parameters(), values, strict=True):
        p.copy_(v)
