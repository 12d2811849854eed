"""A pickle loader that can read the CIFAR test batches and nothing more dangerous.

The official CIFAR "python" archives are Python-2 pickles. Plain ``pickle.load``
would run whatever callable a tampered file names, so this unpickler resolves
only the three NumPy globals that an ``ndarray`` pickle needs; dicts, lists,
strings and numbers need no globals at all. Anything else is a :class:`DFQError`
raised before the global is even imported.
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import numpy as np

from dfq.errors import DFQError

try:  # NumPy >= 1.26 (and 2.x, where ``numpy.core`` is a deprecated alias)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - NumPy < 1.26
    from numpy.core.multiarray import _reconstruct

__all__ = ["restricted_load", "restricted_loads"]

# (module, name) as written in the pickle -> the object it may resolve to.
# Python-2 era files say ``numpy.core``; files written by NumPy 2 say ``numpy._core``.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose only reachable globals are those in ``_ALLOWED``."""

    def __init__(self, file: IO[bytes], source: str) -> None:
        # latin1 maps Python-2 byte strings 1:1, which is what NumPy expects for array data.
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DFQError(
                f"{self._source}: refusing to unpickle '{module}.{name}' "
                "(only NumPy arrays and plain containers are allowed; the file is not a genuine CIFAR batch)"
            ) from None


def restricted_load(file: IO[bytes], *, source: str = "<pickle>") -> Any:
    """Unpickle ``file`` allowing only NumPy arrays and plain containers.

    ``source`` names the file in error messages. Corrupt or truncated data and
    forbidden globals all raise :class:`DFQError`.
    """
    try:
        return _RestrictedUnpickler(file, source).load()
    except DFQError:
        raise
    except Exception as e:  # any parse failure of untrusted bytes is the file's fault, not ours
        raise DFQError(f"{source}: not a readable pickle, truncated or corrupt ({type(e).__name__}: {e})") from e


def restricted_loads(data: bytes, *, source: str = "<pickle>") -> Any:
    """Like :func:`restricted_load`, for pickle bytes already in memory."""
    return restricted_load(io.BytesIO(data), source=source)
