"""Run configuration: typed dataclasses <- YAML preset <- command-line values.

The resolved configuration is saved as ``config.yaml`` in every run directory
and is enough to rebuild the quantized model from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dfq.errors import DFQError, did_you_mean
from dfq.methods.zeroq import ZeroQConfig
from dfq.quant import LayerOverride, QuantConfig

__all__ = ["METHODS", "RunConfig", "from_dict", "load_yaml", "resolve_config"]

METHODS = ("zeroq",)

T = TypeVar("T")


@dataclass
class RunConfig:
    """Everything that determines a quantization run (paths to real data are not part of it).

    Attributes:
        model: registered model name.
        weights: local checkpoint of the full-precision model; ``None`` uses the published weights.
        method: data-free method.
        seed: seed of every random stream of the run.
        quant: the quantizer protocol.
        zeroq: ZeroQ settings (used when ``method == "zeroq"``).
    """

    model: str = "resnet20a_cifar10"
    weights: str | None = None
    method: str = "zeroq"
    seed: int = 0
    quant: QuantConfig = field(default_factory=QuantConfig)
    zeroq: ZeroQConfig = field(default_factory=ZeroQConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DFQError(
                f"unknown method '{self.method}'{did_you_mean(self.method, METHODS)}; available: {', '.join(METHODS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from nested dicts, rejecting unknown keys with a hint."""
    if not isinstance(data, dict):
        raise DFQError(f"config section '{where or '<root>'}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise DFQError(f"unknown config key '{name}'{did_you_mean(key, fields)}")
        kwargs[key] = _coerce(hints[key], value, name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise DFQError(f"invalid config section '{where or '<root>'}': {e}") from e


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, name)
    origin = typing.get_origin(hint)
    if origin is dict and typing.get_args(hint)[1] is LayerOverride:
        if not isinstance(value, dict):
            raise DFQError(f"config key '{name}' must be a mapping of layer pattern -> bits")
        return {k: from_dict(LayerOverride, v, f"{name}.{k}") for k, v in value.items()}
    allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(t, type) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    raise DFQError(f"config key '{name}' has the wrong type: got {value!r}, expected {hint}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML preset (safe loader only)."""
    path = Path(path)
    if not path.is_file():
        raise DFQError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DFQError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise DFQError(f"config file {path} must hold a mapping at the top level")
    return data


def resolve_config(preset: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the preset, then dotted command-line overrides (``{"quant.wbits": 4}``)."""
    data = _deep_copy(preset or {})
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(RunConfig, data)


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}
