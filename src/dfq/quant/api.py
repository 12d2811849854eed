"""Turn a float model into a fake-quantized copy, and drive its quantizers.

The papers' protocol (GDFQ, ECCV 2020, and its successors): every Conv2d/Linear gets a weight
quantizer (first and last layer included), every activation (the papers' ReLU/ReLU6, and
SiLU, Hardswish, Sigmoid gates, ... of other CNNs: ``dfq.quant.prepare.ACTIVATIONS``) is
followed by an activation quantizer, the input image is not quantized, BatchNorm stays
unfolded.

The deploy protocol is what an integer runtime executes: symmetric per-channel
weights (so BatchNorm folds into the per-channel scales at export without moving
any weight off its grid), symmetric per-tensor activations (unsigned after a
ReLU, signed where an activation goes negative), a quantizer on the input of every activation
outside the ReLU family (the BatchNorm or layer output it reads, so that the layer before it
runs on an integer kernel and the activation in float between two grids), an input quantizer on every Conv2d/Linear
whose input is not already on a grid (the image at ``input_bits``, pooled features,
products such as a squeeze-excitation's ``x * gate``), and, with
``quantize_residual``, a quantizer on each BatchNorm output that enters a
residual addition (on the Conv2d/Linear output itself where no BatchNorm follows
it, e.g. ResNet-8's 1x1 projection shortcuts), and on the output of every addition,
concatenation, BatchNorm or layer that is not read by exactly one layer or ReLU that
quantizes it (the chained residuals of MobileNetV2 and EfficientNet, GhostNet's
concatenations, a squeeze-excitation's input), so the additions, concatenations and
products and the layers before them run on integer kernels. BatchNorm stays unfolded
during training (Q's BatchNorm runs with fixed statistics), the export folds it.

Models that apply activations functionally (``F.relu`` or ``x.sigmoid()`` in
``forward``) or reuse one activation module at several sites are rewritten with
``torch.fx`` so that every activation site is its own module.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import fx, nn

from dfq.errors import DFQError
from dfq.quant.graph import is_shape, trace
from dfq.quant.modules import QuantActivation, QuantConv2d, QuantLinear
from dfq.quant.prepare import (
    ACTIVATIONS,
    check_supported,
    set_submodule,
    split_activation_sites,
    unfuse_norm_act,
)
from dfq.quant.quantizer import OBSERVERS, ActMode, ActQuantizer, WeightQuantizer
from dfq.quant.sites import add_deploy_sites
from dfq.quant.spec import Granularity, QuantSpec, check_bits

__all__ = [
    "LayerOverride",
    "QuantConfig",
    "act_quantizers",
    "calibrate",
    "quant_disabled",
    "quantize_model",
    "set_act_mode",
]


@dataclass
class LayerOverride:
    """Bit-widths for the layers whose names match a pattern (``None`` keeps the default)."""

    wbits: int | None = None
    abits: int | None = None

    def __post_init__(self) -> None:
        for what in ("wbits", "abits"):
            if getattr(self, what) is not None:
                check_bits(getattr(self, what), what)


PROTOCOLS = ("paper", "deploy")
_METHOD_CHOICES = {"weight_scales": "minmax", "act_observer": "ema"}  # what a method may choose, dfq's defaults


@dataclass
class QuantConfig:
    """How to quantize a model.

    Attributes:
        protocol: "deploy" (the default: what an integer runtime executes, so Q exports to ONNX; implies
            symmetric per-channel weights and symmetric activations, see the module docstring) or "paper" (the DFQ
            papers' fake quantization, for comparisons with published figures; the papers' presets set it).
        wbits: weight bit-width of every Conv2d/Linear (2-8; 16/32 as no-op checks).
        abits: bit-width of every activation quantizer (after each activation).
        weight_granularity: "per_channel" (the papers') or "per_tensor"; ``None``: the protocol's.
        weight_symmetric: symmetric weights instead of the papers' asymmetric min/max; ``None``: the
            protocol's (asymmetric for "paper", symmetric for "deploy", which allows nothing else).
        act_symmetric: symmetric (unsigned after ReLU) activations; ``None``: the protocol's, as above.
        act_observer: "ema" (bias-corrected EMA), "paper" (the papers' update, quirk
            included) or "minmax" (running min/max); ``None``: the method's choice, else "ema".
        act_momentum: EMA momentum of the observer.
        overrides: fnmatch pattern on a layer's qualified name -> :class:`LayerOverride`.
            For example ``{"conv1": LayerOverride(wbits=8), "linear": LayerOverride(wbits=8)}``
            keeps the first and last layers at 8 bits; an activation site is named after its
            ReLU module (``layer3.2.relu2``), an input site after its layer (``linear``), a
            residual site after its BatchNorm (``layer1.0.bn2``), or after its layer where no BatchNorm
            follows (``b2sc``), the site of an addition's output after the addition (``_blocks.6.add_out``).
            Later patterns win.
        weight_scales: "minmax" (the papers: the min/max grid of the current weights at every
            forward) or "stored" (a grid kept in buffers, so methods can learn it); ``None``: the
            method's choice (``recon`` and learned steps need "stored"), else "minmax".
        ends_bits: keep the first and the last Conv2d/Linear (in execution order) at this
            bit-width, with the activations next to them (the first activation site, in the usual
            conv-BN-ReLU stem the second layer's input, and the site the last layer reads), as
            BRECQ, QDrop and Genie do; ``None``: every layer at ``wbits``/``abits`` (the DFQ
            papers' protocol). ``overrides`` still win where they match.
        input_bits: deploy protocol: bit-width of the model input (images are 8-bit data).
        input_range: deploy protocol: the range of valid model inputs, ``(low, high)`` (the image range after the
            model's preprocessing: ``(0, 255)`` for raw pixels, about ``(-2.1, 2.6)`` for ImageNet's mean/std); the
            input quantizer keeps it instead of a range observed on synthetic images, which need not span real
            pixels. ``None``: observed. ``dfq.quantize`` fills it from a zoo model's preprocessing.
        quantize_residual: deploy protocol: quantize the BatchNorm outputs (or Conv2d/Linear outputs that
            no BatchNorm follows) that enter residual additions and concatenations, so the convolutions before
            them run on integer kernels too.
        output_bits: deploy protocol: bit-width of the output sites that no Conv2d/Linear reads (the inputs of
            additions and concatenations, of activations outside the ReLU family); ``None``: 8 (``abits`` where
            higher), resolved when the config is built. A site that a layer reads stays at ``abits``: every
            multiply-accumulate reads ``abits`` codes. The others feed element-wise operators, which ONNX Runtime
            and OpenVINO run on 8-bit containers whatever the codes' width; at 4 bits the inputs of ResNet-20's
            additions cost its W4A4 model 0.95 points against the papers' protocol, which leaves them in float.
            Per-site ``overrides`` still win.
    """

    protocol: str = "deploy"
    wbits: int = 4
    abits: int = 4
    weight_granularity: str | None = None
    weight_symmetric: bool | None = None
    act_symmetric: bool | None = None
    act_observer: str | None = None
    act_momentum: float = 0.9
    overrides: dict[str, LayerOverride] = field(default_factory=dict)
    weight_scales: str | None = None
    ends_bits: int | None = None
    input_bits: int = 8
    input_range: tuple[float, float] | None = None
    quantize_residual: bool = True
    output_bits: int | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise DFQError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        self._resolve_protocol()
        check_bits(self.wbits, "wbits")
        check_bits(self.abits, "abits")
        check_bits(self.input_bits, "input_bits")
        if self.ends_bits is not None:
            check_bits(self.ends_bits, "ends_bits")
        if self.output_bits is None:  # resolved here, so that a saved config says which grids its model has
            self.output_bits = max(8, self.abits)
        check_bits(self.output_bits, "output_bits")
        if self.input_range is not None:
            lo, hi = self.input_range = tuple(float(v) for v in self.input_range)  # type: ignore[assignment]
            if not lo < hi:
                raise DFQError(f"input_range must be (low, high) with low < high, got {list(self.input_range)}")
        if self.weight_granularity not in {g.value for g in Granularity}:
            raise DFQError(f"weight_granularity must be per_channel or per_tensor, got {self.weight_granularity!r}")
        if self.weight_scales not in (None, "minmax", "stored"):
            raise DFQError(f"weight_scales must be minmax or stored, got {self.weight_scales!r}")
        if self.act_observer is not None and self.act_observer not in OBSERVERS:
            raise DFQError(f"act_observer must be one of {', '.join(OBSERVERS)}, got {self.act_observer!r}")
        if not 0.0 < self.act_momentum < 1.0:
            raise DFQError(f"act_momentum must be in (0, 1), got {self.act_momentum}")
        self.overrides = {
            str(k): v if isinstance(v, LayerOverride) else LayerOverride(**v) for k, v in self.overrides.items()
        }

    def _resolve_protocol(self) -> None:
        """Fill the grid choices left open; the deploy protocol allows only symmetric per-channel ones."""
        deploy = self.protocol == "deploy"
        wanted = {"weight_granularity": "per_channel", "weight_symmetric": deploy, "act_symmetric": deploy}
        for key, value in wanted.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
            elif deploy and getattr(self, key) != value:
                raise DFQError(f"the deploy protocol needs {key}={value} (what integer runtimes execute), "
                               f"got {getattr(self, key)!r}")  # fmt: skip

    def resolved(self, **method_defaults: str) -> QuantConfig:
        """The settings left to the method (``None``) filled with its defaults, then with dfq's."""
        values = {k: getattr(self, k) or method_defaults.get(k, d) for k, d in _METHOD_CHOICES.items()}
        return replace(self, **values)

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.input_range is not None:
            out["input_range"] = list(self.input_range)  # YAML has lists, not tuples
        return out

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        return cls(**d)

    def bits_for(self, name: str) -> tuple[int, int]:
        """(wbits, abits) for the layer called ``name``, after overrides."""
        wbits, abits = self.wbits, self.abits
        for pattern, o in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                wbits = o.wbits if o.wbits is not None else wbits
                abits = o.abits if o.abits is not None else abits
        return wbits, abits

    def output_bits_for(self, name: str, *, layer_reads: bool) -> int:
        """Bits of the deploy protocol's output site ``name``: an override's; else ``abits`` where a Conv2d/Linear
        reads it (``layer_reads``), else ``output_bits``."""
        overridden = any(fnmatch.fnmatchcase(name, p) and o.abits is not None for p, o in self.overrides.items())
        return self.bits_for(name)[1] if overridden or layer_reads else self.output_bits


def quantize_model(model: nn.Module, config: QuantConfig, *, inplace: bool = False) -> nn.Module:
    """Return a fake-quantized copy of ``model`` (a float classifier) under ``config``.

    Activation quantizers start in OBSERVE mode; calibrate them on (synthetic)
    data, then freeze with :func:`set_act_mode`. The input model is left untouched
    unless ``inplace``.

    Raises:
        UnsupportedLayerError: listing every layer that cannot be quantized, by name; or, with
            ``ends_bits`` or the deploy protocol, a model that torch.fx cannot trace.

    Example:
        >>> from dfq.models import create_model
        >>> q = quantize_model(create_model("resnet20a_cifar10"), QuantConfig(wbits=4, abits=4))
        >>> type(q.conv1).__name__, type(q.layer1[0].relu1).__name__
        ('QuantConv2d', 'QuantActivation')
    """
    info = getattr(model, "dfq_info", None)
    config = config.resolved()
    model = model if inplace else copy.deepcopy(model)
    model = unfuse_norm_act(model)
    if config.protocol == "deploy":
        trace(model, "the deploy protocol")  # refuse an untraceable model before the papers' fallback warns
    model = split_activation_sites(model)
    check_supported(model)
    if config.ends_bits is not None:
        ends = end_overrides(model, config.ends_bits)
        config = replace(config, ends_bits=None, overrides=_under(ends, config.overrides))
    for name, module in list(model.named_modules()):
        replacement = _quantized_version(name, module, config)
        if replacement is not None:
            set_submodule(model, name, replacement)
    if config.protocol == "deploy":
        model = add_deploy_sites(model, config)
    if info is not None:
        model.dfq_info = info  # type: ignore[assignment]
    return model


def end_overrides(model: nn.Module, bits: int) -> dict[str, LayerOverride]:
    """Overrides that keep the model's ends at ``bits``: the first and the last Conv2d/Linear in execution order
    (weights; the last one's input site too, under the deploy protocol), the first activation site in execution
    order and the site the last layer reads."""
    graph = trace(model, "quant.ends_bits")
    modules = dict(model.named_modules())
    calls = [n for n in graph.nodes if n.op == "call_module"]
    layers = [n for n in calls if isinstance(modules[str(n.target)], nn.Conv2d | nn.Linear)]
    sites = [n for n in calls if isinstance(modules[str(n.target)], ACTIVATIONS)]
    if not layers:
        return {}
    first, last = str(layers[0].target), str(layers[-1].target)
    out = {first: LayerOverride(wbits=bits), last: LayerOverride(wbits=bits, abits=bits)}
    if sites:
        out[str(sites[0].target)] = LayerOverride(abits=bits)
    read = _site_read_by(layers[-1], modules)
    if read is not None:
        out[read] = LayerOverride(abits=bits)
    return out


def _under(base: dict[str, LayerOverride], overrides: dict[str, LayerOverride]) -> dict[str, LayerOverride]:
    """``base`` as the first patterns, so that every one of ``overrides`` still wins where it matches; a pattern in
    both keeps its place among ``overrides`` and takes from ``base`` only the bit-widths it leaves unset."""
    merged = {k: v for k, v in base.items() if k not in overrides}
    for k, o in overrides.items():
        b = base.get(k, LayerOverride())
        merged[k] = LayerOverride(wbits=b.wbits if o.wbits is None else o.wbits,
                                  abits=b.abits if o.abits is None else o.abits)  # fmt: skip
    return merged


def _site_read_by(layer: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The activation module whose output reaches ``layer`` through weight-free operations of one data input
    (pooling, flattening, ``x.view(x.size(0), -1)``)."""
    node = layer.args[0] if layer.args else next(iter(layer.kwargs.values()), None)
    while isinstance(node, fx.Node) and node.op in ("call_module", "call_function", "call_method"):
        m = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(m, ACTIVATIONS):
            return str(node.target)
        inputs = [n for n in node.all_input_nodes if not is_shape(n)]
        if isinstance(m, nn.Conv2d | nn.Linear) or len(inputs) != 1:
            return None
        node = inputs[0]
    return None


def _quantized_version(name: str, module: nn.Module, config: QuantConfig) -> nn.Module | None:
    wbits, abits = config.bits_for(name)
    deploy = config.protocol == "deploy"
    if isinstance(module, nn.Conv2d | nn.Linear) and not isinstance(module, QuantConv2d | QuantLinear):
        spec = QuantSpec(wbits, config.weight_symmetric, Granularity(config.weight_granularity), deploy=deploy)
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        return cls.from_float(module, _weight_quantizer(spec, module.weight, config.weight_scales == "stored"))
    if isinstance(module, ACTIVATIONS):
        spec = QuantSpec(abits, config.act_symmetric, Granularity.PER_TENSOR, deploy=deploy)
        return QuantActivation.from_float(module, ActQuantizer(spec, config.act_observer, config.act_momentum))
    return None


def _weight_quantizer(spec: QuantSpec, weight: torch.Tensor, stored: bool) -> WeightQuantizer:
    if not stored or spec.is_noop:
        return WeightQuantizer(spec)
    per_channel = spec.granularity is Granularity.PER_CHANNEL
    shape = (weight.shape[0],) + (1,) * (weight.dim() - 1) if per_channel else ()
    wq = WeightQuantizer(spec, stored_shape=shape)
    wq.store(weight)
    return wq


def weight_quantizers(model: nn.Module) -> Iterator[tuple[nn.Module, WeightQuantizer]]:
    """(layer, quantizer) for every layer of ``model`` whose weights are quantized (not a no-op)."""
    for m in model.modules():
        wq = getattr(m, "weight_quantizer", None)
        if isinstance(wq, WeightQuantizer) and not wq.spec.is_noop:
            yield m, wq


def act_quantizers(model: nn.Module) -> Iterator[tuple[str, ActQuantizer]]:
    """(name, quantizer) for every activation quantizer in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, ActQuantizer):
            yield name, m


def set_act_mode(model: nn.Module, mode: ActMode | str) -> None:
    """Put every activation quantizer in ``mode`` ("observe", "frozen" or "disabled")."""
    mode = ActMode[mode.upper()] if isinstance(mode, str) else mode
    for _, q in act_quantizers(model):
        q.set_mode(mode)


@contextlib.contextmanager
def quant_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with activation and weight quantization off (restores the modes on exit)."""
    saved = [(q, q.get_mode()) for _, q in act_quantizers(model)]
    weight_qs = [m for m in model.modules() if isinstance(m, WeightQuantizer)]
    specs = [q.spec for q in weight_qs]
    try:
        set_act_mode(model, ActMode.DISABLED)
        for q in weight_qs:
            q.spec = QuantSpec(32)
        yield model
    finally:
        for q, mode in saved:
            q.set_mode(mode)
        for q, spec in zip(weight_qs, specs, strict=True):
            q.spec = spec


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Observe activation ranges on ``batches`` (model in eval mode), then freeze them.

    Raises:
        DFQError: a range became NaN/Inf (the calibration inputs were not finite), naming the first such site.
    """
    was_training = model.training
    model.eval()
    set_act_mode(model, ActMode.OBSERVE)
    for x in batches:
        model(x)
    set_act_mode(model, ActMode.FROZEN)
    model.train(was_training)
    for name, q in act_quantizers(model):
        if not bool(torch.isfinite(q.lo).all() and torch.isfinite(q.hi).all()):
            raise DFQError(f"calibration gave a non-finite range at {name}: the calibration inputs held NaN/Inf")
