"""One small registry for everything dfq looks up by name: models, generators, methods, plug-ins.

A name that is not registered raises :class:`~dfq.errors.DFQError` with a did-you-mean hint and the list of
what is, so a typo on the command line or in a config file is one clear line, never a ``KeyError``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from dfq.errors import DFQError, did_you_mean

__all__ = ["Registry"]

T = TypeVar("T")
_REQUIRED = object()


class Registry(Generic[T]):
    """Named entries of one kind, in registration order.

    Example:
        >>> things = Registry[int]("thing")
        >>> _ = things.add("one", 1)
        >>> things.get("one"), things.names()
        (1, ['one'])
    """

    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind, self.hint = kind, hint
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str, default: Any = _REQUIRED) -> T:
        """The entry called ``name``; a clear error if there is none (unless a ``default`` is given)."""
        if name not in self._entries and default is not _REQUIRED:
            return default
        if name not in self._entries:
            listing = self.hint or f"available: {', '.join(self._entries)}"
            raise DFQError(f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; {listing}")
        return self._entries[name]

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style ``pattern``, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __setitem__(self, name: str, entry: T) -> None:
        """Add or replace ``name`` (for plug-in code and tests that swap an entry)."""
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
