"""One small registry class shared by normalizers, models and datasets."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from normprobe.errors import UnknownNameError

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """A name -> entry mapping with aliases and did-you-mean errors.

    >>> r = Registry[int]("model")
    >>> r.register("mlp", 1, aliases=("fc",))
    1
    >>> r.get("fc")
    1
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, entry: T, *, aliases: tuple[str, ...] = ()) -> T:
        for key in (name, *aliases):
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is already registered")
        self._entries[name] = entry
        for alias in aliases:
            self._aliases[alias] = name
        return entry

    def decorator(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        def wrap(entry: T) -> T:
            return self.register(name, entry, aliases=aliases)

        return wrap

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` (resolving aliases); raises if unknown."""
        if not isinstance(name, str):
            raise UnknownNameError(
                f"{self.kind} name must be a string, got {type(name).__name__} {name!r}; "
                f"choose one of: {', '.join(self.names())}"
            )
        key = name.strip().lower()
        if key in self._entries:
            return key
        if key in self._aliases:
            return self._aliases[key]
        raise UnknownNameError(self._unknown_message(name))

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def names(self) -> list[str]:
        """Registered names in registration order (aliases excluded)."""
        return list(self._entries)

    def aliases(self) -> dict[str, str]:
        """Alias -> registered name."""
        return dict(self._aliases)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (
            name.strip().lower() in self._entries or name.strip().lower() in self._aliases
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def _unknown_message(self, name: str) -> str:
        known = [*self._entries, *self._aliases]
        close = difflib.get_close_matches(name.strip().lower(), known, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        return (
            f"unknown {self.kind} {name!r}; {hint}"
            f"registered {self.kind}s: {', '.join(self._entries)}"
        )
