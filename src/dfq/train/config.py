"""The game's schedule and generator settings: the ``train`` and ``generator`` keys of a generator-based
method's config section."""

from __future__ import annotations

from dataclasses import dataclass, field

from dfq.errors import DFQError

__all__ = ["GeneratorConfig", "TrainConfig"]


@dataclass
class TrainConfig:
    """The shared schedule of the generator-based methods (GDFQ, ECCV 2020, and its successors).

    Attributes:
        epochs, iters_per_epoch: length of the game; each iteration draws a fresh batch.
        batch_size: generated images per iteration.
        warmup_epochs: epochs in which only G trains (Q's loss is computed, not stepped; AdaSG/AdaDFQ, whose G step
            already ran Q, compute it only while ranges are observed).
        observe_epochs: epochs in which Q's activation ranges are observed; frozen afterwards.
        q_*: Q's SGD (learning rate, momentum, weight decay, Nesterov, per-epoch milestones).
        g_*: G's Adam (learning rate, betas, per-epoch milestones).
        lr_gamma: learning-rate factor at each milestone.
        eval_every: evaluate on the real test set every K epochs (and after the last one).
        checkpoint_every: write a resumable checkpoint every K epochs (and after the last one).
        checkpoint_every_iters: also write one every N iterations (0: only at epoch ends).
        max_rollbacks: on a NaN/Inf loss, gradient or range, return to the last checkpoint at most this often.
        rollback_lr_factor: multiply the learning rates by this at each rollback.
        fast: trade exactness for speed: bfloat16 autocast for the forwards and backwards of G, P and Q and the
            channels-last memory format (quantizers, BNS statistics and losses stay in float32).
        ema_decay: keep an exponential moving average of Q's parameters, updated after every Q step with this
            decay (0: off); evaluations and the returned Q use it. Meant to steady the final model (the game's
            top-1 swings by tenths of a point between epochs); on the AdaDFQ preset it did not (docs/methods.md).
        shards: the batch is this many equal shards, each drawn from its own noise stream, split evenly over the
            processes of a data-parallel run; ``None``: one per process of the launch that starts the run (fixed in
            the run's config.yaml). One process with ``shards: S`` draws exactly the images of S processes.
    """

    epochs: int = 400
    iters_per_epoch: int = 200
    batch_size: int = 16
    warmup_epochs: int = 4
    observe_epochs: int = 4
    q_lr: float = 1e-4
    q_momentum: float = 0.9
    q_weight_decay: float = 1e-4
    q_nesterov: bool = True
    q_milestones: list[int] = field(default_factory=lambda: [100, 200, 300])
    g_lr: float = 1e-3
    g_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    g_milestones: list[int] = field(default_factory=lambda: [100, 200, 300])
    lr_gamma: float = 0.1
    eval_every: int = 1
    checkpoint_every: int = 1
    checkpoint_every_iters: int = 0
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5
    fast: bool = False
    ema_decay: float = 0.0
    shards: int | None = None

    def __post_init__(self) -> None:
        if self.shards is not None and self.shards < 1:
            raise DFQError(f"train.shards must be >= 1, got {self.shards}")
        for key in ("epochs", "iters_per_epoch", "batch_size", "eval_every", "checkpoint_every", "observe_epochs"):
            if getattr(self, key) < 1:
                raise DFQError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_rollbacks < 0 or not 0.0 < self.rollback_lr_factor <= 1.0:
            raise DFQError("train.max_rollbacks must be >= 0 and train.rollback_lr_factor in (0, 1]")
        if self.checkpoint_every_iters < 0:
            raise DFQError(f"train.checkpoint_every_iters must be >= 0, got {self.checkpoint_every_iters}")
        if self.warmup_epochs < 0:
            raise DFQError(f"train.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if len(self.g_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.g_betas):
            raise DFQError(f"train.g_betas must be two values in [0, 1), got {self.g_betas}")
        # The optimizers' own checks, reported as config errors instead of tracebacks mid-run.
        for key in ("q_lr", "g_lr", "q_momentum", "q_weight_decay"):
            if not getattr(self, key) >= 0:
                raise DFQError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.q_nesterov and self.q_momentum <= 0:
            raise DFQError("train.q_nesterov needs train.q_momentum > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise DFQError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.lr_gamma > 0:
            raise DFQError(f"train.lr_gamma must be > 0, got {self.lr_gamma}")


@dataclass
class GeneratorConfig:
    """Attributes:
    name: a registered generator (``cifar``, ``imagenet``, ``unconditional``); ``None``: ``cifar`` for images up
        to 64 pixels, else ``imagenet``.
    latent_dim: noise dimension.
    """

    name: str | None = None
    latent_dim: int = 100

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise DFQError(f"generator.latent_dim must be >= 1, got {self.latent_dim}")

    def pick(self, image_size: int) -> str:
        return self.name or ("cifar" if image_size <= 64 else "imagenet")
