"""Data-free sensitivity: how far P's predictions move on synthetic images when one tensor alone is quantized.

ZeroQ (Cai et al., CVPR 2020) measures, for every layer and bit-width, the KL divergence between P's output and
the output of P with only that layer quantized, on its distilled data, and allocates bits by the sum of these
losses. dfq measures the same for every choice of :mod:`dfq.mixed.tensors` (weights and activation grids), with
the grids dfq's methods start from: least-error clipped weights (optionally with a short learned rounding, as a
reconstruction method will learn one), activation ranges observed in P and shrunk to their least-error clip.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dfq.mixed.rounding import learned_rounding
from dfq.mixed.tensors import Choice, ModelTensors, model_tensors
from dfq.quant import (
    ActMode,
    ActQuantizer,
    QuantConfig,
    QuantSpec,
    WeightQuantizer,
    quantize_model,
    weight_quantizers,
)
from dfq.quant.clip import least_error_act_range, least_error_weight_grid

__all__ = ["Sensitivity", "measure_sensitivity"]

_CLIP_IMAGES = 16  # images whose site inputs pick each activation clip (memory grows with it at 224 px)
_ROUNDING_IMAGES = 16  # images a learned rounding fits (32 fit ResNet-20's layers no better, at twice the time)
_ROUNDED_BELOW = 6  # bits below which weights get a learned rounding (at 6 bits and more, nearest costs ~nothing)


@dataclass
class Sensitivity:
    """Measured losses.

    Attributes:
        loss: choice name -> bit-width -> mean KL(P || P with that tensor quantized), in nats.
        seconds: time of the measurement (the pool not included).
    """

    loss: dict[str, dict[int, float]]
    seconds: float

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "loss": {c: {str(b): v for b, v in d.items()} for c, d in self.loss.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Sensitivity:
        return cls({c: {int(b): float(v) for b, v in row.items()} for c, row in d["loss"].items()}, d["seconds"])


@torch.no_grad()
def measure_sensitivity(
    teacher: nn.Module,
    quant: QuantConfig,
    pool: torch.Tensor,
    options: dict[str, tuple[int, ...]],
    *,
    batch_size: int = 64,
    rounding_steps: int = 0,
    progress: bool = True,
) -> Sensitivity:
    """Loss of every choice at every bit-width of ``options`` (choice name -> bit-widths), on ``pool``; with
    ``rounding_steps``, weights below 6 bits are rounded by that many AdaRound steps on their layer's output
    (:mod:`dfq.mixed.rounding`) instead of to nearest."""
    start = time.perf_counter()
    teacher_was_training = teacher.training
    teacher.eval()
    batches = pool.split(batch_size)
    reference = [F.log_softmax(teacher(x), dim=1) for x in batches]
    teacher.train(teacher_was_training)
    widths = sorted({b for opts in options.values() for b in opts})
    loss: dict[str, dict[int, float]] = {c: {} for c in options}
    total = sum(len(opts) for opts in options.values())
    inputs = None
    with tqdm(total=total, desc="mixed: sensitivity", disable=not progress) as bar:
        for bits in widths:
            q = _quantized_at(teacher, quant, bits, pool, batch_size)
            tensors = model_tensors(q, pool[:1])
            if rounding_steps and bits < _ROUNDED_BELOW and inputs is None:
                inputs = _layer_inputs(q, tensors, pool[:_ROUNDING_IMAGES])
            for choice in tensors.choices:
                if bits in options.get(choice.name, ()):
                    with _only(q, tensors, choice.name), _rounded(q, choice, inputs, rounding_steps, bits):
                        loss[choice.name][bits] = _kl(q, batches, reference)
                    bar.update()
    return Sensitivity(loss, round(time.perf_counter() - start, 3))


def _rounded(q: nn.Module, choice: Choice, inputs: dict | None, steps: int, bits: int):
    """Learned rounding for a weight choice of few bits."""
    if choice.kind != "w" or not steps or bits >= _ROUNDED_BELOW:
        return contextlib.nullcontext()
    return learned_rounding(q.get_submodule(choice.key), inputs[choice.key], steps)


def _layer_inputs(q: nn.Module, tensors: ModelTensors, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The float input of every weight choice's layer on ``x``."""
    store: dict[str, torch.Tensor] = {}
    keys = [c.key for c in tensors.choices if c.kind == "w"]
    hooks = [q.get_submodule(k).register_forward_pre_hook(_keep(store, k)) for k in keys]
    try:
        with _float(q):
            q(x)
    finally:
        for h in hooks:
            h.remove()
    return store


def _keep(store: dict[str, torch.Tensor], key: str):
    def hook(module: nn.Module, args: tuple) -> None:
        store[key] = args[0].detach()

    return hook


def _quantized_at(teacher: nn.Module, quant: QuantConfig, bits: int, pool: torch.Tensor, batch: int) -> nn.Module:
    """Q with every choice at ``bits``, its grids fitted to P's own tensors (every other tensor in float)."""
    config = replace(quant, wbits=bits, abits=bits, output_bits=bits, overrides={}, ends_bits=None,
                     weight_scales="stored")  # fmt: skip
    q = quantize_model(teacher, config).eval()
    for layer, wq in weight_quantizers(q):
        least_error_weight_grid(wq, layer.weight.detach())
    sites = [m for m in q.modules() if isinstance(m, ActQuantizer) and not m.fixed and not m.spec.is_noop]
    inputs: dict[ActQuantizer, torch.Tensor] = {}
    with _float(q):
        hooks = [s.register_forward_pre_hook(_observer(inputs)) for s in sites]
        try:
            for x in pool.split(batch):
                q(x)
            clip_inputs = dict(inputs) if len(pool) <= _CLIP_IMAGES else None
            if clip_inputs is None:
                inputs.clear()
                q(pool[:_CLIP_IMAGES])
                clip_inputs = dict(inputs)
        finally:
            for h in hooks:
                h.remove()
    for s in sites:
        s.set_mode(ActMode.FROZEN)
        if s in clip_inputs:
            least_error_act_range(s, clip_inputs[s])
    return q


def _observer(store: dict[ActQuantizer, torch.Tensor]):
    """A pre-hook that folds a disabled site's float input into its range and keeps the last one."""

    def hook(site: ActQuantizer, args: tuple) -> None:
        x = args[0].detach().float()
        site.observe(x)
        store[site] = x

    return hook


@contextlib.contextmanager
def _float(q: nn.Module) -> Iterator[dict[WeightQuantizer, QuantSpec]]:
    """Every activation grid off (the input's too) and every weight in float; yields the weights' specs."""
    specs = {wq: wq.spec for _, wq in weight_quantizers(q)}
    for m in q.modules():
        if isinstance(m, ActQuantizer):
            m.set_mode(ActMode.DISABLED)
    for wq in specs:
        wq.spec = QuantSpec(32)
    try:
        yield specs
    finally:
        for wq, spec in specs.items():
            wq.spec = spec


@contextlib.contextmanager
def _only(q: nn.Module, tensors: ModelTensors, name: str) -> Iterator[None]:
    """Q with one choice quantized and everything else in float."""
    modes = {m: m.get_mode() for m in q.modules() if isinstance(m, ActQuantizer)}
    key, kind = name.rsplit(":", 1)
    with _float(q) as specs:
        if kind == "w":
            wq = q.get_submodule(key).weight_quantizer
            wq.spec = specs[wq]
        for site in tensors.quantizers.get(name, []):
            site.set_mode(ActMode.FROZEN)
        try:
            yield
        finally:
            for m, mode in modes.items():
                m.set_mode(mode)


def _kl(q: nn.Module, batches: tuple[torch.Tensor, ...], reference: list[torch.Tensor]) -> float:
    total, n = 0.0, 0
    for x, ref in zip(batches, reference, strict=True):
        out = F.log_softmax(q(x), dim=1)
        total += float(F.kl_div(out, ref, log_target=True, reduction="sum"))
        n += len(x)
    return max(total / n, 0.0)  # float32 rounding makes a near-zero KL slightly negative
