"""Batch-normalization statistics (BNS) loss (METHODS.md §1.6).

``with BNStatsLoss(teacher) as bns: teacher(x); loss = bns.loss()`` hooks every
BatchNorm of the (eval-mode) teacher, records the mean and biased variance of
each BN *input* over all dimensions but the channel one, and compares them with
the BN's running statistics:

    L_BNS = (1/L) * sum_l [ MSE(mu_l, running_mean_l) + MSE(var_l, running_var_l) ]

Statistics are keyed by module, never by list position, and the hooks are
removed on exit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BNStatsLoss"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


class BNStatsLoss:
    def __init__(self, model: nn.Module) -> None:
        self.layers = {m: name for name, m in model.named_modules() if isinstance(m, _BN)}
        if not self.layers:
            raise ValueError("the BNS loss needs a model with BatchNorm layers")
        self._stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> BNStatsLoss:
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._stats.clear()

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].float()  # a bfloat16 activation (train.fast) still gets float32 statistics
        dims = [0, *range(2, x.dim())]  # all but channels
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        self._stats[module] = (mean, var)

    def per_layer(self) -> dict[str, torch.Tensor]:
        """BNS loss of each BN layer seen in the last forward, by layer name."""
        out = {}
        for m, (mean, var) in self._stats.items():
            out[self.layers[m]] = F.mse_loss(mean, m.running_mean) + F.mse_loss(var, m.running_var)
        return out

    def loss(self) -> torch.Tensor:
        """Mean over BN layers of the last forward; clears the recorded statistics."""
        if not self._stats:
            raise RuntimeError("no BatchNorm statistics recorded: run a forward pass inside the context")
        losses = list(self.per_layer().values())
        self._stats.clear()
        return torch.stack(losses).mean()
