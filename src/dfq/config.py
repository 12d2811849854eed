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
from dfq.methods import list_methods, method_class
from dfq.methods.adadfq import AdaDFQConfig, AdaSGConfig
from dfq.methods.gdfq import GDFQConfig
from dfq.methods.plugins import PluginConfig
from dfq.methods.recon import ReconConfig
from dfq.methods.zaq import ZAQConfig
from dfq.methods.zeroq import ZeroQConfig
from dfq.quant import LayerOverride, QuantConfig

__all__ = ["METHODS", "GeneratorConfig", "RunConfig", "TrainConfig", "from_dict", "load_yaml", "resolve_config"]

# Post-training methods (no generator game): their defaults on top of RunConfig's.
POST_TRAINING = {"zeroq": {}, "recon": {"quant.weight_scales": "stored"}}
METHODS = (*POST_TRAINING, *list_methods())
DEFAULT_METHOD = "recon"


@dataclass
class TrainConfig:
    """The shared schedule of the generator-based methods (METHODS.md §1.7).

    Attributes:
        epochs, iters_per_epoch: length of the game; each iteration draws a fresh batch.
        batch_size: generated images per iteration.
        warmup_epochs: epochs in which only G trains (Q's loss is computed, not stepped; AdaSG/AdaDFQ, whose G step
            already ran Q, compute it only while ranges are observed).
        observe_epochs: epochs in which Q's activation ranges are observed; frozen afterwards.
        q_*: Q's SGD (learning rate, momentum, weight decay, Nesterov, per-epoch milestones).
        g_*: G's Adam (learning rate, betas, per-epoch milestones).
        lr_gamma: learning-rate factor at each milestone.
        eval_every: evaluate on the real test set every K epochs (and after the last one).
        checkpoint_every: write a resumable checkpoint every K epochs (and after the last one).
        checkpoint_every_iters: also write one every N iterations (0: only at epoch ends).
        max_rollbacks: on a NaN/Inf loss, gradient or range, return to the last checkpoint at most this often.
        rollback_lr_factor: multiply the learning rates by this at each rollback.
        fast: trade exactness for speed: bfloat16 autocast for the forwards and backwards of G, P and Q and the
            channels-last memory format (quantizers, BNS statistics and losses stay in float32).
        ema_decay: keep an exponential moving average of Q's parameters, updated after every Q step with this
            decay (0: off); evaluations and the returned Q use it. Meant to steady the final model (the game's
            top-1 swings by tenths of a point between epochs); on the AdaDFQ preset it did not (docs/methods.md).
        shards: the batch is this many equal shards, each drawn from its own noise stream, split evenly over the
            processes of a data-parallel run; ``None``: one per process of the launch that starts the run (fixed in
            the run's config.yaml). One process with ``shards: S`` draws exactly the images of S processes.
    """

    epochs: int = 400
    iters_per_epoch: int = 200
    batch_size: int = 16
    warmup_epochs: int = 4
    observe_epochs: int = 4
    q_lr: float = 1e-4
    q_momentum: float = 0.9
    q_weight_decay: float = 1e-4
    q_nesterov: bool = True
    q_milestones: list[int] = field(default_factory=lambda: [100, 200, 300])
    g_lr: float = 1e-3
    g_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    g_milestones: list[int] = field(default_factory=lambda: [100, 200, 300])
    lr_gamma: float = 0.1
    eval_every: int = 1
    checkpoint_every: int = 1
    checkpoint_every_iters: int = 0
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5
    fast: bool = False
    ema_decay: float = 0.0
    shards: int | None = None

    def __post_init__(self) -> None:
        if self.shards is not None and self.shards < 1:
            raise DFQError(f"train.shards must be >= 1, got {self.shards}")
        for key in ("epochs", "iters_per_epoch", "batch_size", "eval_every", "checkpoint_every", "observe_epochs"):
            if getattr(self, key) < 1:
                raise DFQError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_rollbacks < 0 or not 0.0 < self.rollback_lr_factor <= 1.0:
            raise DFQError("train.max_rollbacks must be >= 0 and train.rollback_lr_factor in (0, 1]")
        if self.checkpoint_every_iters < 0:
            raise DFQError(f"train.checkpoint_every_iters must be >= 0, got {self.checkpoint_every_iters}")
        if self.warmup_epochs < 0:
            raise DFQError(f"train.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if len(self.g_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.g_betas):
            raise DFQError(f"train.g_betas must be two values in [0, 1), got {self.g_betas}")
        # The optimizers' own checks, reported as config errors instead of tracebacks mid-run.
        for key in ("q_lr", "g_lr", "q_momentum", "q_weight_decay"):
            if not getattr(self, key) >= 0:
                raise DFQError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.q_nesterov and self.q_momentum <= 0:
            raise DFQError("train.q_nesterov needs train.q_momentum > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise DFQError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.lr_gamma > 0:
            raise DFQError(f"train.lr_gamma must be > 0, got {self.lr_gamma}")


@dataclass
class GeneratorConfig:
    """Attributes:
    name: generator architecture; ``None`` picks the method's (cifar, imagenet or unconditional).
    latent_dim: noise dimension; ``None`` uses the method's (100, or 256 for ZAQ).
    """

    name: str | None = None
    latent_dim: int | None = None

    def __post_init__(self) -> None:
        if self.latent_dim is not None and self.latent_dim < 1:
            raise DFQError(f"generator.latent_dim must be >= 1, got {self.latent_dim}")


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
        train: the game's schedule (generator-based methods).
        generator: the generator (generator-based methods).
        plugins: optional additions to any generator-based method (low-pass filter, hard-sample labels,
            Grad-CAM alignment, learned steps and rounding); all off by default.
        zeroq, recon, gdfq, zaq, adasg, adadfq: each method's own settings (only the chosen one is used).
    """

    model: str = "resnet20a_cifar10"
    weights: str | None = None
    method: str = DEFAULT_METHOD
    seed: int = 0
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    plugins: PluginConfig = field(default_factory=PluginConfig)
    zeroq: ZeroQConfig = field(default_factory=ZeroQConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    gdfq: GDFQConfig = field(default_factory=GDFQConfig)
    zaq: ZAQConfig = field(default_factory=ZAQConfig)
    adasg: AdaSGConfig = field(default_factory=AdaSGConfig)
    adadfq: AdaDFQConfig = field(default_factory=AdaDFQConfig)

    def __post_init__(self) -> None:
        if not -(2**63) <= self.seed < 2**63:  # what torch.manual_seed accepts
            raise DFQError(f"seed must be a 64-bit signed integer, got {self.seed}")
        if self.method in POST_TRAINING and self.plugins != PluginConfig():
            raise DFQError(f"plugins apply to the generator-based methods, not '{self.method}'")
        if (self.plugins.lsq or self.plugins.adaround) and self.quant.weight_scales != "stored":
            raise DFQError("plugins.lsq and plugins.adaround learn the weight steps: set quant.weight_scales: stored")
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
        return from_dict(hint, {} if value is None else value, name)  # "section:" with every key commented out
    origin = typing.get_origin(hint)
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
    raise DFQError(f"config key '{name}' has the wrong type: got {value!r}, expected {hint}")


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


def resolve_config(preset: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the method's paper defaults, then the preset, then dotted command-line
    overrides (``{"quant.wbits": 4}``; ``None`` values are ignored)."""
    preset = preset or {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    method = overrides.get("method", preset.get("method", DEFAULT_METHOD))
    data: dict[str, Any] = {}
    if method in POST_TRAINING:
        _set_dotted(data, POST_TRAINING[method])
    elif method in METHODS:
        _set_dotted(data, method_class(method).defaults)
    _merge(data, _deep_copy(preset))
    _set_dotted(data, overrides)
    plugins, quant = data.get("plugins"), data.get("quant")
    learns = isinstance(plugins, dict) and (plugins.get("lsq") or plugins.get("adaround"))
    if learns and (quant is None or (isinstance(quant, dict) and "weight_scales" not in quant)):
        _set_dotted(data, {"quant.weight_scales": "stored"})  # a learned weight step lives in the stored grid
    return from_dict(RunConfig, data)


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
