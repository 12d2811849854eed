"""The one protocol every data-free method follows, and the registry that lists them.

A method is a class with a typed config dataclass, registered under a name, entered through
:meth:`Method.quantize`: ``method.quantize(teacher, quant_config, context) -> (Q, summary)``. The
CLI, the Python API and the run driver find methods here by name and know nothing else about them,
so adding a method is one new module (or one class in user code) with ``@register_method``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dfq.distributed import DistContext
from dfq.errors import DFQError
from dfq.generators import InputStats
from dfq.quant import QuantConfig
from dfq.registry import Registry

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Evaluator",
    "Method",
    "MethodContext",
    "create_method",
    "list_methods",
    "method_class",
    "method_of_config",
    "register_method",
]

Evaluator = Callable[[nn.Module], dict[str, Any]]


@dataclass
class MethodContext:
    """What a method receives besides the teacher and the quantization config.

    Attributes:
        input_size: (C, H, W) of one input.
        num_classes: classes of the teacher's output.
        seed: the run's seed (the global streams are seeded once, at the entry point, before the call).
        generator: the method's own random stream, seeded from ``seed``.
        evaluate: real-data evaluation callback (``None``: no evaluation); the only way real data reaches a run.
        run_dir: where a method may keep checkpoints and metrics (``None``: nothing on disk).
        resume: continue the run saved in ``run_dir``.
        progress: show progress bars.
        dist: this process's place in a data-parallel run, and its device.
        model_name: the teacher's registry name, for messages (how to resume).
        input_stats: per-channel mean and std of typical inputs, where the model does not take standardised
            ones (raw pixels); synthesizers map their images there (``dfq.generators.to_input_space``).
    """

    input_size: tuple[int, ...]
    num_classes: int
    seed: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)
    evaluate: Evaluator | None = None
    run_dir: Path | None = None
    resume: bool = False
    progress: bool = True
    dist: DistContext = field(default_factory=DistContext.current)
    model_name: str = "MODEL"
    input_stats: InputStats | None = None


class Method(ABC):
    """Base class of every data-free method.

    Class attributes:
        name: the registry name (``--method NAME``, ``method: {name: NAME}``).
        config_cls: the method's config dataclass (its section of the run config).
        description: one line for ``dfq methods``.
        log_labels: metric keys of ``metrics.jsonl`` -> what they mean, for reports.
        stored_grids: why the method needs weight grids stored in buffers (``quant.weight_scales: stored``, its
            default for it); another choice is refused with this reason. Empty: no such need.
        learns_rounding: the method learns how each weight rounds against its quantized inputs (``recon``), so it
            recovers low-bit weights far better than nearest rounding; mixed precision then keeps the weights at
            the budget's bits (:meth:`dfq.mixed.MixedConfig.for_method`).
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]
    description: ClassVar[str] = ""
    log_labels: ClassVar[dict[str, str]] = {}
    stored_grids: ClassVar[str] = ""
    learns_rounding: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        self.config = self.config_cls() if config is None else config
        if not isinstance(self.config, self.config_cls):
            raise DFQError(f"method '{self.name}' takes a {self.config_cls.__name__}, got {type(config).__name__}")

    def quant_defaults(self) -> dict[str, str]:
        """Quantization settings this method needs unless the user chose them (``QuantConfig`` keys)."""
        return {"weight_scales": "stored"} if self.stored_grids else {}

    def float_model(self, teacher: nn.Module) -> nn.Module:
        """The float architecture this method's Q is built on, rebuilt when a saved Q is loaded (its weights do not
        matter there); the teacher's own unless the method rewrites it (``cle`` folds BatchNorm into convolutions)."""
        return teacher

    def check_launch(self, dist: DistContext) -> None:
        """Refuse a launch this method cannot run on (by default: anything but one process)."""
        if dist.active:
            raise DFQError(f"'{self.name}' runs on one process; launch it without torchrun or --nproc")

    def for_launch(self, world_size: int) -> Any:
        """The config with anything that depends on the launch fixed (recorded in the run's config.yaml)."""
        return self.config

    def check(self, quant: QuantConfig) -> None:
        """Refuse a quantization config this method cannot honour (one clear :class:`DFQError`)."""
        if self.stored_grids and quant.weight_scales not in (None, "stored"):
            raise DFQError(f"the {self.name} method {self.stored_grids}: set quant.weight_scales to stored")

    @abstractmethod
    def quantize(self, teacher: nn.Module, quant: QuantConfig, ctx: MethodContext) -> tuple[nn.Module, dict[str, Any]]:
        """Return Q (a quantized copy; ``teacher`` is not modified) and a summary of the run."""


METHODS = Registry[type[Method]]("method", hint="`dfq methods` lists them")
DEFAULT_METHOD = "recon"  # the best accuracy per second of the built-in methods (docs/results.md, method study)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name`` everywhere (CLI, API, config files)."""
    if not dataclasses.is_dataclass(cls.config_cls):
        raise TypeError(f"{cls.__name__}.config_cls must be a dataclass")
    METHODS.add(cls.name, cls)
    return cls


def list_methods() -> list[str]:
    """Every registered method, sorted."""
    return METHODS.names()


def method_class(name: str) -> type[Method]:
    return METHODS.get(name)


def create_method(name: str, config: Any = None) -> Method:
    return method_class(name)(config)


def method_of_config(config: Any) -> type[Method]:
    """The method whose config class ``config`` is an instance of (exactly, not a subclass)."""
    for name in METHODS:
        cls = METHODS.get(name)
        if type(config) is cls.config_cls:
            return cls
    raise DFQError(f"{type(config).__name__} is not the config of a registered method; `dfq methods` lists them")
