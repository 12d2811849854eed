"""Top-k accuracy of a classifier over batches of (images, labels).

It takes any iterable of batches, so it never depends on how real data is read.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    total: int | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> dict[str, float | int]:
    """Return ``{"top1": %, "top5": %, "n": images}`` (top-5 is top-min(5, C)).

    The model is put in eval mode for the pass and restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device  # parameter-free wrappers (ONNX) run on CPU
    correct1 = correct5 = n = 0
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices  # (N, k)
            hits = topk.eq(y[:, None])
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            n += len(y)
            bar.update(len(y))
    model.train(was_training)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "n": 0}
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "n": n}
