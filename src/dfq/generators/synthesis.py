"""Images synthesized from a float model alone, by matching its BatchNorm statistics (BNS).

Two synthesizers, both data-free and both usable as calibration data by any toolchain:

- :func:`distill_inputs`: ZeroQ's (Cai et al., CVPR 2020) -- Gaussian noise whose pixels Adam optimises
  against the BNS loss.
- :func:`synthesize_pool`: the pool of dfq's ``recon`` method, in the line of Genie (Jeon et al., CVPR 2023) --
  per-sample 8x8 latent maps and a small decoder (nearest upsampling + 3x3 convolutions, which avoid the
  checkerboard of transposed convolutions) optimised jointly, batch by batch. P's strided convolutions see
  their input shifted by a random pixel ("swing" convolution), which removes the grid artifacts a fixed
  stride lets the images exploit; an optional Fourier low-pass filter smooths the pool (SynQ).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dfq.errors import DFQError
from dfq.generators.bns import BNStatsLoss
from dfq.generators.filters import lowpass as lowpass_filter
from dfq.utils.buffers import pool_tensor
from dfq.utils.state import no_param_grads

__all__ = ["InputStats", "LatentDecoder", "distill_inputs", "synthesize_pool", "to_input_space"]

InputStats = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel mean and std of typical model inputs


def to_input_space(z: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
    """Standardised images ``z`` (what every synthesizer and generator makes: mean 0, std 1) as model inputs,
    ``z * std + mean`` per channel; ``None``: the model takes standardised inputs (the usual mean/std
    normalisation), ``z`` unchanged. A model fed raw pixels (ResNet-8: mean ~125, std ~63) needs the shift:
    its BatchNorm statistics alone barely move noise that starts near 0, and the images would neither span
    the input range nor calibrate it."""
    if stats is None:
        return z
    mean, std = (torch.tensor(v, dtype=z.dtype, device=z.device).view(1, -1, 1, 1) for v in stats)
    return z * std + mean


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The model in eval mode with no parameter gradients inside the block (its flags restored after)."""
    with no_param_grads(model.eval()):
        yield


def _finite(loss: torch.Tensor, step: int) -> torch.Tensor:
    """Stop at the first NaN/Inf loss with one clear error, instead of returning NaN images that calibrate NaN ranges
    (a model whose BatchNorm running variance is 0, or inputs the model overflows on)."""
    if not bool(torch.isfinite(loss)):
        raise DFQError(
            f"synthesis stopped at step {step}: the BatchNorm-statistics loss is {float(loss.detach())} (NaN/Inf); "
            "check the model's BatchNorm statistics, or lower the synthesis learning rate"
        )
    return loss


def distill_inputs(
    teacher: nn.Module,
    input_size: tuple[int, ...],
    num_samples: int,
    *,
    steps: int = 500,
    lr: float = 0.5,
    generator: torch.Generator | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    input_stats: InputStats | None = None,
) -> torch.Tensor:
    """ZeroQ's distilled inputs: ``num_samples`` Gaussian images optimised with Adam against the BNS loss
    (standardised pixels are optimised, fed through :func:`to_input_space` with ``input_stats``)."""
    device = next(teacher.parameters()).device
    x = torch.randn((num_samples, *input_size), generator=generator).to(device).requires_grad_()
    opt = torch.optim.Adam([x], lr=lr)
    with _frozen(teacher), BNStatsLoss(teacher) as bns, tqdm(range(steps), desc="distil", disable=not progress) as bar:
        for step in bar:
            opt.zero_grad(set_to_none=True)
            teacher(to_input_space(x, input_stats))
            loss = _finite(bns.loss(), step)
            loss.backward()
            opt.step()
            if step % 25 == 0 or step == steps - 1:
                value = loss.item()
                bar.set_postfix(bns=f"{value:.4f}")
                if on_step:
                    on_step(step, value)
    return to_input_space(x.detach(), input_stats)


class LatentDecoder(nn.Module):
    """Per-sample 8x8 latent maps -> images, by nearest upsampling and 3x3 convolutions."""

    def __init__(self, num: int, image_size: tuple[int, int, int], channels: int = 32, generator=None) -> None:
        super().__init__()
        c, h, w = image_size
        self.latents = nn.Parameter(torch.randn(num, channels, max(h // 4, 1), max(w // 4, 1), generator=generator))
        self.size = (h, w)
        self.net = nn.Sequential(
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.BatchNorm2d(2 * channels),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(0.2),
            nn.Upsample(size=(h, w)),
            nn.Conv2d(channels, c, 3, padding=1),
            nn.BatchNorm2d(c, affine=False),  # unit-variance images, like normalised inputs
        )

    def forward(self) -> torch.Tensor:
        return self.net(self.latents)


class _Swing:
    """Forward pre-hooks that shift the input of strided convolutions by a random pixel (reflect padded)."""

    def __init__(self, model: nn.Module, generator: torch.Generator) -> None:
        self.convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
        self.generator = generator

    def __enter__(self) -> _Swing:
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.convs]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        dy, dx = torch.randint(0, 3, (2,), generator=self.generator).tolist()
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return (padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]],)


def synthesize_pool(
    teacher: nn.Module,
    input_size: tuple[int, int, int],
    num_samples: int,
    *,
    batch: int = 128,
    steps: int = 150,
    lr: float = 0.05,
    swing: bool = True,
    lowpass: float = 0.0,
    label_weight: float = 0.0,
    normalized: bool = False,
    warm_decoder: bool = False,
    generator: torch.Generator,
    progress: bool = True,
    input_stats: InputStats | None = None,
    spill_bytes: int | None = None,
) -> torch.Tensor:
    """``num_samples`` images, ``batch`` at a time, each batch's latents and decoder optimised for ``steps``
    Adam steps (cosine learning rate from ``lr``) against P's BNS loss, plus ``label_weight`` times P's
    cross-entropy to a label assigned in turn (a class-balanced pool; 0: BNS only, as Genie); ``normalized``: the
    BNS loss in units of each BatchNorm's running standard deviation (:class:`BNStatsLoss`); ``warm_decoder``:
    every batch after the first starts from the decoder weights the previous batch ended with (its latents and
    Adam state fresh), so later batches reach a lower BNS loss in the same steps. The decoder makes standardised
    images, mapped by :func:`to_input_space` with ``input_stats``. A pool over ``spill_bytes`` lives in a
    memory-mapped temporary file (:func:`dfq.utils.buffers.pool_tensor`)."""
    pool = pool_tensor((num_samples, *input_size), spill_bytes=spill_bytes)
    starts = range(0, num_samples, batch)
    bar = tqdm(total=len(starts) * steps, desc="synthesize", disable=not progress)
    previous: dict[str, torch.Tensor] | None = None
    with _frozen(teacher), BNStatsLoss(teacher, normalized=normalized) as bns, bar:
        for start in starts:
            n = min(batch, num_samples - start)
            decoder = LatentDecoder(n, input_size, generator=generator)
            if warm_decoder and previous is not None:
                decoder.net.load_state_dict(previous)
            opt = torch.optim.Adam(decoder.parameters(), lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                with _Swing(teacher, generator) if swing else contextlib.nullcontext():
                    logits = teacher(to_input_space(decoder(), input_stats))
                loss = bns.loss()
                if label_weight:
                    labels = torch.arange(start, start + n) % logits.shape[1]
                    loss = loss + label_weight * F.cross_entropy(logits, labels)
                _finite(loss, bar.n)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
            bar.set_postfix(bns=f"{loss.item():.4f}")
            previous = decoder.net.state_dict()
            with torch.no_grad():
                images = to_input_space(decoder(), input_stats)  # batch statistics, as optimised
                pool[start : start + n] = lowpass_filter(images, lowpass) if lowpass else images
    return pool
