"""glibc's allocator set up to reuse the memory of large CPU tensors.

glibc serves a block above its mmap threshold (adaptive, at most 32 MiB) with fresh pages from the kernel and gives
them back on free, so every new activation, gradient or mask of a 224-px model at batch 16 (25-77 MB) page-faults
all of its pages again. Reconstruction on EfficientNet-Lite0 spends most of its time in elementwise operations on
such tensors and runs 1.4-1.6x faster once freed blocks stay in the heap for the next ones (``docs/results.md``,
"Reconstruction speed"). The price is memory: freed blocks stay in the process (``docs/results.md``, "Memory"). The
CLI calls :func:`reuse_freed_memory` at start-up unless ``--low-memory``; Python API users can call it too.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["reuse_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap; up to 1 GiB of free heap top is kept
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB, so that freed large blocks serve the next allocations.

    Returns whether both were set. Does nothing (``False``) off Linux, without glibc's ``mallopt``, where the user
    has chosen these settings (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``) or
    preloads another allocator (an ``LD_PRELOAD`` naming a ``malloc`` library: jemalloc, tcmalloc, mimalloc), and
    where glibc refuses the value (old versions capped the mmap threshold at 32 MiB; 2.36 accepts it).
    """
    preloaded = "malloc" in os.environ.get("LD_PRELOAD", "")
    if not sys.platform.startswith("linux") or preloaded or any(os.environ.get(k) for k in _USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):  # musl and other C libraries without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
