"""Run configuration, shaped like what it configures: the model, the quantization, one method section.

```yaml
model: resnet20a_cifar10
seed: 0
quant: {wbits: 4, abits: 4}
method: {name: adadfq, lambda_l: 0.1, train: {epochs: 68}}
```

Values come from three layers: the dataclasses' defaults (each method's config class holds its paper's
settings), then a YAML preset, then the command line or the Python API (``--set KEY=VALUE``). A section
sets only the keys it names; an unknown key, a wrong type or a combination a method cannot honour is an
error, never a silent rewrite. The resolved configuration is saved as ``config.yaml`` in every run
directory and rebuilds the quantized model from its checkpoint; files written in the earlier flat layout
(one section per method) are migrated on read.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dfq.errors import DFQError, did_you_mean
from dfq.methods import DEFAULT_METHOD, METHODS, GameConfig, Method, method_of_config
from dfq.mixed import MixedConfig
from dfq.quant import LayerOverride, QuantConfig

__all__ = ["DEFAULT_METHOD", "RunConfig", "from_dict", "load_yaml", "migrate", "parse_set", "resolve_config"]

_GAME_SECTIONS = ("train", "generator", "plugins")  # the flat layout's sections that moved into a game's
T = TypeVar("T")


@dataclass
class RunConfig:
    """Everything that determines a quantization run (paths to real data are not part of it).

    Attributes:
        model: registered model name.
        weights: local checkpoint of the full-precision model; ``None`` uses the published weights.
        seed: seed of every random stream of the run.
        quant: how Q is quantized.
        method: the chosen method's config (an instance of its ``config_cls``, e.g. ``ReconConfig``).
        mixed: mixed precision under a budget (``None``: every layer at ``quant``'s bits); the chosen bits are
            saved as ``quant.overrides``.
    """

    model: str = "resnet20a_cifar10"
    weights: str | None = None
    seed: int = 0
    quant: QuantConfig = field(default_factory=QuantConfig)
    method: Any = field(default_factory=lambda: METHODS.get(DEFAULT_METHOD).config_cls())
    mixed: MixedConfig | None = None

    def __post_init__(self) -> None:
        if not -(2**63) <= self.seed < 2**63:  # what torch.manual_seed accepts
            raise DFQError(f"seed must be a 64-bit signed integer, got {self.seed}")
        method = self.create_method()
        self.quant = self.quant.resolved(**method.quant_defaults())  # what the method leaves open, filled
        method.check(self.quant)
        if self.mixed is not None:
            self.mixed = self.mixed.for_method(method.learns_rounding)  # saved resolved, as ``quant``

    @property
    def method_name(self) -> str:
        return method_of_config(self.method).name

    def create_method(self) -> Method:
        return method_of_config(self.method)(self.method)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("quant", "method")}
        method = {"name": self.method_name, **dataclasses.asdict(self.method)}
        if self.mixed is not None:
            out["mixed"] = dataclasses.asdict(self.mixed)
        return {**out, "quant": self.quant.to_dict(), "method": method}


def resolve_config(preset: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The run config from a preset (or a saved ``config.yaml``) and dotted overrides such as
    ``{"method.name": "zeroq", "quant.wbits": 8, "method.train.epochs": 2}`` (``None`` values are ignored).

    Naming another method than the preset's starts that method's section from its defaults.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    chosen = overrides.pop("method.name", None) or overrides.pop("method", None)
    data = migrate(_deep_copy(preset or {}), chosen)
    if chosen is not None and chosen != _method_name(data):
        data["method"] = {"name": chosen}
    _set_dotted(data, overrides)
    return _build(data)


def _method_name(data: dict[str, Any]) -> str:
    section = data.get("method") or {}
    if not isinstance(section, dict):
        raise DFQError(f"config key 'method' must be a mapping with a name, got {section!r}")
    return str(section.get("name", DEFAULT_METHOD))


def _build(data: dict[str, Any]) -> RunConfig:
    known = [f.name for f in dataclasses.fields(RunConfig)]
    for key in sorted(set(data) - set(known)):
        raise DFQError(f"unknown config key '{key}'{did_you_mean(key, known)}")
    section = dict(data.get("method") or {})
    method_cls = METHODS.get(str(section.pop("name", DEFAULT_METHOD)))
    method = method_cls(from_dict(method_cls.config_cls, section, "method"))
    quant = from_dict(QuantConfig, data.get("quant") or {}, "quant")
    top = {k: v for k, v in data.items() if k not in ("quant", "method")}
    hints = typing.get_type_hints(RunConfig)
    top = {k: _coerce(hints[k], v, k) for k, v in top.items()}
    return RunConfig(**top, quant=quant, method=method.config)


def migrate(data: dict[str, Any], method: str | None = None) -> dict[str, Any]:
    """A config in the earlier flat layout (``method: NAME`` with sections ``zeroq:``, ``recon:``, ``train:``,
    ``plugins:``, ...) in today's layout; today's layout is returned as it is. ``method`` names the method
    when the file does not (a preset used with ``--method``).

    Earlier run directories saved every section; those of other methods are dropped where they hold only
    defaults, and are an error where they set something (they would otherwise be silently ignored).
    """
    _migrate_output_bits(data)
    if isinstance(data.get("method"), dict):
        return data
    name = data.pop("method", None) or method or DEFAULT_METHOD
    section: dict[str, Any] = {"name": name, **(data.pop(name, None) or {})}
    fields = _fields_of(name)
    for key in (*_GAME_SECTIONS, *METHODS):
        if key not in data:
            continue
        value = data.pop(key)
        if key in fields:
            section[key] = {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value
        elif not _only_defaults(key, value):
            raise DFQError(f"config section '{key}' does not apply to method '{name}'")
    data["method"] = section
    return data


def _migrate_output_bits(data: dict[str, Any]) -> None:
    """A config saved while ``quant.output_bits: null`` meant ``abits`` (today it resolves to 8 when the config is
    built, so saved configs hold a number): its model's sites were at ``abits``, and reload so."""
    quant = data.get("quant")
    if isinstance(quant, dict) and "output_bits" in quant and quant["output_bits"] is None and "abits" in quant:
        quant["output_bits"] = quant["abits"]


def _fields_of(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(METHODS.get(name).config_cls)} if name in METHODS else set()


def _only_defaults(key: str, value: Any) -> bool:
    """Whether a flat-layout section holds nothing but defaults (as every earlier ``config.yaml`` did)."""
    if not value:
        return True
    if key in METHODS:
        default = dataclasses.asdict(METHODS.get(key).config_cls())
    else:
        default = dataclasses.asdict(getattr(GameConfig(), key))
    flat = {k: v for k, v in _plain(default).items() if not isinstance(v, dict)}
    return isinstance(value, dict) and all(v is None or flat.get(k) == _plain(v) for k, v in value.items() if k in flat)


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as dotted overrides; values are read as YAML (numbers, booleans, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DFQError(f"--set must look like KEY=VALUE (e.g. method.train.epochs=10), got '{item}'")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise DFQError(f"--set {key}: the value '{raw}' is not valid YAML") from e
    return out


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
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict | None):
            value = _onto_default(fields[key], value or {})  # a section sets only the keys it names
        kwargs[key] = _coerce(hints[key], value, name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise DFQError(f"invalid config section '{where or '<root>'}': {e}") from e


def _onto_default(f: dataclasses.Field, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` merged onto the field's default instance (a method's schedule keeps its other defaults)."""
    if f.default_factory is dataclasses.MISSING:
        return values
    data = _plain(dataclasses.asdict(f.default_factory()))
    _merge(data, values)
    return data


def _plain(value: Any) -> Any:
    """asdict's output with tuples as lists and nested dataclass dicts as they are (what YAML would give)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, {} if value is None else value, name)  # "section:" with every key commented out
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and value is not None and len(args) == 2 and type(None) in args:
        return _coerce(next(a for a in args if a is not type(None)), value, name)  # X | None, given a value
    if origin is dict and typing.get_args(hint)[1] is LayerOverride:
        if not isinstance(value, dict):
            raise DFQError(f"config key '{name}' must be a mapping of layer pattern -> bits")
        return {k: from_dict(LayerOverride, v, f"{name}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list | tuple):
            raise DFQError(f"config key '{name}' must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:  # fixed length, e.g. tuple[float, float]; YAML gives a list
        items = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise DFQError(f"config key '{name}' must be a list of {len(items)} values, got {value!r}")
        return tuple(_coerce(t, v, f"{name}[{i}]") for i, (t, v) in enumerate(zip(items, value, strict=True)))
    allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(t, type) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    expected = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
    raise DFQError(f"config key '{name}' has the wrong type: got {value!r}, expected {expected}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML preset (safe loader only)."""
    path = Path(path)
    if not path.is_file():
        raise DFQError(f"config file not found: {path}")
    try:
        text = path.read_text()
    except OSError as e:
        raise DFQError(f"cannot read config file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise DFQError(f"config file {path} is not a text (UTF-8) file") from e
    try:
        data = yaml.safe_load(text) or {}
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        # ValueError: undecodable bytes, impossible dates (2001-13-01), "!!int abc"; RecursionError: deep nesting.
        raise DFQError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from e
    if not isinstance(data, dict):
        raise DFQError(f"config file {path} must hold a mapping at the top level")
    return data


def _yaml_problem(e: Exception) -> str:
    """One line: PyYAML's messages span several lines (context, snippet and caret)."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(e).split())


def _set_dotted(data: dict[str, Any], values: dict[str, Any]) -> None:
    for dotted, value in values.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise DFQError(f"config section '{p}' must be a mapping")
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            _merge(node[leaf], value)  # e.g. per-layer overrides add to the preset's
        else:
            node[leaf] = value


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for k, v in other.items():
        if v is None and isinstance(into.get(k), dict):
            continue  # an empty YAML section (every key commented out) sets nothing
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}
