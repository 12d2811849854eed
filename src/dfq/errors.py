"""User-facing errors.

Anything a user can cause (a bad path, a wrong file, an unsupported layer, a bad
bit-width) raises :class:`DFQError` or a subclass. The CLI turns these into one
line on stderr and exit code 2; programming errors keep their traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DFQError(Exception):
    """An error caused by user input, reported without a traceback."""


class ChecksumError(DFQError):
    """A file's hash does not match the published one."""


class UnsupportedLayerError(DFQError):
    """The model contains layers that cannot be quantized."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return a ' (did you mean X?)' hint, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)  # YAML keys may be ints
    return f" (did you mean '{close[0]}'?)" if close else ""
