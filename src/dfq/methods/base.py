"""What a generator-based method declares, and the tensors it receives.

A method owns only its math: two loss functions returning named components
(the key ``"loss"`` is the one optimised; every other key is logged). The
engine owns the loop, the optimizers, the schedules and the data flow, driven
by the class attributes below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dfq.errors import DFQError, did_you_mean

__all__ = ["GameMethod", "Outputs", "create_method", "list_methods", "register_method"]


@dataclass
class Outputs:
    """One batch as a method sees it.

    Attributes:
        x: generated images (attached to G's graph in the generator phase, detached in the student phase).
        y: sampled labels (``None`` for unconditional generators).
        p_logits: P's logits (detached in the student phase).
        q_logits: Q's logits (``None`` when the method's generator loss does not use Q).
        bns: P's BNS loss on ``x`` (``None`` when the method does not use it).
        p_feats / q_feats: outputs of the method's feature layers, in order.
        label_mask: per-sample weights of Q's cross-entropy to ``y`` (``None``: all 1; see plugins.hard_tau).
    """

    x: torch.Tensor
    y: torch.Tensor | None
    p_logits: torch.Tensor
    q_logits: torch.Tensor | None = None
    bns: torch.Tensor | None = None
    p_feats: list[torch.Tensor] | None = None
    q_feats: list[torch.Tensor] | None = None
    label_mask: torch.Tensor | None = None


class GameMethod:
    """Base class of the generator/quantized-model games."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    # Engine defaults of this method's paper (CIFAR settings), as dotted RunConfig keys.
    defaults: ClassVar[dict[str, Any]] = {}
    conditional: ClassVar[bool] = True  # sample labels and feed them to G
    generator: ClassVar[str | None] = None  # None: "cifar" or "imagenet" from the input size
    latent_dim: ClassVar[int] = 100
    uses_bns: ClassVar[bool] = True  # hook P's BatchNorms in the generator phase
    generator_uses_student: ClassVar[bool] = False  # Q forward on the non-detached images in the G phase
    uses_features: ClassVar[bool] = False  # capture P/Q feature maps (ZAQ)
    student_first: ClassVar[bool] = False  # Q steps before the G step (ZAQ)
    student_steps: ClassVar[int] = 1  # Q steps per iteration
    fresh_student_batches: ClassVar[bool] = False  # each Q step draws a new batch (ZAQ) instead of reusing G's
    student_bn_train: ClassVar[bool] = False  # Q's BatchNorm uses batch statistics (ZAQ) instead of fixed ones
    label_ce: ClassVar[bool] = False  # Q's loss has a cross-entropy to y, weighted by Outputs.label_mask (GDFQ)

    def __init__(self, config: Any) -> None:
        self.config = config

    def generator_loss(self, out: Outputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def student_loss(self, out: Outputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError


_METHODS: dict[str, type[GameMethod]] = {}


def register_method(cls: type[GameMethod]) -> type[GameMethod]:
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[GameMethod]:
    if name not in _METHODS:
        raise DFQError(f"unknown method '{name}'{did_you_mean(name, _METHODS)}")
    return _METHODS[name]


def create_method(name: str, config: Any) -> GameMethod:
    return method_class(name)(config)


MethodFactory = Callable[[Any], GameMethod]
