"""Mixed precision under a budget: measure sensitivities on a synthetic pool, solve for the bits, hand them to a
method as per-layer overrides.

``allocate`` runs before the method: the method then quantizes with ``QuantConfig.overrides`` naming every
choice, so any method (``recon`` by default) and the export work unchanged, and a saved run rebuilds its Q from
its ``config.yaml`` as any other run.
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfq.errors import DFQError
from dfq.generators import InputStats, synthesize_pool
from dfq.mixed.sensitivity import Sensitivity, measure_sensitivity
from dfq.mixed.solve import Problem, solve
from dfq.mixed.tensors import ModelTensors, model_tensors
from dfq.quant import LayerOverride, QuantConfig, quantize_model
from dfq.quant.spec import check_bits
from dfq.utils.io import save_json

__all__ = ["Allocation", "MixedConfig", "allocate", "parse_bops", "parse_size", "parse_uniform", "tensors_of"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SI = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_CANDIDATES = (2, 3, 4, 5, 6, 8)


@dataclass
class MixedConfig:
    """Mixed precision: choose every layer's weight bits and every activation grid's bits under a budget.

    Attributes:
        size: budget on the weight codes: bytes (``180000``, ``"180KB"``, ``"0.5MB"``, ``"1.2MiB"``), or a
            uniform setting (``"W4A4"``: its size).
        bops: budget on the bit-operations of one input: a number (``2.6e9``, ``"2.6G"``), or a uniform setting
            (``"W4A4"``: its BOPs).
        avg_wbits: budget as average bits per weight (the same as ``size``: ``avg_wbits * params / 8`` bytes).
        wbits: the weight bit-widths to choose from (``None``: every candidate, 2-8, except for a method that
            learns its weights' rounding (``recon``) under a size budget given as a uniform setting, whose weights
            stay at that setting's bits; :meth:`for_method`).
        abits: the activation bit-widths to choose from.
        pairs: the (weight, input) bit-widths every layer must run with, e.g. ``["W4A8", "W8A8"]`` for an
            accelerator with those kernels only (empty: any).
        pointwise_only_wbits: weight bit-widths allowed only on 1x1 convolutions and linear layers (e.g. ``[4]``).
        rounding_steps: AdaRound steps that round each weight choice below 6 bits on its layer's own output before
            its sensitivity is measured (0: nearest rounding, as ZeroQ; right for methods that round to nearest,
            such as ``zeroq``). Nearest rounding overstates what weights cost ``recon``, which learns its rounding.
        num_samples: synthetic images the sensitivities are measured on.
        synth_steps: optimisation steps of their synthesis (per batch).
        synth_batch: images synthesized together.
    """

    size: str | float | None = None
    bops: str | float | None = None
    avg_wbits: float | None = None
    wbits: list[int] | None = None
    abits: list[int] = field(default_factory=lambda: list(_CANDIDATES))
    pairs: list[str] = field(default_factory=list)
    pointwise_only_wbits: list[int] = field(default_factory=list)
    rounding_steps: int = 100
    num_samples: int = 128
    synth_steps: int = 150
    synth_batch: int = 128

    def __post_init__(self) -> None:
        if self.size is None and self.bops is None and self.avg_wbits is None:
            raise DFQError("mixed precision needs a budget: mixed.size, mixed.bops or mixed.avg_wbits")
        for what in ("wbits", "abits", "pointwise_only_wbits"):
            if getattr(self, what) is not None:
                setattr(self, what, sorted({check_bits(b, f"mixed.{what}") for b in getattr(self, what)}))
        if self.wbits == [] or not self.abits:
            raise DFQError("mixed.wbits and mixed.abits must name at least one bit-width each")
        for p in self.pairs:
            parse_uniform(p, "mixed.pairs")
        if self.avg_wbits is not None and not self.avg_wbits > 0:
            raise DFQError(f"mixed.avg_wbits must be positive, got {self.avg_wbits}")
        if self.rounding_steps < 0:
            raise DFQError(f"mixed.rounding_steps must be >= 0, got {self.rounding_steps}")
        for key in ("num_samples", "synth_steps", "synth_batch"):
            if getattr(self, key) < 1:
                raise DFQError(f"mixed.{key} must be >= 1, got {getattr(self, key)}")

    def for_method(self, learns_rounding: bool) -> MixedConfig:
        """The search space with ``wbits`` filled in where the user left it open.

        A method that learns its weights' rounding (``recon``) recovers 4-bit weights almost fully (uniform W4A8
        loses 0.25 points on ResNet-20), so weight bits the solver buys with activation bits are wasted: its
        weights stay at the bits of a uniform size budget (``size="W4A4"``) and only the activation grids are
        allocated (measured in docs/results.md, "Mixed precision"). Every other case searches every candidate.
        """
        if self.wbits is not None:
            return self
        uniform = None if self.size is None else _uniform_or_none(self.size)
        narrow = (
            learns_rounding
            and uniform is not None
            and self.avg_wbits is None
            and not self.pairs
            and not self.pointwise_only_wbits
        )
        return replace(self, wbits=[uniform[0]] if narrow else list(_CANDIDATES))

    def sensitivity_settings(self, seed: int) -> dict[str, Any]:
        """What a cached sensitivity depends on."""
        keys = ("wbits", "abits", "pairs", "pointwise_only_wbits", "rounding_steps", "num_samples", "synth_steps",
                "synth_batch")  # fmt: skip
        return {"seed": seed, **{k: getattr(self, k) for k in keys}}


@dataclass
class Allocation:
    """The chosen bits.

    Attributes:
        bits: choice name (``layer:w`` or ``site:a``) -> bit-width.
        predicted_loss: sum of the chosen choices' sensitivities (nats).
        weight_bytes: bytes of the weight codes.
        bops: bit-operations of one input.
        budget: the budgets it was solved under (``weight_bytes``, ``bops``; ``None``: none).
        sensitivity_s: time of the sensitivity pass (0 when read from the cache), pool synthesis included.
    """

    bits: dict[str, int]
    predicted_loss: float
    weight_bytes: float
    bops: int
    budget: dict[str, float | None]
    sensitivity_s: float

    def overrides(self) -> dict[str, LayerOverride]:
        """Per-layer overrides that give every choice its bits (exact names)."""
        out: dict[str, LayerOverride] = {}
        for name, b in self.bits.items():
            key, kind = name.rsplit(":", 1)
            o = out.setdefault(key, LayerOverride())
            out[key] = replace(o, wbits=b) if kind == "w" else replace(o, abits=b)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_uniform(text: str, what: str = "setting") -> tuple[int, int]:
    """``"W4A8"`` -> (4, 8)."""
    m = re.fullmatch(r"[wW](\d+)[aA](\d+)", str(text).strip())
    if m is None:
        raise DFQError(f"{what}: expected a setting such as W4A8, got {text!r}")
    return check_bits(int(m[1]), f"{what} weight bits"), check_bits(int(m[2]), f"{what} activation bits")


def parse_size(value: str | float) -> float:
    """Bytes from ``180000``, ``"180KB"``, ``"0.5MB"`` or ``"1.2MiB"``."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if m is None or m[2].upper() not in _UNITS:
        raise DFQError(f"a size budget looks like 180KB, 0.5MB, 1.2MiB or W4A4, got {value!r}")
    return float(m[1]) * _UNITS[m[2].upper()]


def parse_bops(value: str | float) -> float:
    """Bit-operations from ``2.6e9`` or ``"2.6G"``."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]?)\s*", str(value))
    if m is None or m[2].upper() not in _SI:
        raise DFQError(f"a BOPs budget looks like 2.6G, 2.6e9 or W4A4, got {value!r}")
    return float(m[1]) * _SI[m[2].upper()]


def tensors_of(teacher: nn.Module, quant: QuantConfig, input_size: tuple[int, ...]) -> ModelTensors:
    """The choices and costs of ``teacher`` under ``quant`` (deploy protocol)."""
    if quant.protocol != "deploy":
        raise DFQError("mixed precision needs the deploy protocol (every layer's input on a grid, so its "
                       "bit-operations are defined); drop --protocol paper")  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        q = quantize_model(teacher, replace(quant, overrides={}, ends_bits=None))
    return model_tensors(q, torch.zeros(1, *input_size))


def allocate(
    teacher: nn.Module,
    quant: QuantConfig,
    mixed: MixedConfig,
    input_size: tuple[int, ...],
    *,
    generator: torch.Generator,
    seed: int = 0,
    input_stats: InputStats | None = None,
    cache: Path | None = None,
    progress: bool = True,
) -> Allocation:
    """Measure (or read from ``cache``) the sensitivities, then solve for the bits under ``mixed``'s budgets.

    Raises:
        DFQError: the papers' protocol, ``ends_bits`` (the allocation chooses the ends too), a malformed or
            infeasible budget.
    """
    if quant.ends_bits is not None:
        raise DFQError("mixed precision chooses the first and last layers' bits too: drop quant.ends_bits")
    mixed = mixed.for_method(learns_rounding=False)  # callers that know the method fill ``wbits`` first
    tensors = tensors_of(teacher, quant, input_size)
    options = _options(tensors, quant, mixed)
    sensitivity, spent = _sensitivity(teacher, quant, mixed, options, input_size, generator, seed, input_stats,
                                      cache, progress)  # fmt: skip
    max_bits = _size_budget(tensors, mixed)
    max_bops = None if mixed.bops is None else _bops_budget(tensors, mixed.bops)
    pairs = frozenset(parse_uniform(p) for p in mixed.pairs)
    problem = Problem(tensors, options, sensitivity.loss, max_bits, max_bops, pairs)
    bits = solve(problem)
    budget = {"weight_bytes": None if max_bits is None else max_bits / 8, "bops": max_bops}
    return Allocation(bits, round(problem.predicted(bits), 6), tensors.weight_bits(bits) / 8, tensors.bops(bits),
                      budget, spent)  # fmt: skip


def _options(tensors: ModelTensors, quant: QuantConfig, mixed: MixedConfig) -> dict[str, tuple[int, ...]]:
    """Bit-widths each choice may take: the candidates, the accelerator rules, and the user's overrides pinned."""
    pairs = [parse_uniform(p) for p in mixed.pairs]
    w_ok = {w for w, _ in pairs} if pairs else set(mixed.wbits)
    a_ok = {a for _, a in pairs} if pairs else set(mixed.abits)
    options = {}
    for c in tensors.choices:
        pinned = _pinned(quant, c.key, c.kind)
        if pinned is not None:
            options[c.name] = (pinned,)
            continue
        if c.kind == "w":
            allowed = [b for b in mixed.wbits if b in w_ok and (c.pointwise or b not in mixed.pointwise_only_wbits)]
        else:
            allowed = [b for b in mixed.abits if b in a_ok]
        if not allowed:
            raise DFQError(f"no bit-width is allowed for {c.name}: check mixed.wbits, mixed.abits, mixed.pairs and "
                           "mixed.pointwise_only_wbits")  # fmt: skip
        options[c.name] = tuple(allowed)
    return options


def _pinned(quant: QuantConfig, key: str, kind: str) -> int | None:
    """The bits a user's override fixes for this choice, if any (later patterns win)."""
    found = None
    for pattern, o in quant.overrides.items():
        value = o.wbits if kind == "w" else o.abits
        if value is not None and fnmatch.fnmatchcase(key, pattern):
            found = value
    return found


def _size_budget(tensors: ModelTensors, mixed: MixedConfig) -> int | None:
    """The weight-code budget in bits (the tighter of ``size`` and ``avg_wbits``)."""
    limits = []
    if mixed.size is not None:
        uniform = _uniform_or_none(mixed.size)
        limits.append(tensors.weight_bits(tensors.uniform(*uniform)) if uniform else int(parse_size(mixed.size) * 8))
    if mixed.avg_wbits is not None:
        limits.append(int(mixed.avg_wbits * tensors.params))
    return min(limits) if limits else None


def _bops_budget(tensors: ModelTensors, value: str | float) -> int:
    uniform = _uniform_or_none(value)
    return tensors.bops(tensors.uniform(*uniform)) if uniform else int(parse_bops(value))


def _uniform_or_none(value: str | float) -> tuple[int, int] | None:
    return parse_uniform(value) if isinstance(value, str) and value.strip()[:1] in ("w", "W") else None


def _fingerprint(teacher: nn.Module) -> list[float]:
    """Parameter count and sum of P: a cache measured on other weights is not reused."""
    with torch.no_grad():
        params = list(teacher.parameters())
        return [sum(p.numel() for p in params), float(sum(p.double().sum() for p in params))]


def _grid_settings(quant: QuantConfig) -> dict[str, Any]:
    """The quantization settings a sensitivity depends on (not the bits it chooses)."""
    skip = ("wbits", "abits", "overrides", "output_bits", "ends_bits")
    return {k: v for k, v in quant.to_dict().items() if k not in skip}


def _sensitivity(
    teacher: nn.Module,
    quant: QuantConfig,
    mixed: MixedConfig,
    options: dict[str, tuple[int, ...]],
    input_size: tuple[int, ...],
    generator: torch.Generator,
    seed: int,
    input_stats: InputStats | None,
    cache: Path | None,
    progress: bool,
) -> tuple[Sensitivity, float]:
    """The sensitivities of every option, from ``cache`` when it was measured with the same settings."""
    settings = {**mixed.sensitivity_settings(seed), "model": _fingerprint(teacher), "quant": _grid_settings(quant)}
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("settings") == settings:
            return Sensitivity.from_dict(saved), 0.0
    start = time.perf_counter()
    pool = synthesize_pool(teacher, input_size, mixed.num_samples, batch=mixed.synth_batch, steps=mixed.synth_steps,
                           generator=generator, input_stats=input_stats, progress=progress)  # fmt: skip
    sensitivity = measure_sensitivity(teacher, quant, pool, options, rounding_steps=mixed.rounding_steps,
                                      progress=progress)  # fmt: skip
    if cache is not None:
        save_json({"settings": settings, **sensitivity.to_dict()}, cache)
    return sensitivity, round(time.perf_counter() - start, 3)
