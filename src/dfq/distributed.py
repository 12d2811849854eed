"""Data-parallel runs of the generator-based methods on torch.distributed (launched with ``torchrun``).

One process (rank) per device; the engine stays one loop and asks a :class:`DistContext` for
the few things that change when the global batch is split over ranks:

- **Sampling.** The global batch of B images is ``S = train.shards`` equal shards, shard ``k``
  drawn from its own noise stream (:func:`shard_seed`); rank ``r`` of ``W`` draws shards
  ``r·S/W … (r+1)·S/W − 1``. One process with ``S`` shards therefore draws exactly the images
  of ``S`` processes, and a run resumes on any number of processes that divides ``S``.
- **Gradients.** G and Q are wrapped in ``DistributedDataParallel``, which averages gradients
  over ranks. A loss that is a mean over the local shard, averaged over equal shards, is the
  global mean. A loss computed from *global* quantities on every rank (below) gets the right
  gradient with no rescaling: the backward of a sum all-reduce is a sum all-reduce, so each
  rank's share arrives ``W`` times and DDP's average divides by ``W``.
- **Batch statistics** the papers take over the batch are taken over the global batch:
  P's BNS statistics and the BatchNorms of G (and of Q where it trains them, ZAQ) combine the
  per-rank moments exactly (:func:`global_moments`); the method losses see the logits and
  labels of the whole batch (:meth:`DistContext.gather`), so AdaSG/AdaDFQ's entropy is
  normalised by the global batch minimum; observed activation ranges are the global min/max.

With one process every helper is the identity, so single-process runs are unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dfq.errors import DFQError
from dfq.generators import BNStatsLoss

__all__ = [
    "DistContext",
    "GlobalBNStatsLoss",
    "bns_loss",
    "check_shards",
    "global_moments",
    "local_batchnorms",
    "process_group",
    "resolve_device",
    "shard_seed",
    "sync_batchnorms",
    "with_shards",
]

# Rank 0 alone evaluates on real data while the others wait in the next collective.
_TIMEOUT = datetime.timedelta(hours=1)
_CPU = torch.device("cpu")
# DDP's switch for per-forward buffer broadcasts (renamed in PyTorch 2.13).
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is again a sum over ranks (every rank's loss depends on every share)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a data-parallel run: its rank, the number of ranks, its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = _CPU

    @classmethod
    def current(cls, device: str | torch.device | None = None) -> DistContext:
        """The context of the initialised default process group (one process if there is none)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(device=resolve_device(device))
        if device is None:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        return cls(dist.get_rank(), dist.get_world_size(), resolve_device(device))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and the progress bar, and evaluates."""
        return self.rank == 0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` (same shape everywhere) along dim 0, in rank order.

        Differentiable: the gradient reaching this rank's slice is the sum of every rank's
        gradient for it. Built on a sum all-reduce, which every backend has, with gradients.
        """
        if not self.active:
            return tensor
        slots = [tensor if r == self.rank else torch.zeros_like(tensor) for r in range(self.world_size)]
        return _AllReduceSum.apply(torch.stack(slots)).flatten(0, 1)

    @torch.no_grad()
    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average over ranks (logged values: a mean of per-shard means is the global mean)."""
        if not self.active:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out)
        return out / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one (so every rank takes the same branch)."""
        return bool(self.max_int(int(flag)))

    def max_int(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    @torch.no_grad()
    def global_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The min and max over ranks (an activation quantizer's observed range of the global batch)."""
        if not self.active:
            return lo, hi
        both = torch.stack([-lo, hi])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return -both[0], both[1]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel (itself with one process).

        Buffers are not broadcast: every buffer (BatchNorm statistics, activation ranges) is
        already computed from the global batch, identically on every rank.
        """
        if not self.active:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, **_NO_BUFFER_SYNC)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` or ``None``: CUDA when available, else CPU; a bare ``cuda`` gets this process's local GPU."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DFQError("--device cuda: no CUDA device is available (this PyTorch build or machine has none)")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


@contextlib.contextmanager
def process_group(device: str | torch.device | None = None) -> Iterator[DistContext]:
    """Join the process group that ``torchrun`` describes in the environment (nccl on GPUs, gloo on CPUs)
    for the duration of the block; without ``WORLD_SIZE`` > 1 there, one process and nothing to join."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield DistContext.current(device)
        return
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", timeout=_TIMEOUT, device_id=dev)
    else:
        dist.init_process_group("gloo", timeout=_TIMEOUT)
    try:
        yield DistContext.current(dev)
    finally:
        dist.destroy_process_group()


def shard_seed(seed: int, shard: int) -> int:
    """Seed of shard ``shard``'s noise stream; shard 0 uses the run's seed (one shard: the single-stream run)."""
    if shard == 0:
        return seed
    digest = hashlib.sha256(f"dfq-shard:{seed}:{shard}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative 63-bit seed


def check_shards(batch_size: int, shards: int, world_size: int) -> None:
    """The global batch must split into equal shards, and the shards evenly over the ranks."""
    if batch_size % shards:
        raise DFQError(f"train.batch_size ({batch_size}) must be a multiple of train.shards ({shards})")
    if shards % world_size:
        raise DFQError(
            f"this run draws its batch from train.shards = {shards} noise streams; run it on a number of "
            f"processes that divides {shards} (got {world_size}), or start a new run with --shards"
        )


def with_shards(config: Any, world_size: int) -> Any:
    """``config`` with ``train.shards`` fixed (``None``: one shard per process of this launch)."""
    if config.train.shards is not None:
        return config
    return dataclasses.replace(config, train=dataclasses.replace(config.train, shards=world_size))


# ------------------------------------------------------------------------------------- batch statistics
def global_moments(mean: torch.Tensor, var: torch.Tensor, ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of the global batch from each rank's (over equal shards), differentiable.

    ``var = mean_r(var_r) + mean_r((mean_r − mean)²)``: exact, and free of the cancellation of
    ``E[x²] − E[x]²``. One collective for any number of channels (or layers, concatenated).
    """
    if not ctx.active:
        return mean, var
    stats = ctx.gather(torch.stack([mean, var])).view(ctx.world_size, 2, *mean.shape)
    means, variances = stats.unbind(1)
    g_mean = means.mean(0)
    return g_mean, (variances + (means - g_mean) ** 2).mean(0)


class _GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training-mode statistics are the global batch's (the papers' single-batch BN).

    Not built directly: :func:`sync_batchnorms` re-classes existing BatchNorms (keeping their
    parameters, buffers, hooks and any subclass behaviour), so optimizers and state dicts are unchanged.
    """

    _dist: DistContext
    _local_class: type = nn.BatchNorm2d  # the class sync_batchnorms found

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and self._dist.active):
            return super().forward(x)
        self._check_input_dim(x)
        xf = x.float()
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        mean, var = global_moments(mean, var, self._dist)
        self._update_running_stats(mean.detach(), var.detach(), xf.numel() // xf.shape[1] * self._dist.world_size)
        y = (xf - mean[:, None, None]) * torch.rsqrt(var + self.eps)[:, None, None]
        if self.affine:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """As ``nn.BatchNorm2d`` does: the running variance is the unbiased one over the global batch."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(var * count / max(count - 1, 1), factor)


def sync_batchnorms(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Make every BatchNorm2d of ``model`` use global-batch statistics in training mode (in place).

    A no-op with one process. :func:`local_batchnorms` undoes it.
    """
    if not ctx.active:
        return model
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and not isinstance(m, _GlobalBatchNorm):
            m.__class__ = _global_class(type(m))
            m._dist = ctx
    return model


def local_batchnorms(model: nn.Module) -> nn.Module:
    """Undo :func:`sync_batchnorms`: the model is an ordinary one again (in place)."""
    for m in model.modules():
        if isinstance(m, _GlobalBatchNorm):
            m.__class__ = m._local_class
            del m._dist
    return model


_GLOBAL_CLASSES: dict[type, type] = {nn.BatchNorm2d: _GlobalBatchNorm}


def _global_class(cls: type) -> type:
    """``cls`` with global-batch statistics; for a subclass of BatchNorm2d (``QuantBatchNorm2d``), one whose
    ``super().forward`` resolves to the global-batch forward, so the subclass's own behaviour is kept."""
    if cls not in _GLOBAL_CLASSES:
        _GLOBAL_CLASSES[cls] = type(f"Global{cls.__name__}", (cls, _GlobalBatchNorm), {"_local_class": cls})
    return _GLOBAL_CLASSES[cls]


class GlobalBNStatsLoss(BNStatsLoss):
    """The BNS loss of the global batch: each layer's recorded moments are combined over ranks
    (all layers in one collective) before they are compared with P's running statistics."""

    def __init__(self, model: nn.Module, ctx: DistContext) -> None:
        super().__init__(model)
        self.ctx = ctx

    def per_layer(self) -> dict[str, torch.Tensor]:
        if self.ctx.active and self._stats:
            modules = list(self._stats)
            means = torch.cat([self._stats[m][0] for m in modules])
            variances = torch.cat([self._stats[m][1] for m in modules])
            means, variances = global_moments(means, variances, self.ctx)
            sizes = [self._stats[m][0].numel() for m in modules]
            pairs = zip(means.split(sizes), variances.split(sizes), strict=True)
            self._stats = dict(zip(modules, pairs, strict=True))
        return super().per_layer()


def bns_loss(model: nn.Module, ctx: DistContext) -> BNStatsLoss:
    """The BNS loss of ``model`` over the global batch (the plain one with one process)."""
    return GlobalBNStatsLoss(model, ctx) if ctx.active else BNStatsLoss(model)
