"""Generator samples: what a run's generator draws, per class, as a grid of images."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from dfq.models import CIFAR10_CLASSES
from dfq.report.plots import NewFigure, save
from dfq.report.runs import TRAIN_CHECKPOINT, Run, load_run, read_train_checkpoint, rebuild_generator

SAMPLES_PER_CLASS = 8
MAX_CLASSES = 10
SAMPLE_SEED = 0


def generator_samples(run_dir: str | Path, per_class: int = SAMPLES_PER_CLASS) -> dict[str, Any]:
    """Synthetic images from a run's generator (``checkpoint.pt``), de-normalised to [0, 1].

    Conditional generators: ``per_class`` images for each of up to 10 classes (evenly spaced
    over the classes), one row per class; unconditional ones: 64 images. The generator runs in
    train mode (batch statistics, as in training) under ``torch.no_grad()`` with a fixed seed,
    leaving the global random state alone. Returns ``images`` (N, C, H, W), ``classes`` (one per
    row, or ``None``), ``per_row``, ``epoch``/``iteration`` of the checkpoint and ``normalised``
    (False when the model is unknown and mean 0 / std 1 was assumed).
    """
    ckpt = read_train_checkpoint(run_dir)
    config = load_run(run_dir).config
    gen, info = rebuild_generator(config, ckpt["generator"], Path(run_dir) / TRAIN_CHECKPOINT)
    gen.train()  # batch statistics, as the engine runs it
    if getattr(gen, "conditional", True):
        k = min(gen.num_classes, MAX_CLASSES)
        classes = torch.linspace(0, gen.num_classes - 1, k).round().long().unique()
        y, per_row = classes.repeat_interleave(per_class), per_class
    else:
        classes, y, per_row = None, None, 8
    sampler = torch.Generator().manual_seed(SAMPLE_SEED)
    z = torch.randn(len(y) if y is not None else 64, gen.latent_dim, generator=sampler)
    with torch.no_grad():
        x = gen(z, y).float()
    channels = x.shape[1]
    mean, std = (info.mean, info.std) if info is not None else ((0.0,) * channels, (1.0,) * channels)
    x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    return {
        "images": x.clamp(0, 1),
        "classes": classes.tolist() if classes is not None else None,
        "per_row": per_row,
        "epoch": ckpt.get("epoch"),
        "iteration": ckpt.get("iteration"),
        "normalised": info is not None,
        "dataset": info.dataset if info is not None else None,
    }


def _grid(images: torch.Tensor, per_row: int, pad: int) -> torch.Tensor:
    """The images tiled ``per_row`` to a row on a white background, ``pad`` pixels apart."""
    n, c, h, w = images.shape
    rows = math.ceil(n / per_row)
    grid = torch.ones(c, rows * (h + pad) - pad, per_row * (w + pad) - pad)
    for k in range(n):
        r, col = divmod(k, per_row)
        grid[:, r * (h + pad) : r * (h + pad) + h, col * (w + pad) : col * (w + pad) + w] = images[k]
    return grid


def plot_samples(new_figure: NewFigure, run: Run, path: Path) -> Path:
    """The run's generator samples, one row per class (labelled) or an unconditional grid."""
    s = generator_samples(run.path)
    images, per_row = s["images"], s["per_row"]
    n, c, h, _ = images.shape
    rows, pad = math.ceil(n / per_row), max(1, h // 16)
    array = _grid(images, per_row, pad).permute(1, 2, 0).numpy()
    cell = 0.62 if h <= 64 else 1.0
    fig = new_figure(figsize=(per_row * cell + 1.6, rows * cell + 0.9))
    ax = fig.add_subplot()
    ax.imshow(array[..., 0] if c == 1 else array, cmap="gray" if c == 1 else None, interpolation="nearest")
    ax.set_xticks([])
    if s["classes"] is not None:
        names = CIFAR10_CLASSES if s["dataset"] == "cifar10" else None
        ax.set_yticks([r * (h + pad) + h / 2 for r in range(rows)])
        ax.set_yticklabels([f"{y} {names[y]}" if names else f"class {y}" for y in s["classes"]], fontsize=9)
        ax.tick_params(axis="y", length=0)
    else:
        ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"{run.name}: generator samples ({_kind(s)})\ncheckpoint {_where(s)}, seed {SAMPLE_SEED}", fontsize=10)
    return save(fig, path, dpi=130)


def _kind(s: dict[str, Any]) -> str:
    return "one row per class" if s["classes"] is not None else "unconditional"


def _where(s: dict[str, Any]) -> str:
    if s["iteration"]:
        return f"at epoch {s['epoch']}, iteration {s['iteration']}"
    return f"after {s['epoch']} epoch{'s' if s['epoch'] != 1 else ''}"
