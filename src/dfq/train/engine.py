"""The one training loop of the generator-based methods.

The engine owns the game (METHODS.md §1.7): per iteration a generator step and
the quantized model's step(s) in the order the method declares; warm-up epochs
in which only G trains; the activation-range observation window, then frozen
ranges; per-epoch multi-step learning rates; Nesterov SGD for Q and Adam for G;
Q's BatchNorm with fixed statistics unless the method says otherwise. It also
owns checkpoints (atomic, every K epochs, bit-identical resume on CPU), metrics
(``metrics.jsonl``) and evaluation, which it receives as a callback: the engine
never reads real data. Under torch.distributed it runs data-parallel over the ranks
with the statistics of the global batch (:mod:`dfq.distributed`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import dfq
from dfq.distributed import DistContext, bns_loss, check_shards, local_batchnorms, shard_seed, sync_batchnorms
from dfq.errors import DFQError
from dfq.generators import create_generator, lowpass
from dfq.quant import ActMode, QuantConfig, act_quantizers, quantize_model, set_act_mode, weight_quantizers
from dfq.train.outputs import Outputs
from dfq.train.plugins import CamProbe, cam_loss, easy_mask, grad_cam, masked_ce
from dfq.utils.io import atomic_write, load_payload, save_torch
from dfq.utils.seed import seed_everything
from dfq.utils.state import state_dict_mismatch

__all__ = ["TRAIN_CHECKPOINT", "Engine", "Evaluator", "RunInterrupted"]

Evaluator = Callable[[nn.Module], dict[str, Any]]
TRAIN_CHECKPOINT = "checkpoint.pt"
_FORMAT = "dfq-train-v1"
_LEARNED = (".step", ".alpha")  # parameters that exist only while steps/rounding learn (plugins.lsq, adaround)


@dataclass
class _State:
    epoch: int = 0  # epoch in progress (or next to run)
    iteration: int = 0  # next iteration within ``epoch``
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluations
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # logged values summed over the epoch so far
    lr_scale: float = 1.0  # lowered by each rollback after a divergence


class Engine:
    """Run a generator-based method on a float teacher.

    Args:
        method: the game (its config holds ``train``, ``generator`` and ``plugins``; ``train.shards`` set).
        teacher: the float model P (not modified).
        quant: how Q is quantized.
        num_classes: classes of P's output.
        input_size: (C, H, W) of one input.
        run_dir: where checkpoints and metrics go (``None``: keep nothing on disk).
        evaluate: callback returning ``{"top1": ...}`` for a model on real data.
        dist: this process's place in a data-parallel run and its device (default: the initialised
            process group, else one process on the CPU); see :mod:`dfq.distributed`.
    """

    def __init__(
        self,
        method: Any,
        teacher: nn.Module,
        quant: QuantConfig,
        *,
        num_classes: int,
        input_size: tuple[int, int, int],
        seed: int = 0,
        run_dir: str | Path | None = None,
        evaluate: Evaluator | None = None,
        progress: bool = True,
        dist: DistContext | None = None,
        model_name: str = "MODEL",
    ) -> None:
        self.dist = dist or DistContext.current()
        self.device = self.dist.device
        self.method, self.config, self.quant, self.seed = method, method.config, quant, seed
        self.train = self.config.train
        if self.train.shards is None:
            self.config = method.config = method.for_launch(self.dist.world_size)
            self.train = self.config.train
        self.num_classes, self.input_size = num_classes, tuple(input_size)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.evaluate, self.progress, self.model_name = evaluate, progress, model_name

        seed_everything(seed)  # G's initial weights come from the global stream
        self.teacher = copy.deepcopy(teacher).eval()  # the caller's model keeps its flags and mode
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student = quantize_model(teacher, quant)
        for p in self.student.parameters():
            p.requires_grad_(True)
        self.student.train(self.method.student_bn_train)
        self.generator = self._make_generator().train()
        for model in (self.teacher, self.student, self.generator):  # oneDNN's and cuDNN's convolutions: fastest on NHWC
            model.to(self.device, memory_format=torch.channels_last)
        self.features = method.feature_layers(teacher)
        self._bns = bns_loss(self.teacher, self.dist) if self.method.uses_bns else None

        t = self.train
        self.q_opt = torch.optim.SGD(
            self.student.parameters(),
            lr=t.q_lr,
            momentum=t.q_momentum,
            weight_decay=t.q_weight_decay,
            nesterov=t.q_nesterov,
        )
        self.g_opt = torch.optim.Adam(self.generator.parameters(), lr=t.g_lr, betas=tuple(t.g_betas))
        self.plugins = self.config.plugins
        self._check_plugins()
        self._parallelize()
        self._cams = (
            (CamProbe(self.teacher, leaf=True), CamProbe(self.student, leaf=False)) if self.plugins.cam_weight else ()
        )
        self.qp_opt: torch.optim.Adam | None = None  # the learned steps/rounding (plugins.lsq, plugins.adaround)
        self.ema: list[torch.Tensor] | None = None  # the average of Q's parameters (train.ema_decay), from Q's 1st step
        self.shards = self.train.shards
        check_shards(t.batch_size, self.shards, self.dist.world_size)
        own = self.shards // self.dist.world_size
        self.samplers = {  # this rank's shards, each with its own noise stream
            k: torch.Generator().manual_seed(shard_seed(seed, k))
            for k in range(self.dist.rank * own, (self.dist.rank + 1) * own)
        }
        self.state = _State()
        self._last_good: dict[str, Any] | None = None
        self.rollbacks = 0
        self.share_student_forward = True  # exact: see _shared_iteration (off only to test the equivalence)

    # ----------------------------------------------------------------- set-up
    def _make_generator(self) -> nn.Module:
        gc, m = self.config.generator, self.method
        c, h, w = self.input_size
        if h != w:
            raise DFQError(f"the generators make square images; the model expects {h}x{w}")
        name = gc.pick(h)
        gen = create_generator(name, self.num_classes, h, gc.latent_dim, channels=c)
        if getattr(gen, "conditional", True) != m.conditional:
            raise DFQError(
                f"method '{m.name}' needs a {'conditional' if m.conditional else 'unconditional'} "
                f"generator, '{name}' is not"
            )
        return gen

    def _parallelize(self) -> None:
        """Data-parallel set-up (nothing with one process): global-batch BatchNorms in G (and in Q where
        it trains them), global activation ranges, and G and Q in DistributedDataParallel for their updates."""
        self._g_train, self._q_train = self.generator, self.student
        if not self.dist.active:
            return
        sync_batchnorms(self.generator, self.dist)
        if self.method.student_bn_train:
            sync_batchnorms(self.student, self.dist)
        for _, q in act_quantizers(self.student):
            q.reduce_range = self.dist.global_range
        self._g_train, self._q_train = self.dist.wrap(self.generator), self.dist.wrap(self.student)

    def _unparallelize(self) -> None:
        """Q becomes an ordinary model again (its state is unchanged)."""
        local_batchnorms(self.student)
        for _, q in act_quantizers(self.student):
            q.reduce_range = None

    def _check_plugins(self) -> None:
        pl, m = self.plugins, self.method
        if pl.learns_quantizers and self.train.epochs <= self._learn_epoch:
            raise DFQError(
                f"plugins.lsq/adaround start learning at epoch max(warmup_epochs, observe_epochs) = "
                f"{self._learn_epoch}, but the run has {self.train.epochs} epochs"
            )
        if pl.adaround and not self._weight_quantizers():
            raise DFQError("plugins.adaround: the model has no quantized weights (quant.wbits is 32)")
        if pl.lsq and not self._weight_quantizers() and all(q.spec.is_noop for _, q in act_quantizers(self.student)):
            raise DFQError("plugins.lsq: the model has no quantized weights or activations")
        if (pl.hard_tau is not None or pl.cam_weight) and not m.conditional:
            raise DFQError(f"plugins.hard_tau and plugins.cam_weight need sampled labels; '{m.name}' has none")
        if pl.learns_quantizers and self.train.ema_decay:
            raise DFQError("train.ema_decay averages Q's weights; plugins.lsq/adaround learn other parameters")
        if m.student_bn_train and self.train.ema_decay:
            raise DFQError(f"train.ema_decay: '{m.name}' trains Q's BatchNorm statistics, which follow Q's own "
                           "weights, not their average")  # fmt: skip
        if self.dist.active and (pl.cam_weight or pl.learns_quantizers):
            raise DFQError("plugins.cam_weight, plugins.lsq and plugins.adaround run on one process only (for now)")

    @staticmethod
    def _lr(base: float, milestones: list[int], gamma: float, epoch: int) -> float:
        """Per-epoch multi-step schedule: one factor ``gamma`` per milestone already reached."""
        return base * gamma ** sum(1 for m in milestones if epoch >= m)

    # --------------------------------------------------------------- sampling
    def _sample(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Noise (and labels) of this rank's shards, each from its own stream (on the CPU, so that the
        images do not depend on the device)."""
        b = self.train.batch_size // self.shards
        zs, ys = [], []
        for gen in self.samplers.values():
            zs.append(torch.randn(b, self.generator.latent_dim, generator=gen))
            if self.method.conditional:
                ys.append(torch.randint(self.num_classes, (b,), generator=gen))
        z = torch.cat(zs).to(self.device)
        return z, torch.cat(ys).to(self.device) if ys else None

    def _global(self, out: Outputs) -> Outputs:
        """The method's view of the batch: logits, labels and label weights of the global batch
        (images, BNS and feature maps stay this rank's; every loss on them is a per-sample mean)."""
        if not self.dist.active:
            return out
        g = self.dist.gather
        return Outputs(
            out.x,
            None if out.y is None else g(out.y),
            g(out.p_logits),
            None if out.q_logits is None else g(out.q_logits),
            out.bns,
            out.p_feats,
            out.q_feats,
            None if out.label_mask is None else g(out.label_mask),
        )

    @contextlib.contextmanager
    def _capture(self, model: nn.Module) -> Iterator[list[torch.Tensor]]:
        """Record the outputs of the method's feature layers during a forward."""
        feats: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        handles = [
            modules[n].register_forward_hook(lambda _m, _i, o, n=n: feats.__setitem__(n, o)) for n in self.features
        ]
        out: list[torch.Tensor] = []
        try:
            yield out
        finally:
            for h in handles:
                h.remove()
            missing = [n for n in self.features if n not in feats]
            if missing and feats:
                raise DFQError(f"feature layer(s) {', '.join(missing)} were not called during the forward pass")
            out.extend(feats[n] for n in self.features if n in feats)

    def _teacher_forward(self, x: torch.Tensor, bns: bool) -> tuple[torch.Tensor, torch.Tensor | None, list]:
        stack = contextlib.ExitStack()
        with stack:
            recorder = stack.enter_context(self._bns) if bns and self._bns else None
            feats = stack.enter_context(self._capture(self.teacher))
            logits = self.teacher(x)
            bns_loss = recorder.loss() if recorder else None
        return logits.float(), bns_loss, [f.float() for f in feats]  # losses in float32 (train.fast)

    def _student_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        with self._capture(self.student) as feats:
            logits = self._q_train(x)  # Q, in DistributedDataParallel in a data-parallel run
        return logits.float(), [f.float() for f in feats]

    # ------------------------------------------------------------------ steps
    def generator_step(self) -> tuple[Outputs, dict[str, torch.Tensor]]:
        """One step of G on a fresh batch; returns the batch (for Q's step) and G's losses."""
        m = self.method
        z, y = self._sample()
        x = self._g_train(z, y)
        p_logits, bns, p_feats = self._teacher_forward(x, m.uses_bns)
        q_logits, q_feats = None, None
        if m.generator_uses_student:
            # Gradients reach G through Q's straight-through estimator; Q's own
            # weight gradients would be thrown away, so they are not computed.
            with _no_param_grads(self.student):
                q_logits, q_feats = self._student_forward(x)
        out = Outputs(x, y, p_logits, q_logits, bns, p_feats, q_feats)
        with _float32(self.device):
            losses = m.generator_loss(self._global(out))
        self.g_opt.zero_grad(set_to_none=True)
        _check_finite(losses["loss"], "generator loss", self.dist)
        losses["loss"].backward()
        _check_grads(self.g_opt, "generator gradient")
        self.g_opt.step()
        return out, losses

    @torch.no_grad()
    def fresh_batch(self) -> Outputs:
        """A new batch from G (no gradient to G) with P's outputs, for a Q step of its own."""
        z, y = self._sample()
        x = self.generator(z, y)
        p_logits, _, p_feats = self._teacher_forward(x, bns=False)
        return Outputs(x, y, p_logits, p_feats=p_feats)

    def student_step(self, batch: Outputs, train_q: bool) -> dict[str, torch.Tensor]:
        """Q's loss on ``batch`` (detached from G), and Q's update when ``train_q``."""
        x, p_cam = batch.x.detach(), None
        p_logits, p_feats = batch.p_logits.detach(), batch.p_feats
        if self.plugins.lowpass:
            x = lowpass(x, self.plugins.lowpass)  # SynQ: P's targets and Q's inputs both filtered
        if self.plugins.lowpass or (train_q and self.plugins.cam_weight):
            p_logits, p_cam, p_feats = self._teacher_targets(x, batch.y, cam=train_q)
        p_feats = [f.detach() for f in p_feats] if p_feats else p_feats
        cam = self._cams[1].capture() if p_cam is not None else contextlib.nullcontext()
        with torch.set_grad_enabled(train_q), cam:
            q_logits, q_feats = self._student_forward(x)
            out = Outputs(x, batch.y, p_logits, q_logits, None, p_feats, q_feats)
            with _float32(self.device):
                losses = self._student_losses(out, p_cam)
        _check_finite(losses["loss"], "quantized-model loss", self.dist)
        if train_q:
            for opt in self._q_opts():
                opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            for opt in self._q_opts():
                _check_grads(opt, "quantized-model gradient")
                opt.step()
            self._update_ema()
        return losses

    def _teacher_targets(self, x: torch.Tensor, y: torch.Tensor | None, cam: bool) -> tuple:
        """P's logits, Grad-CAM maps (``plugins.cam_weight``) and features on the Q step's own images."""
        if not (cam and self.plugins.cam_weight):
            with torch.no_grad():
                logits, _, feats = self._teacher_forward(x, bns=False)
            return logits, None, feats
        with torch.enable_grad(), self._cams[0].capture() as probe:  # only the head is differentiated
            logits, _, feats = self._teacher_forward(x, bns=False)
        maps = grad_cam(logits, probe.feats, y, create_graph=False)
        return logits.detach(), maps, feats

    def _student_losses(self, out: Outputs, p_cam: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The method's Q loss plus the plug-ins' terms."""
        pl, m = self.plugins, self.method
        if pl.hard_tau is not None:
            out.label_mask = easy_mask(out.p_logits, out.y, pl.hard_tau)
        losses = m.student_loss(self._global(out))
        extra: dict[str, torch.Tensor] = {}  # the plug-ins' terms: per-sample means of this rank's shard
        if out.label_mask is not None:
            extra["easy_frac"] = out.label_mask.mean()
            if not m.label_ce and pl.hard_ce_weight:
                extra["easy_ce"] = pl.hard_ce_weight * masked_ce(out.q_logits, out.y, out.label_mask)
        if p_cam is not None and torch.is_grad_enabled():
            q_cam = grad_cam(out.q_logits, self._cams[1].feats, out.y, create_graph=True)
            extra["cam"] = pl.cam_weight * cam_loss(p_cam, q_cam)
        if pl.adaround and self.qp_opt is not None:
            extra["round"] = pl.round_weight * self._rounding_loss()
        total = losses["loss"] + sum(v for k, v in extra.items() if k != "easy_frac")
        return {**losses, **extra, "loss": total}

    def _can_share_student_forward(self, train_q: bool) -> bool:
        """AdaSG/AdaDFQ's Q step runs Q on the same images with the same weights as the G step did:
        outside the range-observation window (where every forward moves the ranges) one forward serves both."""
        m = self.method
        return (
            self.share_student_forward
            and not self.dist.active  # its gradients are routed with autograd.grad, which DDP does not see
            and train_q
            and m.generator_uses_student
            and not m.student_bn_train
            and not self.plugins.changes_student_input
            and not self._observing()
        )

    def _observing(self) -> bool:
        """Whether Q's forwards still move activation ranges (the observation window)."""
        return any(q.get_mode() is ActMode.OBSERVE for _, q in act_quantizers(self.student))

    def _shared_iteration(self) -> dict[str, torch.Tensor]:
        """One G step and one Q step from a single Q forward; gradients routed with ``autograd.grad``
        so that G gets only its gradients (through Q's STE) and Q only its own, as in the two-forward loop."""
        m = self.method
        z, y = self._sample()
        x = self.generator(z, y)
        p_logits, bns, p_feats = self._teacher_forward(x, m.uses_bns)
        q_logits, q_feats = self._student_forward(x)
        with _float32(self.device):
            g_losses = m.generator_loss(Outputs(x, y, p_logits, q_logits, bns, p_feats, q_feats))
        detached = [f.detach() for f in p_feats] if p_feats else p_feats
        q_out = Outputs(x.detach(), y, p_logits.detach(), q_logits, None, detached, q_feats)
        with _float32(self.device):
            q_losses = self._student_losses(q_out)
        _check_finite(g_losses["loss"], "generator loss")
        _check_finite(q_losses["loss"], "quantized-model loss")
        for opts, loss, retain, what in (
            ([self.g_opt], g_losses["loss"], True, "generator gradient"),
            (self._q_opts(), q_losses["loss"], False, "quantized-model gradient"),
        ):
            params = [p for opt in opts for group in opt.param_groups for p in group["params"]]
            grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            for opt in opts:
                _check_grads(opt, what)
        for opt in (self.g_opt, *self._q_opts()):
            opt.step()
        self._update_ema()
        return {
            **{f"g_{k}": v.detach() for k, v in g_losses.items()},
            **{f"q_{k}": v.detach() for k, v in q_losses.items()},
        }

    def precision(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast with ``train.fast``, else nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.train.fast)

    def _iteration(self, train_q: bool) -> dict[str, torch.Tensor]:
        with self.precision():
            return self._steps(train_q)

    def _steps(self, train_q: bool) -> dict[str, torch.Tensor]:
        return self.method.iteration(self, train_q)

    def generator_then_student(self, train_q: bool) -> dict[str, torch.Tensor]:
        """The default iteration: G's step, then Q's step on the same batch."""
        if self._can_share_student_forward(train_q):
            return self._shared_iteration()
        batch, g_losses = self.generator_step()
        # In warm-up the official loops still compute Q's loss (no step): for a method whose G step already ran Q,
        # that forward only matters while it moves the ranges, so it is skipped once they are frozen.
        q_losses = None
        if train_q or not self.method.generator_uses_student or self._observing():
            q_losses = self.student_step(batch, train_q)
        return self.logs(g_losses, q_losses)

    @staticmethod
    def logs(g_losses: dict[str, torch.Tensor], q_losses: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """An iteration's logged values: G's losses as ``g_*``, the last Q step's as ``q_*``."""
        logs = {f"g_{k}": v.detach() for k, v in g_losses.items()}
        logs.update({f"q_{k}": v.detach() for k, v in (q_losses or {}).items()})
        return logs

    # ------------------------------------------------------ average of Q's weights (train.ema_decay)
    def _update_ema(self) -> None:
        decay = self.train.ema_decay
        if not decay:
            return
        params = [p.detach() for p in self.student.parameters()]
        if self.ema is None:
            self.ema = [p.clone() for p in params]
            return
        for avg, p in zip(self.ema, params, strict=True):
            avg.lerp_(p, 1.0 - decay)

    @contextlib.contextmanager
    def _averaged_weights(self) -> Iterator[None]:
        """Q with the averaged parameters inside the block, its own ones again after it."""
        if self.ema is None:
            yield
            return
        own = [p.detach().clone() for p in self.student.parameters()]
        self._load_student_params(self.ema)
        try:
            yield
        finally:
            self._load_student_params(own)

    @torch.no_grad()
    def _load_student_params(self, values: list[torch.Tensor]) -> None:
        for p, v in zip(self.student.parameters(), values, strict=True):
            p.copy_(v)

    # ----------------------------------------------- learned steps and rounding (plugins.lsq, plugins.adaround)
    @property
    def _learn_epoch(self) -> int:
        """Quantizers start learning once Q trains and the ranges are frozen."""
        return max(self.train.warmup_epochs, self.train.observe_epochs)

    def _q_opts(self) -> list[torch.optim.Optimizer]:
        return [self.q_opt] if self.qp_opt is None else [self.q_opt, self.qp_opt]

    def _weight_quantizers(self) -> list[tuple[nn.Module, Any]]:
        return list(weight_quantizers(self.student))

    def _begin_quantizer_learning(self) -> None:
        """Make the steps (and the rounding) trainable, with their own Adam."""
        pl = self.plugins
        astep, wstep, rounding = [], [], []
        if pl.lsq:
            astep = [q.begin_learning() for _, q in act_quantizers(self.student) if not q.spec.is_noop]
        for layer, wq in self._weight_quantizers():
            if pl.adaround:
                wq.store(layer.weight)  # the grid of the weights Q has now
                alpha, step = wq.begin_rounding(layer.weight)
                rounding.append(alpha)
                wstep.append(step)
            elif pl.lsq:
                wstep.append(wq.begin_step_learning(layer.weight))
        groups = [
            {"params": ps, "lr": lr * self.state.lr_scale, "base_lr": lr}
            for ps, lr in ((astep, pl.lr_astep), (wstep, pl.lr_wstep), (rounding, pl.lr_round))
            if ps
        ]
        self.qp_opt = torch.optim.Adam(groups)

    def _end_quantizer_learning(self) -> None:
        """Fix the learned steps and rounding into the stored grids and weights: Q is an ordinary model again."""
        if self.qp_opt is None:
            return
        for _, q in act_quantizers(self.student):
            if q.get_mode() is ActMode.LEARNED:
                q.end_learning()
        for layer, wq in self._weight_quantizers():
            if wq.alpha is not None:
                wq.end_rounding(layer.weight)
            elif wq.learns_step:
                wq.end_step_learning()
        self.qp_opt = None

    def _rounding_loss(self) -> torch.Tensor:
        """AdaRound's regulariser averaged over all rounding variables, its exponent annealed over Q's training."""
        t, st = self.train, self.state
        start, end = self._learn_epoch * t.iters_per_epoch, t.epochs * t.iters_per_epoch
        done = (st.epoch * t.iters_per_epoch + st.iteration - start) / max(end - start, 1)
        b0, b1 = self.plugins.beta
        beta = b0 + (b1 - b0) * min(max(done, 0.0), 1.0)
        quantizers = [wq for _, wq in self._weight_quantizers() if wq.alpha is not None]
        return sum(wq.rounding_loss(beta) for wq in quantizers) / sum(wq.alpha.numel() for wq in quantizers)

    # ------------------------------------------------------------------- loop
    def run(self, resume: bool = False) -> tuple[nn.Module, dict[str, Any]]:
        """Train (or continue training) and return ``(Q, summary)``.

        SIGINT/SIGTERM finish the current iteration, write a checkpoint and raise
        :class:`RunInterrupted`; ``run(resume=True)`` then continues to the same result.
        """
        if resume:
            self._load_checkpoint()
        t, st = self.train, self.state
        bar = tqdm(
            total=t.epochs * t.iters_per_epoch,
            initial=st.epoch * t.iters_per_epoch + st.iteration,
            desc=self.method.name,
            disable=not (self.progress and self.dist.main),
            dynamic_ncols=True,
        )
        if self._last_good is None:
            self._last_good = self._snapshot()  # a divergence before the first checkpoint restarts from here
        try:
            with _stop_requests() as stop:
                while self.state.epoch < t.epochs:
                    try:
                        self._run_epoch(self.state.epoch, bar, stop)
                    except _Diverged as e:
                        self._rollback(str(e), bar)
        finally:
            bar.close()
        self._end_quantizer_learning()
        self._unparallelize()
        if self.ema is not None:
            self._load_student_params(self.ema)
        self.student.to(memory_format=torch.contiguous_format)  # the caller gets an ordinary model
        return self.student, self.summary()

    def _run_epoch(self, epoch: int, bar: tqdm, stop: list[int] | None = None) -> None:
        t, st = self.train, self.state
        for group in self.q_opt.param_groups:
            group["lr"] = self._lr(t.q_lr, t.q_milestones, t.lr_gamma, epoch) * st.lr_scale
        for group in self.g_opt.param_groups:
            group["lr"] = self._lr(t.g_lr, t.g_milestones, t.lr_gamma, epoch) * st.lr_scale
        for group in self.qp_opt.param_groups if self.qp_opt is not None else ():
            group["lr"] = group["base_lr"] * st.lr_scale  # constant, lowered only by rollbacks
        train_q = epoch >= t.warmup_epochs
        st.epoch = epoch
        if self.qp_opt is None:  # learned activation steps keep their own mode
            set_act_mode(self.student, ActMode.OBSERVE if epoch < t.observe_epochs else ActMode.FROZEN)
            if self.plugins.learns_quantizers and epoch >= self._learn_epoch:
                self._begin_quantizer_learning()
        while st.iteration < t.iters_per_epoch:
            start = time.perf_counter()
            logs = self._mean_over_ranks(self._iteration(train_q))
            if epoch < t.observe_epochs:
                ranges = [v for _, q in act_quantizers(self.student) for v in (q.lo, q.hi)]
                if ranges:
                    _check_finite(torch.stack(ranges), "activation range")
            for k, v in logs.items():
                st.sums[k] = st.sums.get(k, 0) + v
            st.iteration += 1
            st.train_seconds += time.perf_counter() - start
            bar.update(1)
            if st.iteration % 20 == 1 or st.iteration == t.iters_per_epoch:
                bar.set_postfix({k: f"{float(v):.3g}" for k, v in logs.items() if k.endswith("loss")}, refresh=False)
            if st.iteration == t.iters_per_epoch:
                break
            global_iter = epoch * t.iters_per_epoch + st.iteration
            if t.checkpoint_every_iters and global_iter % t.checkpoint_every_iters == 0:
                self._save_checkpoint()
            if self._stop_requested(stop):
                self._save_checkpoint()
                raise RunInterrupted(stop[0], epoch, st.iteration, self.run_dir, self.model_name)
        self._end_epoch(epoch, train_q, bar)
        if self._stop_requested(stop) and epoch < t.epochs - 1:
            self._save_checkpoint()
            raise RunInterrupted(stop[0], epoch + 1, 0, self.run_dir, self.model_name)

    def _mean_over_ranks(self, logs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logged values averaged over ranks (one collective): the global batch's."""
        if not (self.dist.active and logs):
            return logs
        return dict(zip(logs, self.dist.mean(torch.stack([v.float() for v in logs.values()])), strict=True))

    def _stop_requested(self, stop: list[int] | None) -> bool:
        """A SIGINT/SIGTERM seen by any rank stops every rank at the same iteration."""
        signum = self.dist.max_int(stop[0] if stop else 0)
        if signum and stop is not None and not stop:
            stop.append(signum)
        return bool(signum)

    def _end_epoch(self, epoch: int, train_q: bool, bar: tqdm) -> None:
        t, st = self.train, self.state
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_q": train_q,
            "q_lr": self.q_opt.param_groups[0]["lr"],
            "g_lr": self.g_opt.param_groups[0]["lr"],
            **{k: float(v) / t.iters_per_epoch for k, v in st.sums.items()},
        }
        last = epoch == t.epochs - 1
        if self.evaluate and self.dist.main and ((epoch + 1) % t.eval_every == 0 or last):
            metrics = self._evaluate()
            record.update(top1=metrics["top1"], top5=metrics.get("top5"))
            st.history.append({"epoch": epoch, "top1": metrics["top1"]})
            bar.write(f"epoch {epoch}: top-1 {metrics['top1']:.2f}%")
        record["train_seconds"] = round(st.train_seconds, 3)
        st.epoch, st.iteration, st.sums = epoch + 1, 0, {}
        self._append_metrics(record)  # before the checkpoint: a resumed run rewrites redone epochs
        if (epoch + 1) % t.checkpoint_every == 0 or last:
            self._save_checkpoint()

    def _evaluate(self) -> dict[str, Any]:
        """Evaluate Q with its ranges frozen, so real data never moves them."""
        modes = [(q, q.get_mode()) for _, q in act_quantizers(self.student) if q.get_mode() is not ActMode.LEARNED]
        soft = [wq for _, wq in self._weight_quantizers() if wq.soft_rounding]
        was_training = self.student.training
        for q, _ in modes:
            q.set_mode(ActMode.FROZEN)
        for wq in soft:
            wq.soft_rounding = False  # the rounding the model would end with
        self.student.eval()  # BN statistics must not move either
        # In the layout Q is saved in: channels-last sums in another order, which flips a few images at code boundaries.
        self.student.to(memory_format=torch.contiguous_format)
        try:
            with self._averaged_weights():  # the weights the run returns
                return self.evaluate(self.student)
        finally:
            self.student.to(memory_format=torch.channels_last)
            self.student.train(was_training)
            for q, mode in modes:
                q.set_mode(mode)
            for wq in soft:
                wq.soft_rounding = True

    def summary(self) -> dict[str, Any]:
        st, c = self.state, self.config
        out: dict[str, Any] = {
            "method": self.method.name,
            "model": self.model_name,
            "wbits": self.quant.wbits,
            "abits": self.quant.abits,
            "epochs": c.train.epochs,
            "iters_per_epoch": c.train.iters_per_epoch,
            "batch_size": c.train.batch_size,
            "shards": self.shards,
            "processes": self.dist.world_size,
            "device": str(self.device),
            "seconds": round(st.train_seconds, 3),
            "rollbacks": self.rollbacks,
        }
        if st.history:
            best = max(st.history, key=lambda r: r["top1"])
            out.update(top1_best=best["top1"], best_epoch=best["epoch"])
            if st.history[-1]["epoch"] == c.train.epochs - 1:  # "top1" is the final model's, never an earlier one
                out["top1"] = st.history[-1]["top1"]
        return out

    # ------------------------------------------------------------ persistence
    def _identity(self) -> dict[str, Any]:
        """What a checkpoint must have been written with to be resumed by this run."""
        method = {"name": self.method.name, **dataclasses.asdict(self.config)}
        return {"seed": self.seed, "quant": self.quant.to_dict(), "method": method}

    def _snapshot(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically (tensors copied, not aliased)."""
        return copy.deepcopy(
            {
                "format": _FORMAT,
                "dfq_version": dfq.__version__,
                "config": self._identity(),
                "epoch": self.state.epoch,
                "iteration": self.state.iteration,
                "sums": self.state.sums,
                "lr_scale": self.state.lr_scale,
                "train_seconds": self.state.train_seconds,
                "history": self.state.history,
                "student": self.student.state_dict(),
                "generator": self.generator.state_dict(),
                "q_opt": self.q_opt.state_dict(),
                "g_opt": self.g_opt.state_dict(),
                "qp_opt": None if self.qp_opt is None else self.qp_opt.state_dict(),
                "ema": self.ema,
                "sampler": self._sampler_states(),
                "torch_rng": torch.get_rng_state(),
            }
        )

    def _sampler_states(self) -> torch.Tensor:
        """Every shard's noise-stream state, gathered from the ranks: (shards, state bytes)."""
        states: dict[int, torch.Tensor] = {}
        for part in self.dist.gather_objects({k: g.get_state() for k, g in self.samplers.items()}):
            states.update(part)
        return torch.stack([states[k] for k in range(self.shards)])

    def _save_checkpoint(self) -> None:
        """Keep the current state as the last good one, in memory and (atomically) on disk."""
        for name, model in (("quantized model", self.student), ("generator", self.generator)):
            for t in model.state_dict().values():
                if t.is_floating_point():
                    _check_finite(t, f"{name} state")  # never keep a NaN model
        self._last_good = self._snapshot()
        if self.run_dir is not None and self.dist.main:
            save_torch(self._last_good, self.run_dir / TRAIN_CHECKPOINT)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        # The learned steps and rounding exist only while they learn: bring Q to the checkpoint's phase first.
        self._end_quantizer_learning()
        if ckpt.get("qp_opt") is not None:
            self.student.load_state_dict(ckpt["student"], strict=False)  # the weights and grids they start from
            self._begin_quantizer_learning()
            self.qp_opt.load_state_dict(copy.deepcopy(ckpt["qp_opt"]))
        self.student.load_state_dict(ckpt["student"])
        self.generator.load_state_dict(ckpt["generator"])
        # load_state_dict keeps the given tensors: copies, so training never writes into the snapshot
        self.q_opt.load_state_dict(copy.deepcopy(ckpt["q_opt"]))
        self.g_opt.load_state_dict(copy.deepcopy(ckpt["g_opt"]))
        states = _stream_states(ckpt["sampler"])
        for k, gen in self.samplers.items():
            gen.set_state(states[k].clone())  # a view of the stacked states crashes set_state
        torch.set_rng_state(ckpt["torch_rng"])
        saved_ema = ckpt.get("ema")
        self.ema = None if saved_ema is None else [t.clone().to(self.device) for t in saved_ema]
        self.state = _State(
            ckpt["epoch"],
            ckpt["iteration"],
            ckpt["train_seconds"],
            list(ckpt["history"]),
            dict(ckpt["sums"]),
            ckpt["lr_scale"],
        )

    def _load_checkpoint(self) -> None:
        if self.run_dir is None or not (self.run_dir / TRAIN_CHECKPOINT).is_file():
            raise DFQError(f"nothing to resume: no {TRAIN_CHECKPOINT} in {self.run_dir}")
        ckpt = read_train_checkpoint(self.run_dir)
        if ckpt["config"] != self._identity():
            raise DFQError(
                f"the checkpoint in {self.run_dir} was written with a different configuration; "
                "resume with the run's own config.yaml"
            )
        streams = len(_stream_states(ckpt["sampler"]))
        if streams != self.shards:
            raise DFQError(f"the checkpoint in {self.run_dir} has {streams} noise streams, this run {self.shards}")
        for name, module in (("student", self.student), ("generator", self.generator)):
            saved_state = ckpt[name]
            if name == "student" and ckpt.get("qp_opt") is not None:  # learned steps/rounding: checked after _restore
                current = module.state_dict()
                saved_state = {k: v for k, v in saved_state.items() if k in current or not k.endswith(_LEARNED)}
            problem = state_dict_mismatch(module.state_dict(), saved_state)
            if problem:
                raise DFQError(f"the checkpoint in {self.run_dir} does not fit this run's {name}: {problem}")
        self._restore(ckpt)
        self._last_good = ckpt

    def _rollback(self, reason: str, bar: tqdm) -> None:
        """Return to the last good state with lower learning rates, or stop with a clear error."""
        self.rollbacks += 1
        t = self.train
        if self.rollbacks > t.max_rollbacks:
            raise DFQError(
                f"{reason} again after {t.max_rollbacks} rollback(s) with lower learning rates; "
                "the run stopped without saving a diverged model (lower train.q_lr / train.g_lr)"
            )
        scale = self.state.lr_scale
        self._restore(self._last_good)
        self.state.lr_scale = scale * t.rollback_lr_factor
        bar.n = self.state.epoch * t.iters_per_epoch + self.state.iteration
        if self.dist.main:
            bar.write(
                f"{reason} at epoch {self.state.epoch}: rolled back to epoch {self.state.epoch}, iteration "
                f"{self.state.iteration} with learning rates x{self.state.lr_scale:g} "
                f"(rollback {self.rollbacks}/{t.max_rollbacks})"
            )

    def _append_metrics(self, record: dict[str, Any]) -> None:
        if self.run_dir is None or not self.dist.main:
            return
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        # Drop records of epochs that a resumed run is redoing; rewrite atomically (a kill never leaves half a line).
        kept = [ln for ln in lines if json.loads(ln)["epoch"] < record["epoch"]]
        text = "".join(ln + "\n" for ln in [*kept, json.dumps(record)])
        atomic_write(path, lambda f: f.write(text.encode()))


def _stream_states(saved: torch.Tensor) -> torch.Tensor:
    """The saved noise-stream states as (shards, bytes); checkpoints of one stream hold a single state."""
    return saved[None] if saved.dim() == 1 else saved


def read_train_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """Load a training checkpoint safely (tensors and plain containers only)."""
    return load_payload(Path(run_dir) / TRAIN_CHECKPOINT, _FORMAT, "dfq training checkpoint")


class RunInterrupted(DFQError):
    """A run stopped by SIGINT/SIGTERM after writing a checkpoint it can resume from."""

    def __init__(self, signum: int, epoch: int, iteration: int, run_dir: Path | None, model: str = "MODEL") -> None:
        self.exit_code = 128 + signum
        where = f"epoch {epoch}, iteration {iteration}"
        if run_dir is None:
            super().__init__(f"interrupted by {signal.Signals(signum).name} at {where} (no run directory: not saved)")
        else:
            super().__init__(
                f"interrupted by {signal.Signals(signum).name} at {where}; checkpoint saved, continue "
                f"with: dfq quantize {model} --out {run_dir} --resume"
            )


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """Turn the first SIGINT/SIGTERM into a stop request (a list holding the signal number).

    A second signal gets the default behaviour, so a stuck run can still be killed.
    Outside the main thread (where handlers cannot be installed) nothing is caught.
    """
    stop: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def request(signum: int, _frame: object) -> None:
        stop.append(signum)
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    for sig in previous:
        signal.signal(sig, request)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _float32(device: torch.device) -> contextlib.AbstractContextManager:
    """Losses in float32 even inside fast mode's autocast (their inputs are float32 already)."""
    return torch.autocast(device.type, enabled=False)


@contextlib.contextmanager
def _no_param_grads(model: nn.Module) -> Iterator[None]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class _Diverged(Exception):
    """A NaN/Inf appeared; the engine rolls back to the last good state."""


def _check_finite(value: torch.Tensor, what: str, dist: DistContext | None = None) -> None:
    """Raise :class:`_Diverged` on a NaN/Inf; with ``dist``, on every rank if one rank has it (a value that
    differs between ranks must not send them down different branches)."""
    bad = not bool(torch.isfinite(value).all())
    if dist is not None:
        bad = dist.any(bad)
    if bad:
        raise _Diverged(f"the {what} became non-finite")


def _check_grads(opt: torch.optim.Optimizer, what: str) -> None:
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        _check_finite(torch.nn.utils.get_total_norm(grads), what)
