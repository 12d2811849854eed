"""Comparing state dicts before loading them, so a mismatch is reported before any state changes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

__all__ = ["no_param_grads", "state_dict_mismatch"]


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> str:
    """Describe the first difference between two state dicts, or '' if they fit."""
    missing = [k for k in expected if k not in got]
    if missing:
        return f"{len(missing)} missing key(s), first '{missing[0]}'"
    extra = [k for k in got if k not in expected]
    if extra:
        return f"{len(extra)} unexpected key(s), first '{extra[0]}'"
    for k, v in expected.items():
        if v.shape != got[k].shape:
            return f"'{k}' has shape {tuple(got[k].shape)}, model expects {tuple(v.shape)}"
    return ""


@contextlib.contextmanager
def no_param_grads(model: nn.Module) -> Iterator[None]:
    """Inside the block no parameter of ``model`` requires a gradient; the caller's flags come back after it."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
