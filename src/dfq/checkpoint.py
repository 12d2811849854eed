"""Self-describing checkpoints of quantized models.

A checkpoint holds the resolved run configuration next to the state dict, so
the quantized model is rebuilt from the file alone: create the float
architecture by name, apply the saved quantization config, load the state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

import dfq
from dfq.config import RunConfig, resolve_config
from dfq.errors import DFQError
from dfq.models import create_model
from dfq.quant import quantize_model
from dfq.rundir import MODEL
from dfq.utils.io import load_payload, save_torch
from dfq.utils.state import state_dict_mismatch

__all__ = ["CHECKPOINT_NAME", "load_quantized", "save_quantized"]

CHECKPOINT_NAME = MODEL
_FORMAT = "dfq-quantized-v1"


def save_quantized(path: str | Path, model: nn.Module, config: RunConfig, **extra: Any) -> Path:
    """Atomically write ``model``'s state with everything needed to rebuild it, and how to feed it (the
    preprocessing record of a zoo model)."""
    info = getattr(model, "dfq_info", None)
    payload = {
        "format": _FORMAT,
        "dfq_version": dfq.__version__,
        "config": config.to_dict(),
        **({"preprocessing": info.preprocessing()} if info is not None else {}),
        "state_dict": model.state_dict(),
        **extra,
    }
    return save_torch(payload, path)


def load_quantized(path: str | Path) -> tuple[nn.Module, RunConfig]:
    """Rebuild a quantized model from a checkpoint file or a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    payload = load_payload(path, _FORMAT, "dfq quantized checkpoint")
    config = resolve_config(payload["config"])  # earlier layouts migrated
    model = quantize_model(config.create_method().float_model(create_model(config.model)), config.quant, inplace=True)
    problem = state_dict_mismatch(model.state_dict(), payload["state_dict"])
    if problem:
        raise DFQError(f"checkpoint {path} does not match model '{config.model}': {problem}")
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval(), config
