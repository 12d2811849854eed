"""``recon``: synthesize a small image pool from P, then reconstruct Q block by block.

dfq's own post-training method, in the line of Genie (Jeon et al., CVPR 2023) and
BRECQ/QDrop, built for a small compute budget:

1. **Synthesis.** A pool of images optimised against P's BatchNorm-statistics loss
   (:func:`dfq.generators.synthesize_pool`: per-sample latents and a small decoder carried
   from batch to batch, "swing" convolutions, optional low-pass filter).
2. **Initial grids.** Under the deploy protocol the pool is first clipped to the valid input range, which Q's fixed
   input grid keeps, so that P and Q see the same images. Activation ranges are calibrated on the pool, then every step
   (weights per channel, activations per tensor) is set to the one that minimises its
   own quantization error (a grid search on the clipping factor).
3. **Reconstruction.** The model is cut into units along its dataflow (each residual
   block, and the layers between blocks). For each unit in order, Q's unit is fitted to
   P's unit output, on inputs that come from the already-quantized units: weights with
   learned rounding (AdaRound) and learned steps (LSQ), activations with learned steps,
   quantization dropped at random per element (QDrop). The rounding is then fixed and
   written into the weights, so the result is an ordinary Q with stored grids. With
   ``rounding_init="gptq"`` the learned rounding starts at GPTQ's (:mod:`dfq.methods.gptq`)
   instead of at the float weights.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module
from tqdm.auto import tqdm

from dfq.errors import DFQError, UnsupportedLayerError
from dfq.generators import synthesize_pool
from dfq.methods.base import Method, MethodContext, register_method
from dfq.methods.gptq import GPTQConfig, gptq_round
from dfq.quant import (
    ActMode,
    ActQuantizer,
    QuantConfig,
    WeightQuantizer,
    quant_disabled,
    quantize_model,
    weight_quantizers,
)
from dfq.quant.clip import init_grids
from dfq.quant.functional import bernoulli_mask
from dfq.quant.graph import is_add, owner_of, trace
from dfq.quant.learning import BetaSchedule, QuantizerLearning, cosine_anneal
from dfq.utils.buffers import pool_tensor

__all__ = ["Recon", "ReconConfig", "reconstruct"]


ROUNDING_INITS = ("nearest", "gptq")


@dataclass
class ReconConfig:
    """Attributes:
    num_samples: size of the synthetic pool.
    synth_batch: images optimised together.
    synth_steps: Adam steps per synthesis batch.
    synth_lr: Adam learning rate of the latents and the decoder.
    swing: shift the input of P's strided convolutions by a random pixel during synthesis.
    lowpass: cut-off of the Gaussian low-pass filter on the pool, as a fraction of the
        Nyquist frequency (0: off).
    label_weight: weight of P's cross-entropy to a label assigned to each image (classes in
        turn, so the pool is class-balanced), added to the BNS loss (0: BNS only, as Genie).
    bns_normalized: match each BatchNorm's statistics in units of its running standard deviation, so that every
        layer weighs the same whatever the scale of its values (False: in the layer's own units, as Genie and ZeroQ,
        where one layer can outweigh all others, such as the stem of a model fed raw pixels).
    warm_decoder: start every synthesis batch after the first from the decoder the previous batch ended with
        (fresh latents), so later batches reach a lower BNS loss in the same steps (False: a new random decoder for
        every batch, the former default).
    iters: reconstruction steps per unit.
    batch_size: images per reconstruction step.
    lr_round, lr_wstep, lr_astep: Adam learning rates of the rounding variables, the weight
        steps and the activation steps.
    lr_bn: Adam learning rate of the unit's BatchNorm scales and shifts, which then absorb the
        mean and scale errors of quantization (0: BatchNorm fixed, as Genie).
    rounding_init: where AdaRound starts: "nearest" (at the float weights, AdaRound's own start) or "gptq" (at the
        rounding :mod:`dfq.methods.gptq` gives each layer on the pool, once the grids are set: each weight then
        chooses between the two grid points around GPTQ's compensated value).
    round_weight: weight of AdaRound's rounding regulariser.
    round_warmup: fraction of the steps before the regulariser starts.
    beta: the regulariser's exponent, annealed from the first to the second value.
    drop_prob: probability of keeping an activation in float during reconstruction (QDrop).
    spill_mb: the pool and the activations kept for it at a unit boundary go to memory-mapped temporary files
        (under ``TMPDIR``) when one of them is larger than this, so the memory a run needs does not grow with
        ``num_samples`` (0: always; the files are deleted as soon as they are mapped).
    """

    num_samples: int = 1024
    synth_batch: int = 128
    synth_steps: int = 150
    synth_lr: float = 0.05
    swing: bool = True
    lowpass: float = 0.0
    label_weight: float = 0.0
    bns_normalized: bool = False
    warm_decoder: bool = True
    iters: int = 1000
    batch_size: int = 32
    lr_round: float = 1e-2
    lr_wstep: float = 1e-5
    lr_astep: float = 4e-5
    lr_bn: float = 0.0
    rounding_init: str = "nearest"
    round_weight: float = 0.01
    round_warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    drop_prob: float = 0.5
    spill_mb: float = 128.0

    def __post_init__(self) -> None:
        for key in ("num_samples", "synth_batch", "synth_steps", "iters", "batch_size"):
            if getattr(self, key) < 1:
                raise DFQError(f"recon.{key} must be >= 1, got {getattr(self, key)}")
        if not self.label_weight >= 0:
            raise DFQError(f"recon.label_weight must be >= 0, got {self.label_weight}")
        if not 0 <= self.drop_prob <= 1 or not 0 <= self.round_warmup < 1 or not 0 <= self.lowpass <= 1:
            raise DFQError("recon.drop_prob and recon.lowpass must be in [0, 1], recon.round_warmup in [0, 1)")
        if self.rounding_init not in ROUNDING_INITS:
            raise DFQError(
                f"recon.rounding_init must be one of {', '.join(ROUNDING_INITS)}, got {self.rounding_init!r}"
            )
        if not self.spill_mb >= 0:
            raise DFQError(f"recon.spill_mb must be >= 0, got {self.spill_mb}")
        self.beta = tuple(float(b) for b in self.beta)  # type: ignore[assignment]

    @property
    def spill_bytes(self) -> int:
        return int(self.spill_mb * 2**20)


# -- 2. initial grids: dfq.quant.clip.init_grids ----------------------------------------------
# -- 3. block reconstruction -------------------------------------------------------------------


def units(q: nn.Module) -> list[nn.Module]:
    """Q cut into a chain of callables along its dataflow, each taking the previous one's single output.

    Residual networks are cut at their blocks (each module holding an addition, and the layers between them),
    BRECQ's granularity. Where that does not give a chain of several units (plain chains such as VGG,
    concatenations, additions across module boundaries), the cut points are where exactly one tensor is live in
    the dataflow, and consecutive pieces are merged while a unit holds at most one weighted layer.
    """
    for partition in (_block_partition, _live_partition):
        graph = trace(q, "the recon method")
        part = partition(q, graph)
        chain = _split(q, graph, part)
        if chain is not None and len(chain) > 1:
            return chain
    raise UnsupportedLayerError("the recon method could not cut the model into a chain of units")


def _block_partition(q: nn.Module, graph: fx.Graph) -> dict[fx.Node, int]:
    blocks = {owner_of(n) for n in graph.nodes if is_add(n)}
    part: dict[fx.Node, int] = {}
    current, previous = -1, None
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        path = owner_of(node)
        key = next((b for b in blocks if b and (path == b or path.startswith(b + "."))), "")
        if key != previous:
            current, previous = current + 1, key
        part[node] = current
    return part


def _live_partition(q: nn.Module, graph: fx.Graph) -> dict[fx.Node, int]:
    """Cut after every node that leaves exactly one tensor live (itself), then merge the pieces greedily while a
    unit holds at most one Conv2d/Linear; a piece that cannot be cut (a block with a join) stands alone."""
    nodes, ends = _single_live_points(graph)
    modules = dict(q.named_modules())
    part: dict[fx.Node, int] = {}
    current, weights, start = -1, 2, 0
    for end in [*ends, len(nodes) - 1] if not ends or ends[-1] != len(nodes) - 1 else ends:
        piece = nodes[start : end + 1]
        start = end + 1
        w = sum(1 for n in piece if n.op == "call_module" and isinstance(modules.get(str(n.target)), _WEIGHTED))
        if weights + w > 1:
            current, weights = current + 1, 0
        weights += w
        part.update(dict.fromkeys(piece, current))
    for n in graph.nodes:
        if n.op == "get_attr":
            part[n] = part[next(iter(n.users))] if n.users else 0
    return part


_WEIGHTED = (nn.Conv2d, nn.Linear)


def _is_container(n: fx.Node) -> bool:
    """A node whose every reader indexes it (``chunk``/``split`` results): a tuple, not a tensor to cut at."""
    return bool(n.users) and all(u.op == "call_function" and u.target is operator.getitem for u in n.users)


def _single_live_points(graph: fx.Graph) -> tuple[list[fx.Node], list[int]]:
    """The computing nodes in order, and the positions after which only that node's output is still needed."""
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    index = {n: i for i, n in enumerate(nodes)}

    def last_use(n: fx.Node) -> int:
        return max((index.get(u, len(nodes)) for u in n.users), default=-1)

    expiring: dict[int, int] = {}
    live = 0
    for n in graph.nodes:
        if n.op == "placeholder" and last_use(n) >= 0:
            live += 1
            expiring[last_use(n)] = expiring.get(last_use(n), 0) + 1
    ends = []
    for i, n in enumerate(nodes):
        used_until = last_use(n)
        if used_until > i:
            live += 1
            expiring[used_until] = expiring.get(used_until, 0) + 1
        live -= expiring.pop(i, 0)
        if live == 1 and used_until > i and not _is_container(n):
            ends.append(i)
    return nodes, ends


def _split(q: nn.Module, graph: fx.Graph, part: dict[fx.Node, int]) -> list[nn.Module] | None:
    """The units of ``part`` if each takes exactly the previous one's single output, else ``None``."""
    split = split_module(fx.GraphModule(q, graph), q, lambda n: part[n])
    n = max(part.values(), default=-1) + 1
    chain = [getattr(split, f"submod_{i}") for i in range(n) if hasattr(split, f"submod_{i}")]
    calls = [node for node in split.graph.nodes if node.op == "call_module"]
    previous = next(node for node in split.graph.nodes if node.op == "placeholder")
    for node in calls:
        if list(node.args) != [previous] or node.kwargs:
            return None
        previous = node
    return chain if len(calls) == len(chain) else None


def _quantizers(unit: nn.Module) -> tuple[list[tuple[nn.Module, WeightQuantizer]], list[ActQuantizer]]:
    weights = list(weight_quantizers(unit))
    acts = [m for m in unit.modules() if isinstance(m, ActQuantizer) and m.get_mode() is ActMode.FROZEN
            and not m.spec.is_noop]  # fmt: skip
    return weights, acts


def reconstruct_unit(
    unit: nn.Module, x_q: torch.Tensor, x_fp: torch.Tensor, y_fp: torch.Tensor, config: ReconConfig,
    generator: torch.Generator, starts: dict[nn.Module, torch.Tensor] | None = None,
) -> float:  # fmt: skip
    """Fit one unit of Q to P's outputs, the learned rounding of a layer in ``starts`` starting there; returns the
    final reconstruction loss."""
    weights, acts = _quantizers(unit)
    if not weights and not acts:
        return 0.0
    learning = QuantizerLearning(weights, acts)
    learned = learning.begin(rounding=True, starts=starts)
    bns = [m for m in unit.modules() if isinstance(m, nn.BatchNorm2d)] if config.lr_bn else []
    params_bn = [p for m in bns for p in m.parameters(recurse=False)]  # not an output site's learned step
    for p in params_bn:
        p.requires_grad_(True)
    for aq in acts:
        aq.drop_prob = config.drop_prob
        aq.train()
    kinds = ((learned.rounding, config.lr_round), (learned.weight_steps, config.lr_wstep),
             (learned.act_steps, config.lr_astep), (params_bn, config.lr_bn))  # fmt: skip
    opt = torch.optim.Adam([{"params": ps, "lr": lr} for ps, lr in kinds if ps])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.iters)
    beta = BetaSchedule(config.beta, config.iters, cosine_anneal, warmup=int(config.round_warmup * config.iters))
    loss = torch.zeros(())
    for it in range(config.iters):
        idx = torch.randint(0, len(x_q), (config.batch_size,), generator=generator)
        xin = x_q[idx]
        if config.drop_prob:
            keep_fp = bernoulli_mask(xin.shape, config.drop_prob, generator)
            xin = torch.where(keep_fp, x_fp[idx], xin)
        out = unit(xin)
        loss = (out - y_fp[idx]).pow(2).sum(1).mean()
        total = loss
        if beta.started(it) and weights:
            total = loss + config.round_weight * learning.rounding_loss(beta(it))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
    learning.end()
    for aq in acts:
        aq.drop_prob = 0.0
        aq.eval()
    for p in params_bn:
        p.requires_grad_(False)
    return float(loss.detach())


_FORWARD_PIXELS = 256 * 32 * 32  # images x pixels per forward over the pool: 256 CIFAR images, 5 at 224 px


@torch.no_grad()
def _run(unit: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, spill_bytes: int) -> torch.Tensor:
    """``unit`` over the whole pool ``x``, in pieces whose working set does not grow with the input size."""
    size = max(1, _FORWARD_PIXELS // math.prod(x.shape[2:]))
    out = None
    for start in range(0, len(x), size):
        y = unit(x[start : start + size])
        if out is None:
            out = pool_tensor((len(x), *y.shape[1:]), spill_bytes=spill_bytes)
        out[start : start + len(y)] = y
    assert out is not None
    return out


@register_method
class Recon(Method):
    name = "recon"
    config_cls = ReconConfig
    description = "dfq's default: a synthesized pool, then block-wise reconstruction (AdaRound, LSQ, QDrop)"
    stored_grids = "learns weight grids"
    learns_rounding = True

    def quantize(self, teacher: nn.Module, quant: QuantConfig, ctx: MethodContext) -> tuple[nn.Module, dict[str, Any]]:
        c = self.config
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # layer construction draws from the global stream; keep it as it was
            units(quantize_model(teacher, quant))  # an unsupported layer or graph is refused before the synthesis
        pool = synthesize_pool(
            teacher, ctx.input_size, c.num_samples, batch=c.synth_batch, steps=c.synth_steps, lr=c.synth_lr,
            swing=c.swing, lowpass=c.lowpass, label_weight=c.label_weight, normalized=c.bns_normalized,
            warm_decoder=c.warm_decoder, generator=ctx.generator, input_stats=ctx.input_stats, progress=ctx.progress,
            spill_bytes=c.spill_bytes,
        )  # fmt: skip
        synthesized = time.perf_counter()
        q = reconstruct(teacher, quant, c, pool, generator=ctx.generator, progress=ctx.progress)
        done = time.perf_counter()
        return q, {"seconds": round(done - start, 3), "synthesize_s": round(synthesized - start, 3),
                   "reconstruct_s": round(done - synthesized, 3)}  # fmt: skip


def reconstruct(
    teacher: nn.Module,
    quant: QuantConfig,
    config: ReconConfig,
    pool: torch.Tensor,
    *,
    generator: torch.Generator,
    progress: bool = True,
) -> nn.Module:
    """Q fitted to P unit by unit on ``pool`` (steps 2 and 3 of the module docstring)."""
    q = quantize_model(teacher, quant).eval()
    for p in q.parameters():
        p.requires_grad_(False)
    if quant.input_range is not None:  # Q's fixed input grid clips synthetic pixels outside the valid range (4.6%
        # of a ResNet-20 pool, 5x the range on EfficientNet-Lite0): P's targets must be computed on the same images
        low, high = quant.input_range
        pool = _run(lambda b: b.clamp(low, high), pool, config.spill_bytes)
    init_grids(q, pool, config.synth_batch)
    starts = _gptq_starts(q, pool, config, progress) if config.rounding_init == "gptq" else {}
    chain = units(q)
    x_q = x_fp = pool
    with tqdm(chain, desc="recon: reconstruct", disable=not progress) as bar:
        for unit in bar:
            with quant_disabled(q):
                y_fp = _run(unit, x_fp, config.spill_bytes)
            loss = reconstruct_unit(unit, x_q, x_fp, y_fp, config, generator, starts)
            if not math.isfinite(loss):  # never return a Q with NaN grids as a success
                raise DFQError(f"recon: the reconstruction of unit {bar.n} diverged (loss {loss}); lower "
                               "method.lr_round, method.lr_wstep and method.lr_astep")  # fmt: skip
            bar.set_postfix(loss=f"{loss:.4g}")
            x_fp = y_fp  # P's previous boundary is no longer needed: three pool-sized tensors at most
            x_q = _run(unit, x_q, config.spill_bytes)
    for p in q.parameters():
        p.requires_grad_(True)
    return q.eval()


def _gptq_starts(
    q: nn.Module, pool: torch.Tensor, config: ReconConfig, progress: bool
) -> dict[nn.Module, torch.Tensor]:
    """GPTQ's compensated weights of every layer of ``q`` on ``pool``; ``q``'s weights are P's again afterwards (the
    reconstruction's targets come from them)."""
    floats = {layer: layer.weight.detach().clone() for layer, _ in weight_quantizers(q)}
    starts = gptq_round(q, pool, GPTQConfig(synth_batch=config.synth_batch), progress=progress)
    with torch.no_grad():
        for layer, w in floats.items():
            layer.weight.copy_(w)
    return starts
