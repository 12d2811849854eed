"""The game of the generator-based methods: G against the quantized model Q, with the float model P as referee.

:class:`Game` holds the three models, their optimizers, the noise streams and the plug-ins, and offers the steps
a method's :meth:`iteration` composes in its own order (docs/methods.md, "Training loop of the generator-based
methods"): :meth:`Game.generator_step`, :meth:`Game.student_step`, :meth:`Game.fresh_batch`,
:meth:`Game.generator_then_student` and :meth:`Game.logs`.
It never reads real data and never names a method: it reads the method's losses and class attributes
(``conditional``, ``uses_bns``, ``generator_uses_student``, ``student_bn_train``, ``label_ce``).
Under torch.distributed the steps run data-parallel with the statistics of the global batch
(:mod:`dfq.distributed`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from dfq.distributed import DistContext, bns_loss, local_batchnorms, sync_batchnorms
from dfq.errors import DFQError
from dfq.generators import InputStats, create_generator, to_input_space
from dfq.quant import ActMode, QuantConfig, act_quantizers, quantize_model
from dfq.train.average import weight_average
from dfq.train.finite import check_finite, check_grads
from dfq.train.outputs import Outputs
from dfq.train.plugins import build_plugins
from dfq.train.streams import NoiseStreams
from dfq.utils.state import no_param_grads

__all__ = ["Game"]

Losses = dict[str, torch.Tensor]


class Game:
    """The players, their optimizers and the steps of one game.

    Args:
        method: the game method (its config holds ``train``, ``generator`` and ``plugins``).
        teacher: the float model P (not modified).
        quant: how Q is quantized.
        num_classes, input_size: P's classes and (C, H, W) of one input.
        seed: seed of the noise streams. G's and Q's initial weights come from the global stream, which the
            entry point (:func:`dfq.quantize`, ``dfq quantize``) seeds once.
        dist: this process's place in a data-parallel run and its device (default: the initialised process
            group, else one process on the CPU).
        clock: the run's global iteration (the β schedule of ``plugins.adaround`` reads it).
        input_stats: where G's standardised images are mapped for a model that takes raw pixels
            (:func:`dfq.generators.to_input_space`).
    """

    def __init__(
        self, method: Any, teacher: nn.Module, quant: QuantConfig, *, num_classes: int,
        input_size: tuple[int, int, int], seed: int = 0, dist: DistContext | None = None,
        clock: Callable[[], int] = lambda: 0, input_stats: InputStats | None = None,
    ) -> None:  # fmt: skip
        self.dist = dist or DistContext.current()
        self.input_stats = input_stats
        self.device = self.dist.device
        if method.config.train.shards is None:  # fixed by the launch (GameMethod.quantize does it first)
            method.config = method.for_launch(self.dist.world_size)
        self.method, self.config, self.train = method, method.config, method.config.train
        self.quant, self.num_classes = quant, num_classes
        self.teacher, self.student, self.generator = _players(method, teacher, quant, num_classes, input_size)
        for model in (self.teacher, self.student, self.generator):  # oneDNN's and cuDNN's convolutions: fastest on NHWC
            model.to(self.device, memory_format=torch.channels_last)
        self.features = method.feature_layers(teacher)
        self.bns = bns_loss(self.teacher, self.dist) if method.uses_bns else None
        t = self.train
        self.q_opt = torch.optim.SGD(self.student.parameters(), lr=t.q_lr, momentum=t.q_momentum,
                                     weight_decay=t.q_weight_decay, nesterov=t.q_nesterov)  # fmt: skip
        self.g_opt = torch.optim.Adam(self.generator.parameters(), lr=t.g_lr, betas=tuple(t.g_betas))
        self.plugins = build_plugins(self.config.plugins, method=method, train=t, teacher=self.teacher,
                                     student=self.student, distributed=self.dist.active, clock=clock)  # fmt: skip
        if method.student_bn_train and t.ema_decay:
            raise DFQError(f"train.ema_decay: '{method.name}' trains Q's BatchNorm statistics, which follow Q's own "
                           "weights, not their average")  # fmt: skip
        self.average = weight_average(self.student, t.ema_decay)  # before the models are made data-parallel
        self._g_train, self._q_train = self._parallelize()
        self.streams = NoiseStreams(seed, t.shards, t.batch_size, self.dist)

    def _parallelize(self) -> tuple[nn.Module, nn.Module]:
        """G and Q as their updates run them: with several processes, global-batch BatchNorms in G (and in Q where
        it trains them), global activation ranges, and both in DistributedDataParallel."""
        if not self.dist.active:
            return self.generator, self.student
        sync_batchnorms(self.generator, self.dist)
        if self.method.student_bn_train:
            sync_batchnorms(self.student, self.dist)
        for _, q in act_quantizers(self.student):
            q.reduce_range = self.dist.global_range
        return self.dist.wrap(self.generator), self.dist.wrap(self.student)

    # ----------------------------------------------------------------------------------------- forwards
    def sample(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Noise (and labels, for a conditional G) of this rank's part of the batch."""
        return self.streams.draw(self.generator.latent_dim, self.num_classes if self.method.conditional else None)

    def images(self, generator: nn.Module, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """G's images as model inputs. Under a fixed input range (the deploy protocol) they are clipped to it, as
        Q's input grid clips them: P's targets and BatchNorm statistics are then computed on the images Q sees
        (unclipped, P would be fitted on pixels Q never gets). G gets no gradient through a clipped pixel."""
        x = to_input_space(generator(z, y), self.input_stats)
        if self.quant.input_range is None:
            return x
        return x.clamp(*self.quant.input_range)

    def teacher_forward(self, x: torch.Tensor, bns: bool) -> tuple[torch.Tensor, torch.Tensor | None, list]:
        """P's logits, BNS loss (``bns`` and a method that uses it) and features; in float32 (``train.fast``)."""
        with contextlib.ExitStack() as stack:
            recorder = stack.enter_context(self.bns) if bns and self.bns else None
            feats = stack.enter_context(_capture(self.teacher, self.features))
            logits = self.teacher(x)
            bns_value = recorder.loss() if recorder else None
        return logits.float(), bns_value, [f.float() for f in feats]

    def student_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Q's logits and features, Q in DistributedDataParallel in a data-parallel run."""
        with _capture(self.student, self.features) as feats:
            logits = self._q_train(x)
        return logits.float(), [f.float() for f in feats]

    # -------------------------------------------------------------------------------------------- steps
    def generator_step(self) -> tuple[Outputs, Losses]:
        """One step of G on a fresh batch; returns the batch (for Q's step) and G's losses."""
        m = self.method
        z, y = self.sample()
        x = self.images(self._g_train, z, y)
        p_logits, bns, p_feats = self.teacher_forward(x, m.uses_bns)
        q_logits, q_feats = None, None
        if m.generator_uses_student:
            # Gradients reach G through Q's straight-through estimator; Q's own
            # weight gradients would be thrown away, so they are not computed.
            with no_param_grads(self.student):
                q_logits, q_feats = self.student_forward(x)
        out = Outputs(x, y, p_logits, q_logits, bns, p_feats, q_feats)
        with _float32(self.device):
            losses = m.generator_loss(_global(self.dist, out))
        self.g_opt.zero_grad(set_to_none=True)
        check_finite(losses["loss"], "generator loss", self.dist)
        losses["loss"].backward()
        check_grads(self.g_opt, "generator gradient")
        self.g_opt.step()
        return out, losses

    @torch.no_grad()
    def fresh_batch(self) -> Outputs:
        """A new batch from G (no gradient to G) with P's outputs, for a Q step of its own."""
        z, y = self.sample()
        x = self.images(self.generator, z, y)
        p_logits, _, p_feats = self.teacher_forward(x, bns=False)
        return Outputs(x, y, p_logits, p_feats=p_feats)

    def student_step(self, batch: Outputs, train_q: bool) -> Losses:
        """Q's loss on ``batch`` (detached from G), and Q's update when ``train_q``."""
        x = self.plugins.student_input(batch.x.detach())
        p_logits, p_feats = batch.p_logits.detach(), batch.p_feats
        if self.plugins.retargets(train_q):
            p_logits, p_feats = self._teacher_targets(x, batch.y, train_q)
        p_feats = [f.detach() for f in p_feats] if p_feats else p_feats
        with torch.set_grad_enabled(train_q), self.plugins.student_scope():
            q_logits, q_feats = self.student_forward(x)
            out = Outputs(x, batch.y, p_logits, q_logits, None, p_feats, q_feats)
            with _float32(self.device):
                losses = self.student_losses(out)
        check_finite(losses["loss"], "quantized-model loss", self.dist)
        if train_q:
            opts = self.student_optimizers()
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            for opt in opts:
                check_grads(opt, "quantized-model gradient")
                opt.step()
            self.average.update()
        return losses

    def _teacher_targets(self, x: torch.Tensor, y: torch.Tensor | None, train_q: bool) -> tuple:
        """P's logits and features on the images of Q's step (what the plug-ins' scopes also record)."""
        with torch.no_grad(), self.plugins.teacher_scope(train_q):
            logits, _, feats = self.teacher_forward(x, bns=False)
        self.plugins.after_teacher(logits, y)
        return logits.detach(), feats

    def student_losses(self, out: Outputs) -> Losses:
        """The method's Q loss plus the plug-ins' terms."""
        return self.plugins.student_losses(out, lambda o: self.method.student_loss(_global(self.dist, o)))

    def student_optimizers(self) -> list[torch.optim.Optimizer]:
        """Q's SGD and the plug-ins' optimizers stepped with it."""
        return [self.q_opt, *self.plugins.optimizers()]

    def observing(self) -> bool:
        """Whether Q's forwards still move activation ranges (the observation window)."""
        return any(q.get_mode() is ActMode.OBSERVE for _, q in act_quantizers(self.student))

    def shares_forward(self, train_q: bool) -> bool:
        """Whether :meth:`shared_step` replaces the G step and Q step: AdaSG/AdaDFQ's Q step runs Q on the same
        images with the same weights as their G step, so outside the observation window (where every forward
        moves the ranges) one forward serves both."""
        m = self.method
        return (
            not self.dist.active  # its gradients are routed with autograd.grad, which DDP does not see
            and train_q
            and m.generator_uses_student
            and not m.student_bn_train
            and not self.plugins.changes_student_input
            and not self.observing()
        )

    def shared_step(self) -> Losses:
        """One G step and one Q step from a single Q forward: exactly :meth:`generator_step` then
        :meth:`student_step` on its batch, the gradients routed with ``autograd.grad`` so that G gets only its
        own (through Q's STE) and Q only its own. Returns the logs."""
        m = self.method
        z, y = self.sample()
        x = self.images(self.generator, z, y)
        p_logits, bns, p_feats = self.teacher_forward(x, m.uses_bns)
        q_logits, q_feats = self.student_forward(x)
        with _float32(self.device):
            g_losses = m.generator_loss(Outputs(x, y, p_logits, q_logits, bns, p_feats, q_feats))
        detached = [f.detach() for f in p_feats] if p_feats else p_feats
        q_out = Outputs(x.detach(), y, p_logits.detach(), q_logits, None, detached, q_feats)
        with _float32(self.device):
            q_losses = self.student_losses(q_out)
        check_finite(g_losses["loss"], "generator loss")
        check_finite(q_losses["loss"], "quantized-model loss")
        q_opts = self.student_optimizers()
        _route(g_losses["loss"], [self.g_opt], retain=True, what="generator gradient")
        _route(q_losses["loss"], q_opts, retain=False, what="quantized-model gradient")
        for opt in (self.g_opt, *q_opts):
            opt.step()
        self.average.update()
        return self.logs(g_losses, q_losses)

    def generator_then_student(self, train_q: bool) -> Losses:
        """The default iteration: G's step, then Q's step on the same batch; returns the logs."""
        if self.shares_forward(train_q):
            return self.shared_step()
        batch, g_losses = self.generator_step()
        # In warm-up the official loops still compute Q's loss (no step): for a method whose G step already ran Q,
        # that forward only matters while it moves the ranges, so it is skipped once they are frozen.
        q_losses = None
        if train_q or not self.method.generator_uses_student or self.observing():
            q_losses = self.student_step(batch, train_q)
        return self.logs(g_losses, q_losses)

    @staticmethod
    def logs(g_losses: Losses, q_losses: Losses | None) -> Losses:
        """An iteration's logged values: G's losses as ``g_*``, the last Q step's as ``q_*``."""
        logs = {f"g_{k}": v.detach() for k, v in g_losses.items()}
        logs.update({f"q_{k}": v.detach() for k, v in (q_losses or {}).items()})
        return logs

    def precision(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast with ``train.fast``, else nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.train.fast)

    def iteration(self, train_q: bool) -> Losses:
        """One iteration of the method, in the run's precision; returns the logs."""
        with self.precision():
            return self.method.iteration(self, train_q)

    # ----------------------------------------------------------------------------- evaluation, the end
    @contextlib.contextmanager
    def evaluated(self) -> Iterator[nn.Module]:
        """Q as the run would return it: ranges frozen (real data never moves them), BatchNorms in eval mode,
        the rounding fixed, the averaged weights and the layout Q is saved in (in channels-last, sums in
        another order flip a few images at code boundaries). Q trains on as before after the block."""
        modes = [(q, q.get_mode()) for _, q in act_quantizers(self.student) if q.get_mode() is not ActMode.LEARNED]
        was_training = self.student.training
        for q, _ in modes:
            q.set_mode(ActMode.FROZEN)
        self.student.eval()
        self.student.to(memory_format=torch.contiguous_format)
        try:
            with self.plugins.evaluation_scope(), self.average.swapped_in():
                yield self.student
        finally:
            self.student.to(memory_format=torch.channels_last)
            self.student.train(was_training)
            for q, mode in modes:
                q.set_mode(mode)

    def finish(self) -> nn.Module:
        """Q as an ordinary model: learned quantizers fixed, one process's modules, the averaged weights, the
        contiguous layout. The game ends here."""
        self.plugins.end()
        local_batchnorms(self.student)
        for _, q in act_quantizers(self.student):
            q.reduce_range = None
        self.average.apply()
        return self.student.to(memory_format=torch.contiguous_format)

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The game's resumable state (tensors not copied; the streams gathered from every rank)."""
        return {
            "student": self.student.state_dict(),
            "generator": self.generator.state_dict(),
            "q_opt": self.q_opt.state_dict(),
            "g_opt": self.g_opt.state_dict(),
            **self.plugins.state_dict(),
            "ema": self.average.state(),
            "sampler": self.streams.state(),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.plugins.load_state_dict(saved, self.student)  # the learned quantizers' phase first
        self.student.load_state_dict(saved["student"])
        self.generator.load_state_dict(saved["generator"])
        # load_state_dict keeps the given tensors: copies, so training never writes into the saved state
        self.q_opt.load_state_dict(copy.deepcopy(saved["q_opt"]))
        self.g_opt.load_state_dict(copy.deepcopy(saved["g_opt"]))
        self.streams.load_state(saved["sampler"])
        self.average.load_state(saved.get("ema"))


def _players(
    method: Any, teacher: nn.Module, quant: QuantConfig, num_classes: int, input_size: tuple[int, int, int]
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """P (a frozen copy: the caller's model keeps its flags and mode), Q (trainable) and G, in this order
    (Q's and G's construction draw from the global stream)."""
    p = copy.deepcopy(teacher).eval()
    for param in p.parameters():
        param.requires_grad_(False)
    q = quantize_model(teacher, quant)
    for param in q.parameters():
        param.requires_grad_(True)
    q.train(method.student_bn_train)
    return p, q, _generator(method, num_classes, input_size).train()


def _generator(method: Any, num_classes: int, input_size: tuple[int, int, int]) -> nn.Module:
    gc = method.config.generator
    c, h, w = input_size
    if h != w:
        raise DFQError(f"the generators make square images; the model expects {h}x{w}")
    name = gc.pick(h)
    gen = create_generator(name, num_classes, h, gc.latent_dim, channels=c)
    if getattr(gen, "conditional", True) != method.conditional:
        kind = "conditional" if method.conditional else "unconditional"
        raise DFQError(f"method '{method.name}' needs a {kind} generator, '{name}' is not")
    return gen


def _route(loss: torch.Tensor, opts: list[torch.optim.Optimizer], retain: bool, what: str) -> None:
    """Set the gradients of ``loss`` on exactly the parameters of ``opts``, and check them."""
    params = [p for opt in opts for group in opt.param_groups for p in group["params"]]
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    for opt in opts:
        check_grads(opt, what)


@contextlib.contextmanager
def _capture(model: nn.Module, names: list[str]) -> Iterator[list[torch.Tensor]]:
    """Record the outputs of the modules ``names`` during a forward (in the yielded list, on exit)."""
    feats: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda _m, _i, o, n=n: feats.__setitem__(n, o)) for n in names]
    out: list[torch.Tensor] = []
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
        missing = [n for n in names if n not in feats]
        if missing and feats:
            raise DFQError(f"feature layer(s) {', '.join(missing)} were not called during the forward pass")
        out.extend(feats[n] for n in names if n in feats)


def _global(dist: DistContext, out: Outputs) -> Outputs:
    """The method's view of the batch: logits, labels and label weights of the global batch
    (images, BNS and feature maps stay this rank's; every loss on them is a per-sample mean)."""
    if not dist.active:
        return out
    return Outputs(out.x, _gather(dist, out.y), dist.gather(out.p_logits), _gather(dist, out.q_logits), out.bns,
                   out.p_feats, out.q_feats, _gather(dist, out.label_mask))  # fmt: skip


def _gather(dist: DistContext, t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else dist.gather(t)


def _float32(device: torch.device) -> contextlib.AbstractContextManager:
    """Losses in float32 even inside fast mode's autocast (their inputs are float32 already)."""
    return torch.autocast(device.type, enabled=False)
