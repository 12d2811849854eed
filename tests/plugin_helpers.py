"""Helpers shared by the plug-in tests in tests/train: a game's plug-in, hand-made outputs, states compared."""

from __future__ import annotations

import torch
from torch import nn

from dfq.methods import Outputs
from dfq.quant.learning import LEARNED_SUFFIXES
from dfq.testing import INPUT_SIZE, tiny_config, tiny_trainer


def learned_keys(model: nn.Module) -> list[str]:
    return [k for k in model.state_dict() if k.endswith(LEARNED_SUFFIXES)]


def plugin(game, cls):
    """The game's plug-in of type ``cls``."""
    return next(p for p in game.plugins.items if isinstance(p, cls))


def states(trainer) -> dict[str, torch.Tensor]:
    return {
        **{f"q.{k}": v for k, v in trainer.game.student.state_dict().items()},
        **{f"g.{k}": v for k, v in trainer.game.generator.state_dict().items()},
    }


def assert_same_states(a, b) -> None:
    sa, sb = states(a), states(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


def hand_outputs(easy: list[bool], seed: int = 0) -> tuple[Outputs, torch.Tensor]:
    """A batch whose P logits make exactly the samples marked ``easy`` easy (p_P(y) ~ 1); the others have
    p_P(y) ~ 0. Returns the outputs and the expected mask."""
    g = torch.Generator().manual_seed(seed)
    b = len(easy)
    y = torch.randint(10, (b,), generator=g)
    p_logits = torch.randn(b, 10, generator=g)
    for i, e in enumerate(easy):
        p_logits[i, y[i]] = 20.0 if e else -20.0
    q_logits = torch.randn(b, 10, generator=g).requires_grad_()
    x = torch.randn(b, *INPUT_SIZE, generator=g)
    mask = torch.tensor([1.0 if e else 0.0 for e in easy])
    return Outputs(x, y, p_logits, q_logits), mask


def _lsq_trainer(**overrides):
    return tiny_trainer(tiny_config("gdfq", train__epochs=3, plugins__lsq=True, **overrides))
