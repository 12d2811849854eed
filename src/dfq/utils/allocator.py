"""glibc's allocator set up to reuse the memory of large CPU tensors.

glibc serves a block above its mmap threshold (adaptive, at most 32 MB) with fresh pages from the kernel and gives
them back on free, so every new activation tensor of a 224-px model at batch 16 (25-77 MB) page-faults all of its
pages again: an elementwise operation that allocates its output took 22 ms on such a tensor, and 3 ms once freed
blocks stay in the heap for the next one. ``recon`` on EfficientNet-Lite0 spends most of its time in such
operations (``docs/results.md``, "Reconstruction speed"). The price is memory: freed blocks stay in the process
(0.67 GB more peak anonymous memory for ``recon`` on ResNet-18 at 224 px). The CLI calls :func:`reuse_freed_memory`
at start-up unless ``--low-memory``; Python API users can call it too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["reuse_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap; up to 1 GiB of free heap top is kept
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB, so that freed large blocks serve the next allocations.

    Does nothing (and returns ``False``) off Linux, without glibc's ``mallopt``, or where the user has chosen the
    allocator's settings already (the ``MALLOC_*_`` variables, ``GLIBC_TUNABLES``, or a preloaded allocator). Memory
    freed at the top of the heap returns to the system only beyond 1 GiB, so the resident size after a peak stays
    higher than with the defaults.
    """
    if not sys.platform.startswith("linux") or any(os.environ.get(name) for name in _USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):  # musl and other C libraries without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
