"""Plug-ins that any generator-based method can switch on (``plugins:`` in a run config).

From SynQ (Kim et al., ICLR 2025): a Fourier low-pass filter on the images Q trains on,
soft labels only for hard samples, and Grad-CAM alignment between P and Q. From the
post-training line (LSQ, Esser et al. 2020; AdaRound, Nagel et al. 2020; Genie): learned
activation steps, and learned weight rounding with learned weight steps in place of
training the weights. Each is off by default, so every method keeps its published math.

Each plug-in is a hook object (:class:`Plugin`): the game calls the same hooks at fixed points of Q's
step and of the schedule, and a plug-in overrides the ones it needs, so no game code names a plug-in.
The Grad-CAM math is in :mod:`dfq.train.gradcam`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dfq.errors import DFQError
from dfq.generators import lowpass
from dfq.quant import act_quantizers, weight_quantizers
from dfq.quant.learning import BetaSchedule, QuantizerLearning, linear_anneal
from dfq.registry import Registry
from dfq.train.gradcam import CamProbe, cam_loss, grad_cam
from dfq.train.outputs import Outputs

__all__ = [
    "CamAlignment",
    "HardLabels",
    "LearnedQuantizers",
    "LowPass",
    "Plugin",
    "PluginConfig",
    "Plugins",
    "build_plugins",
    "easy_mask",
    "masked_ce",
]


@dataclass
class PluginConfig:
    """Attributes:
    lowpass: Gaussian low-pass filter on the images of Q's step, its standard deviation as a
        fraction of the Nyquist frequency (SynQ); P's targets are computed on the filtered images. 0: off.
    hard_tau: difficulty threshold τ (SynQ): Q's cross-entropy to the sampled label is kept only for
        samples with ``1 − p_P(y) ≤ τ``; harder samples learn from P's soft outputs alone. ``None``: off.
    hard_ce_weight: weight of that cross-entropy for methods whose Q loss has none (AdaSG, AdaDFQ).
    cam_weight: weight of the Grad-CAM alignment, the MSE between P's and Q's normalised class-activation
        maps of the sampled class at the input of the global pooling (SynQ). 0: off.
    lsq: learn the activation steps and the per-channel weight steps (LSQ) once Q trains and the ranges are
        frozen; the weights keep training, with LSQ's straight-through gradient (zero outside the clamp range).
    adaround: learn each weight's rounding and the weight steps (AdaRound with LSQ steps, as Genie-M)
        instead of the weights, once the ranges are observed; the rounding is fixed at the end.
    lr_astep, lr_wstep, lr_round: Adam learning rates of the activation steps, weight steps and rounding.
    round_weight: weight of AdaRound's regulariser (its mean over all rounding variables).
    beta: the regulariser's exponent, annealed linearly from the first to the second value.
    """

    lowpass: float = 0.0
    hard_tau: float | None = None
    hard_ce_weight: float = 1.0
    cam_weight: float = 0.0
    lsq: bool = False
    adaround: bool = False
    lr_astep: float = 4e-5
    lr_wstep: float = 1e-5
    lr_round: float = 1e-3
    round_weight: float = 0.1
    beta: tuple[float, float] = (20.0, 2.0)

    def __post_init__(self) -> None:
        if not 0 <= self.lowpass <= 1:
            raise DFQError(f"plugins.lowpass must be in [0, 1], got {self.lowpass}")
        if self.hard_tau is not None and not 0 <= self.hard_tau <= 1:
            raise DFQError(f"plugins.hard_tau must be in [0, 1], got {self.hard_tau}")
        for key in ("hard_ce_weight", "cam_weight", "lr_astep", "lr_wstep", "lr_round", "round_weight"):
            if not getattr(self, key) >= 0:
                raise DFQError(f"plugins.{key} must be >= 0, got {getattr(self, key)}")
        self.beta = tuple(float(b) for b in self.beta)  # type: ignore[assignment]
        if len(self.beta) != 2 or not all(b > 0 for b in self.beta):
            raise DFQError(f"plugins.beta must be two positive values, got {self.beta}")

    def check(self, quant: Any) -> None:
        """Learned weight steps live in a stored grid: refuse a quantization config without one."""
        if self.learns_quantizers and quant.weight_scales not in (None, "stored"):
            raise DFQError("plugins.lsq and plugins.adaround learn the weight steps: set quant.weight_scales: stored")

    @property
    def learns_quantizers(self) -> bool:
        return self.lsq or self.adaround

    @property
    def changes_student_input(self) -> bool:
        """The Q step needs its own forwards of P and Q (it cannot reuse the generator step's)."""
        return bool(self.lowpass) or bool(self.cam_weight)


def easy_mask(p_logits: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """1.0 for the samples P finds easy (``1 − p_P(y) ≤ τ``), 0.0 for the hard ones."""
    p_y = F.softmax(p_logits.detach().float(), dim=1).gather(1, y[:, None]).squeeze(1)
    return (1 - p_y <= tau).to(p_logits.dtype)


def masked_ce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy averaged over the whole batch, counting only the samples where ``mask`` is 1."""
    if mask is None:
        return F.cross_entropy(logits, y)
    return (F.cross_entropy(logits, y, reduction="none") * mask).mean()


# -------------------------------------------------------------------------------------------- hooks
class Plugin:
    """A plug-in as hooks on Q's step and on the schedule; every hook does nothing by default."""

    changes_student_input: ClassVar[bool] = False  # Q's step needs its own forwards of P and Q (no shared one)

    def student_input(self, x: torch.Tensor) -> torch.Tensor:
        """The images of Q's step."""
        return x

    def retargets(self, train_q: bool) -> bool:
        """Whether P's targets are recomputed on those images (else the generator batch's are reused)."""
        return False

    def teacher_scope(self, train_q: bool) -> contextlib.AbstractContextManager:
        """Around that forward of P (which runs without gradients unless a scope enables them)."""
        return contextlib.nullcontext()

    def after_teacher(self, logits: torch.Tensor, y: torch.Tensor | None) -> None:
        """After that forward, with P's logits and the sampled labels."""

    def student_scope(self) -> contextlib.AbstractContextManager:
        """Around Q's forward in its step."""
        return contextlib.nullcontext()

    def prepare(self, out: Outputs) -> None:
        """Before the method's Q loss sees ``out``."""

    def logged(self, out: Outputs) -> dict[str, torch.Tensor]:
        """Values logged with Q's losses (not optimised)."""
        return {}

    def terms(self, out: Outputs) -> dict[str, torch.Tensor]:
        """Terms added to Q's loss."""
        return {}

    def begin_epoch(self, epoch: int, lr_scale: float) -> None:
        """At the start of every epoch, after the ranges' mode is set."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimizers stepped with Q's."""
        return []

    def evaluation_scope(self) -> contextlib.AbstractContextManager:
        """Around an evaluation of Q: Q as the run would end."""
        return contextlib.nullcontext()

    def end(self) -> None:
        """At the end of the run (and before a restore): leave an ordinary Q."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this plug-in (top-level keys of the checkpoint)."""
        return {}

    def load_state_dict(self, saved: dict[str, Any], student: nn.Module) -> None:
        """Bring Q to the checkpoint's phase, before Q's own state is loaded."""


class LowPass(Plugin):
    """``plugins.lowpass`` (SynQ): Q trains on low-passed images, against P's outputs on the same images."""

    changes_student_input = True

    def __init__(self, cutoff: float) -> None:
        self.cutoff = cutoff

    def student_input(self, x: torch.Tensor) -> torch.Tensor:
        return lowpass(x, self.cutoff)

    def retargets(self, train_q: bool) -> bool:
        return True


class HardLabels(Plugin):
    """``plugins.hard_tau`` (SynQ): Q's cross-entropy to the sampled label only on the samples P finds easy;
    a method without such a term (``label_ce`` false) gets one, weighted ``hard_ce_weight``."""

    def __init__(self, tau: float, ce_weight: float, method_has_ce: bool) -> None:
        self.tau, self.ce_weight, self.method_has_ce = tau, ce_weight, method_has_ce

    def prepare(self, out: Outputs) -> None:
        out.label_mask = easy_mask(out.p_logits, out.y, self.tau)

    def logged(self, out: Outputs) -> dict[str, torch.Tensor]:
        return {"easy_frac": out.label_mask.mean()}

    def terms(self, out: Outputs) -> dict[str, torch.Tensor]:
        if self.method_has_ce or not self.ce_weight:  # the method's own cross-entropy reads the mask
            return {}
        return {"easy_ce": self.ce_weight * masked_ce(out.q_logits, out.y, out.label_mask)}


class CamAlignment(Plugin):
    """``plugins.cam_weight`` (SynQ): while Q trains, the MSE between P's and Q's normalised Grad-CAM maps of the
    sampled class on the images of Q's step. P's maps are held from P's forward to Q's loss of the same step."""

    changes_student_input = True

    def __init__(self, weight: float, teacher: nn.Module, student: nn.Module) -> None:
        self.weight = weight
        self.p_probe, self.q_probe = CamProbe(teacher, leaf=True), CamProbe(student, leaf=False)
        self.p_cam: torch.Tensor | None = None
        self._mapping = False

    def retargets(self, train_q: bool) -> bool:
        return train_q

    @contextlib.contextmanager
    def teacher_scope(self, train_q: bool) -> Iterator[None]:
        self.p_cam, self._mapping = None, train_q
        if not train_q:
            yield
            return
        with torch.enable_grad(), self.p_probe.capture():  # P's maps are leaves: only its head is differentiated
            yield

    def after_teacher(self, logits: torch.Tensor, y: torch.Tensor | None) -> None:
        if self._mapping:
            self.p_cam = grad_cam(logits, self.p_probe.feats, y, create_graph=False)

    def student_scope(self) -> contextlib.AbstractContextManager:
        return self.q_probe.capture() if self.p_cam is not None else contextlib.nullcontext()

    def terms(self, out: Outputs) -> dict[str, torch.Tensor]:
        p_cam, self.p_cam = self.p_cam, None
        if p_cam is None or not torch.is_grad_enabled():
            return {}
        q_cam = grad_cam(out.q_logits, self.q_probe.feats, out.y, create_graph=True)
        return {"cam": self.weight * cam_loss(p_cam, q_cam)}


class LearnedQuantizers(Plugin):
    """``plugins.lsq`` / ``plugins.adaround``: once Q trains and the ranges are frozen (``start_epoch``), Q's
    steps (and rounding) learn with their own Adam (:mod:`dfq.quant.learning`); AdaRound's regulariser,
    averaged over the rounding variables, has its β annealed linearly over Q's learning iterations, read
    from ``clock`` (the run's global iteration)."""

    def __init__(
        self, config: PluginConfig, student: nn.Module, *, start_epoch: int, epochs: int, iters_per_epoch: int,
        clock: Callable[[], int],
    ) -> None:  # fmt: skip
        acts = [q for _, q in act_quantizers(student) if not q.spec.is_noop] if config.lsq else []
        self.learning = QuantizerLearning(weight_quantizers(student), acts)
        self.config, self.start_epoch, self.clock = config, start_epoch, clock
        self.start_step = start_epoch * iters_per_epoch
        self.beta = BetaSchedule(config.beta, (epochs - start_epoch) * iters_per_epoch, linear_anneal)
        self.opt: torch.optim.Adam | None = None

    def begin_epoch(self, epoch: int, lr_scale: float) -> None:
        if self.opt is not None:
            for group in self.opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale  # constant, lowered only by rollbacks
        elif epoch >= self.start_epoch:
            self._begin(lr_scale)

    def _begin(self, lr_scale: float) -> None:
        c = self.config
        if c.adaround:
            for layer, wq in self.learning.weights:
                wq.store(layer.weight)  # rounding learns on the grid of the weights Q has now
        learned = self.learning.begin(rounding=c.adaround)
        kinds = ((learned.act_steps, c.lr_astep), (learned.weight_steps, c.lr_wstep), (learned.rounding, c.lr_round))
        self.opt = torch.optim.Adam([{"params": ps, "lr": lr * lr_scale, "base_lr": lr} for ps, lr in kinds if ps])

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [] if self.opt is None else [self.opt]

    def terms(self, out: Outputs) -> dict[str, torch.Tensor]:
        if not (self.config.adaround and self.opt is not None):
            return {}
        beta = self.beta(self.clock() - self.start_step)
        return {"round": self.config.round_weight * self.learning.rounding_loss(beta, reduction="mean")}

    @contextlib.contextmanager
    def evaluation_scope(self) -> Iterator[None]:
        soft = [wq for _, wq in self.learning.weights if wq.soft_rounding]
        for wq in soft:
            wq.soft_rounding = False  # the rounding the model would end with
        try:
            yield
        finally:
            for wq in soft:
                wq.soft_rounding = True

    def end(self) -> None:
        if self.opt is not None:
            self.learning.end()
            self.opt = None

    def state_dict(self) -> dict[str, Any]:
        return {"qp_opt": None if self.opt is None else self.opt.state_dict()}

    def load_state_dict(self, saved: dict[str, Any], student: nn.Module) -> None:
        """The learned parameters exist only while they learn: end the phase, or open it from the checkpoint's
        weights and grids (the learning rates come with the optimizer's state)."""
        self.end()
        if saved.get("qp_opt") is not None:
            student.load_state_dict(saved["student"], strict=False)
            self._begin(lr_scale=1.0)
            self.opt.load_state_dict(copy.deepcopy(saved["qp_opt"]))


class Plugins:
    """The run's plug-ins; each hook is called on all of them, in order (their terms are added in that order)."""

    def __init__(self, items: list[Plugin]) -> None:
        self.items = items

    @property
    def changes_student_input(self) -> bool:
        return any(p.changes_student_input for p in self.items)

    def student_input(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.items:
            x = p.student_input(x)
        return x

    def retargets(self, train_q: bool) -> bool:
        return any(p.retargets(train_q) for p in self.items)

    def teacher_scope(self, train_q: bool) -> contextlib.AbstractContextManager:
        return _all(p.teacher_scope(train_q) for p in self.items)

    def after_teacher(self, logits: torch.Tensor, y: torch.Tensor | None) -> None:
        for p in self.items:
            p.after_teacher(logits, y)

    def student_scope(self) -> contextlib.AbstractContextManager:
        return _all(p.student_scope() for p in self.items)

    def student_losses(self, out: Outputs, method_loss: Callable[[Outputs], dict]) -> dict[str, torch.Tensor]:
        """The method's Q loss on ``out`` plus the plug-ins' terms (and their logged values)."""
        for p in self.items:
            p.prepare(out)
        losses = method_loss(out)
        logged = {k: v for p in self.items for k, v in p.logged(out).items()}
        terms = {k: v for p in self.items for k, v in p.terms(out).items()}
        return {**losses, **logged, **terms, "loss": losses["loss"] + sum(terms.values())}

    def begin_epoch(self, epoch: int, lr_scale: float) -> None:
        for p in self.items:
            p.begin_epoch(epoch, lr_scale)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [opt for p in self.items for opt in p.optimizers()]

    def evaluation_scope(self) -> contextlib.AbstractContextManager:
        return _all(p.evaluation_scope() for p in self.items)

    def end(self) -> None:
        for p in self.items:
            p.end()

    def state_dict(self) -> dict[str, Any]:
        return {k: v for p in self.items for k, v in p.state_dict().items()}

    def load_state_dict(self, saved: dict[str, Any], student: nn.Module) -> None:
        for p in self.items:
            p.load_state_dict(saved, student)


@contextlib.contextmanager
def _all(scopes: Iterable[contextlib.AbstractContextManager]) -> Iterator[None]:
    """Enter ``scopes`` in order (each made as it is entered) and leave them in reverse."""
    with contextlib.ExitStack() as stack:
        for scope in scopes:
            stack.enter_context(scope)
        yield


@dataclass
class PluginContext:
    """What a plug-in factory may read: its config, the method, the schedule, P and Q, and the run's clock."""

    config: PluginConfig
    method: Any
    train: Any
    teacher: nn.Module
    student: nn.Module
    start: int  # the epoch Q trains on frozen ranges
    clock: Callable[[], int]


# name -> factory returning the plug-in its config switches on (or None); hooks run in registration order.
PLUGINS = Registry[Callable[[PluginContext], "Plugin | None"]]("plug-in")
PLUGINS.add("lowpass", lambda c: LowPass(c.config.lowpass) if c.config.lowpass else None)
PLUGINS.add("hard_tau", lambda c: None if c.config.hard_tau is None else HardLabels(
    c.config.hard_tau, c.config.hard_ce_weight, c.method.label_ce))  # fmt: skip
PLUGINS.add("cam", lambda c: CamAlignment(c.config.cam_weight, c.teacher, c.student) if c.config.cam_weight else None)
PLUGINS.add("learned_quantizers", lambda c: LearnedQuantizers(
    c.config, c.student, start_epoch=c.start, epochs=c.train.epochs, iters_per_epoch=c.train.iters_per_epoch,
    clock=c.clock) if c.config.learns_quantizers else None)  # fmt: skip


def build_plugins(
    config: PluginConfig, *, method: Any, train: Any, teacher: nn.Module, student: nn.Module, distributed: bool,
    clock: Callable[[], int],
) -> Plugins:  # fmt: skip
    """The plug-ins ``config`` switches on, for ``method`` under the schedule ``train``; refuses with one clear
    error a combination that would fail mid-run or be silently ignored."""
    start = max(train.warmup_epochs, train.observe_epochs)  # Q trains and the ranges are frozen
    _check(config, method, train, student, distributed, start)
    ctx = PluginContext(config, method, train, teacher, student, start, clock)
    return Plugins([p for p in (PLUGINS.get(name)(ctx) for name in PLUGINS) if p is not None])


def _check(config: PluginConfig, method: Any, train: Any, student: nn.Module, distributed: bool, start: int) -> None:
    if config.learns_quantizers and train.epochs <= start:
        raise DFQError(
            f"plugins.lsq/adaround start learning at epoch max(warmup_epochs, observe_epochs) = "
            f"{start}, but the run has {train.epochs} epochs"
        )
    weights = list(weight_quantizers(student))
    if config.adaround and not weights:
        raise DFQError("plugins.adaround: the model has no quantized weights (quant.wbits is 32)")
    if config.lsq and not weights and all(q.spec.is_noop for _, q in act_quantizers(student)):
        raise DFQError("plugins.lsq: the model has no quantized weights or activations")
    if (config.hard_tau is not None or config.cam_weight) and not method.conditional:
        raise DFQError(f"plugins.hard_tau and plugins.cam_weight need sampled labels; '{method.name}' has none")
    if config.learns_quantizers and train.ema_decay:
        raise DFQError("train.ema_decay averages Q's weights; plugins.lsq/adaround learn other parameters")
    if distributed and (config.cam_weight or config.learns_quantizers):
        raise DFQError("plugins.cam_weight, plugins.lsq and plugins.adaround run on one process only (for now)")
