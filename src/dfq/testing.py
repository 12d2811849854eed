"""A tiny classifier and short games on it, for tests and examples: a whole run takes a fraction of a second.

The classifier has everything the methods read: BatchNorms with non-trivial statistics (so the BNS loss is not
~0), a residual add, two stages named ``layer1``/``layer2`` (ZAQ's feature layers), a global average pool
(Grad-CAM) and 10 classes, on 3x8x8 inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfq.config import RunConfig, resolve_config
from dfq.distributed import DistContext
from dfq.train import Evaluator, Game, Trainer
from dfq.utils.seed import seed_everything

__all__ = ["INPUT_SIZE", "NUM_CLASSES", "ChainedSumsNet", "FunctionalReluNet", "TinyNet", "tiny_classifier",
           "tiny_config", "tiny_game", "tiny_trainer"]  # fmt: skip

INPUT_SIZE = (3, 8, 8)
NUM_CLASSES = 10

# A run long enough to pass through every phase: one warm-up epoch observing ranges, then Q training on frozen ones.
SHORT = {"seed": 3, "train.epochs": 2, "train.iters_per_epoch": 2, "train.batch_size": 4,
         "train.warmup_epochs": 1, "train.observe_epochs": 1}  # fmt: skip


class TinyNet(nn.Module):
    """conv-bn-relu stem, a residual stage ``layer1``, a strided stage ``layer2``, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = x + self.layer1(x)
        return self.fc(self.pool(self.layer2(x)).flatten(1))


class FunctionalReluNet(TinyNet):
    """The same layers with functional ReLUs, which quantize_model rewrites with torch.fx."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.layer1(x))
        return self.fc(self.pool(self.layer2(x)).flatten(1))


class _SumBlock(nn.Module):
    """An inverted-residual block reduced to its join: ``x + bn(conv(x))``, no activation after the sum."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.conv(x))


class ChainedSumsNet(nn.Module):
    """MobileNetV2's and EfficientNet's chained residuals: a conv-bn stem, three blocks ``blocks.0-2`` where one
    block's sum is the next block's shortcut, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(*(_SumBlock(8) for _ in range(3)))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.bn(self.stem(x)))), 1))


def tiny_classifier(cls: type[TinyNet] = TinyNet, seed: int = 1234) -> nn.Module:
    """A :class:`TinyNet` (or subclass) in eval mode, its weights and BatchNorm statistics drawn from ``seed``
    (without touching the global random stream)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = cls()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return net.eval()


def tiny_config(method: str, **overrides: Any) -> RunConfig:
    """The run config of a short game of ``method``; ``overrides`` as keyword arguments with ``__`` for dots,
    relative to the method's section unless they name ``quant``, ``seed`` or ``model``:
    ``tiny_config("gdfq", train__epochs=3, plugins__lsq=True, quant__wbits=8)``. The papers' protocol unless
    ``quant__protocol`` says otherwise, as the games' presets set it."""
    values: dict[str, Any] = {"method.name": method, "quant.protocol": "paper"}
    for key, value in {**SHORT, **overrides}.items():
        key = key.replace("__", ".")
        values[key if key.split(".")[0] in ("quant", "seed", "model") else f"method.{key}"] = value
    return resolve_config(None, values)


def tiny_trainer(
    config: RunConfig | str, *, teacher: nn.Module | None = None, run_dir: str | Path | None = None,
    evaluate: Evaluator | None = None, dist: DistContext | None = None, global_seed: int | None = None,
) -> Trainer:  # fmt: skip
    """A trainer of ``config`` (a config or a method name) on the tiny classifier, built as the entry point builds
    one: the global stream seeded first (with ``global_seed``, default the run's seed)."""
    config = tiny_config(config) if isinstance(config, str) else config
    seed_everything(config.seed if global_seed is None else global_seed)
    return Trainer(config.create_method(), teacher if teacher is not None else tiny_classifier(), config.quant,
                   num_classes=NUM_CLASSES, input_size=INPUT_SIZE, seed=config.seed, run_dir=run_dir,
                   evaluate=evaluate, progress=False, dist=dist)  # fmt: skip


def tiny_game(config: RunConfig | str, *, teacher: nn.Module | None = None, dist: DistContext | None = None) -> Game:
    """The game of ``config`` on the tiny classifier (seeded as :func:`tiny_trainer` seeds), for step-level checks."""
    return tiny_trainer(config, teacher=teacher, dist=dist).game
