"""What a bit allocation chooses: the quantized tensors of Q, grouped by the override key that sets their bits,
and what each costs (weight storage, bit-operations).

A *choice* is one key of :class:`dfq.quant.QuantConfig`'s ``overrides`` and one kind: the weights of a
Conv2d/Linear (``wbits`` of the layer's name), or the activation grids that the same ``abits`` sets (an activation
site, a deploy output site on a BatchNorm or layer, a layer's own input site). The model input keeps
``quant.input_bits`` (images are 8-bit data) and is not a choice.

Costs follow HAWQ-V3 (Yao et al., ICML 2021) and Bayesian Bits (van Baalen et al., NeurIPS 2020): the size is
the bits of the weight codes; the bit-operations (BOPs) of a layer are its multiply-accumulates times its weight
bits times the bits of the input it reads. Element-wise operations (additions, activations) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dfq.errors import DFQError
from dfq.quant import ActQuantizer, QuantConv2d, QuantLinear, quant_disabled
from dfq.quant.graph import producer_chain, trace

__all__ = ["Choice", "ModelTensors", "bits_of", "cost_summary", "model_tensors"]


@dataclass(frozen=True)
class Choice:
    """One bit-width to choose.

    Attributes:
        key: the override key (a module's qualified name).
        kind: "w" (weight bits of the layer ``key``) or "a" (the activation bits ``key`` sets).
        params: weights the choice stores (0 for activations).
        pointwise: a 1x1 convolution (not grouped) or a linear layer (weights only).
    """

    key: str
    kind: str
    params: int = 0
    pointwise: bool = False

    @property
    def name(self) -> str:
        return f"{self.key}:{self.kind}"


@dataclass(frozen=True)
class Layer:
    """A Conv2d/Linear's bit-operations: ``macs * w * a`` with ``w`` its weight bits and ``a`` the bits of
    its input, the choice ``reads`` (an activation choice's name) or the fixed ``input_bits``."""

    key: str
    macs: int
    reads: str | None
    input_bits: int


@dataclass
class ModelTensors:
    """The choices of one quantized model and its layers' costs."""

    choices: list[Choice]
    layers: list[Layer]
    quantizers: dict[str, list[ActQuantizer]] = field(default_factory=dict)  # activation choice -> its grids

    def by_name(self) -> dict[str, Choice]:
        return {c.name: c for c in self.choices}

    def weight_bits(self, bits: dict[str, int]) -> int:
        """Bits of all weight codes under ``bits`` (choice name -> bit-width)."""
        return sum(c.params * bits[c.name] for c in self.choices if c.kind == "w")

    def bops(self, bits: dict[str, int]) -> int:
        """Bit-operations of one forward pass of one input under ``bits``."""
        return sum(lay.macs * bits[f"{lay.key}:w"] * self.input_bits_of(lay, bits) for lay in self.layers)

    def input_bits_of(self, layer: Layer, bits: dict[str, int]) -> int:
        return layer.input_bits if layer.reads is None else bits[layer.reads]

    def uniform(self, wbits: int, abits: int) -> dict[str, int]:
        """Every weight at ``wbits``, every activation choice at ``abits``."""
        return {c.name: wbits if c.kind == "w" else abits for c in self.choices}

    @property
    def params(self) -> int:
        return sum(c.params for c in self.choices)


@torch.no_grad()
def model_tensors(q: nn.Module, example: torch.Tensor) -> ModelTensors:
    """The choices of ``q`` (a deploy-protocol Q from :func:`dfq.quant.quantize_model`) and its layers' costs,
    from its modules and one forward pass of ``example`` (one input)."""
    modules = dict(q.named_modules())
    owner: dict[int, str] = {}  # id(ActQuantizer) -> the key whose abits set it
    quantizers: dict[str, list[ActQuantizer]] = {}
    image_sites = _image_sites(q, modules)
    for name, m in modules.items():
        for attr in ("act_quantizer", "output_quantizer", "input_quantizer"):
            aq = getattr(m, attr, None)
            if isinstance(aq, ActQuantizer) and id(aq) not in image_sites and not aq.spec.is_noop:
                owner[id(aq)] = name
                quantizers.setdefault(f"{name}:a", []).append(aq)
    for name, m in modules.items():  # a site of its own (after an addition), not any module's attribute
        if isinstance(m, ActQuantizer) and id(m) not in owner and id(m) not in image_sites and not m.spec.is_noop:
            owner[id(m)] = name
            quantizers[f"{name}:a"] = [m]
    macs = _macs(q, example)
    choices, layers = [], []
    for name, m in modules.items():
        if name not in macs:  # never run in evaluation (GoogLeNet's auxiliary classifiers): not shipped
            continue
        if isinstance(m, QuantConv2d | QuantLinear) and not m.weight_quantizer.spec.is_noop:
            pointwise = isinstance(m, QuantLinear) or (m.kernel_size == (1, 1) and m.groups == 1)
            choices.append(Choice(name, "w", m.weight.numel(), pointwise))
            site = m.input_site
            if site is None:
                raise DFQError(f"mixed precision needs the deploy protocol: layer {name} reads a float input")
            reads = f"{owner[id(site)]}:a" if id(site) in owner else None
            layers.append(Layer(name, macs[name], reads, site.spec.bits))
    choices += [Choice(key.rsplit(":", 1)[0], "a") for key in quantizers]
    return ModelTensors(choices, layers, quantizers)


def _image_sites(q: nn.Module, modules: dict[str, nn.Module]) -> set[int]:
    """ids of the input quantizers that read the model input (kept at ``input_bits``)."""
    out = set()
    for node in trace(q, "mixed precision").nodes:
        m = modules.get(str(node.target)) if node.op == "call_module" else None
        reads_input = isinstance(m, QuantConv2d | QuantLinear) and m.input_quantizer is not None
        if reads_input and producer_chain(node.args[0], modules).op == "placeholder":
            out.add(id(m.input_quantizer))
    return out


def _macs(q: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of every Conv2d/Linear for one input."""
    out: dict[str, int] = {}

    def hook(name: str):
        def record(m: nn.Module, args: tuple, y: torch.Tensor) -> None:
            per_output = m.weight[0].numel()  # in_channels / groups * kernel area, or in_features
            out[name] = int(y[:1].numel() * per_output)

        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in q.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = q.training
    try:
        with quant_disabled(q):
            q.eval()(example[:1])
    finally:
        q.train(was_training)
        for h in hooks:
            h.remove()
    return out


def bits_of(q: nn.Module, tensors: ModelTensors) -> dict[str, int]:
    """The bits ``q`` quantizes each choice with."""
    out = {}
    for c in tensors.choices:
        if c.kind == "w":
            out[c.name] = q.get_submodule(c.key).weight_quantizer.spec.bits
        else:
            out[c.name] = tensors.quantizers[c.name][0].spec.bits
    return out


def cost_summary(q: nn.Module, input_size: tuple[int, ...]) -> dict[str, float]:
    """Size of the weight codes (bytes), average weight bits and bit-operations of one input of ``q``."""
    device = next((p.device for p in q.parameters()), torch.device("cpu"))
    tensors = model_tensors(q, torch.zeros(1, *input_size, device=device))
    bits = bits_of(q, tensors)
    size = tensors.weight_bits(bits)
    return {"weight_bytes": size / 8, "avg_wbits": round(size / max(tensors.params, 1), 4), "bops": tensors.bops(bits)}
