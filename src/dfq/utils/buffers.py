"""Pool-sized tensors that the operating system may page out.

A synthetic pool at 224 px and the activations ``recon`` keeps for it at a unit boundary grow with the number of
images (about 2.5 GB for 1,024 images in ResNet-18's first stage). Above a size, such a tensor is backed by a
memory-mapped temporary file instead of anonymous memory: its pages are then file cache, which the kernel writes
back and drops under memory pressure (as AIMET's AdaRound caches layer activations on disk), so a run fits in a
memory limit whatever the pool size. The file is unlinked as soon as it is mapped: nothing is left behind, even
when the process is killed.
"""

from __future__ import annotations

import math
import os
import tempfile

import torch

from dfq.errors import DFQError

__all__ = ["pool_tensor"]


def pool_tensor(shape: tuple[int, ...], *, spill_bytes: int | None) -> torch.Tensor:
    """An uninitialised float32 tensor of ``shape``, in memory up to ``spill_bytes`` bytes (``None``: always) and
    beyond that in a memory-mapped temporary file under ``TMPDIR``."""
    numel = math.prod(shape)
    if spill_bytes is None or numel * 4 <= spill_bytes:
        return torch.empty(shape)
    try:
        fd, path = tempfile.mkstemp(prefix="dfq-activations-", suffix=".bin")
        try:
            os.posix_fallocate(fd, 0, numel * 4)  # the disk space now, not a SIGBUS when it runs out
        finally:
            os.close(fd)
        try:
            return torch.from_file(path, shared=True, size=numel, dtype=torch.float32).view(shape)
        finally:
            os.unlink(path)
    except OSError as e:
        raise DFQError(f"cannot keep {numel * 4 / 2**20:.0f} MB of activations in {tempfile.gettempdir()}: "
                       f"{e.strerror}; set TMPDIR to a disk with room or raise method.spill_mb") from e  # fmt: skip
