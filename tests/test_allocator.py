"""The CLI's allocator set-up: large tensors come from the reused heap, not from fresh kernel pages."""

import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest

from dfq.utils.allocator import reuse_freed_memory


def _has_mallinfo2() -> bool:
    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2")


# glibc's mallinfo2: hblkhd counts the bytes of blocks served by mmap, outside the heap
_CHILD = """
import ctypes, ctypes.util, sys, torch
from dfq.utils.allocator import reuse_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Info
tuned = reuse_freed_memory() if sys.argv[1] == "tuned" else False
before = libc.mallinfo2().hblkhd
x = torch.empty(16 * 2**20)  # 64 MB
print(int(tuned), libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc 2.33 or later")
@pytest.mark.parametrize("mode", ["tuned", "defaults"])
def test_a_64_mb_tensor_comes_from_the_heap_once_tuned(mode: str) -> None:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")
    }
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], env=env, capture_output=True, text=True, check=True)
    tuned, mapped = map(int, out.stdout.split())
    if mode == "tuned" and not tuned:
        pytest.skip("this glibc refuses a 1 GiB mmap threshold")
    assert (mapped < 2**20) if tuned else (mapped >= 64 * 2**20)


@pytest.mark.parametrize(("name", "value"), [("MALLOC_MMAP_THRESHOLD_", "131072"),
                                             ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")])  # fmt: skip
def test_the_users_own_allocator_settings_are_left_alone(monkeypatch: pytest.MonkeyPatch, name, value) -> None:
    monkeypatch.setenv(name, value)
    assert reuse_freed_memory() is False


@pytest.mark.parametrize(("argv", "calls"), [(["methods"], 1), (["methods", "--low-memory"], 0)])
def test_the_cli_sets_the_allocator_up_unless_low_memory(monkeypatch: pytest.MonkeyPatch, argv, calls) -> None:
    import dfq.cli

    seen = []
    monkeypatch.setattr(dfq.cli, "reuse_freed_memory", lambda: seen.append(1) or True)
    assert dfq.cli.main(argv) == 0
    assert len(seen) == calls
