"""Atomic writes: a file is either the old version or the complete new one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
import yaml

import dfq
from dfq.errors import DFQError

__all__ = ["atomic_write", "load_payload", "remove_stale_temporaries", "save_json", "save_torch", "save_yaml"]


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write via a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise DFQError(f"cannot write to {path.parent}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise DFQError(f"cannot write {path}: {e.strerror}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def remove_stale_temporaries(directory: str | Path) -> None:
    """Delete temporary files that a killed :func:`atomic_write` left behind (never a finished file)."""
    directory = Path(directory)
    if directory.is_dir():
        for tmp in directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def save_torch(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def save_yaml(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: f.write(yaml.safe_dump(obj, sort_keys=False).encode()))


def load_payload(path: str | Path, fmt: str, what: str) -> dict[str, Any]:
    """Load a dfq file written with :func:`save_torch` safely (``weights_only``) and check its format tag."""
    path = Path(path)
    if not path.is_file():
        raise DFQError(f"no {what} at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or foreign files
        raise DFQError(f"cannot read {path}: corrupt or not a {what} ({type(e).__name__})") from e
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise DFQError(f"{path} is not a {what}")
    written_by = str(payload.get("dfq_version", "0"))
    if _version(written_by) > _version(dfq.__version__):
        raise DFQError(f"{path} was written by dfq {written_by}, newer than this dfq {dfq.__version__}; upgrade dfq")
    return payload


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:3] if p.isdigit())
