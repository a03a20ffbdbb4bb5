"""User-facing errors.

Every mistake a user can make (a bad name, a shape a layer cannot take, a
missing file) raises a subclass of :class:`NormprobeError` whose message says
what was expected, what was given and how to fix it. The CLI prints such an
error as one line and exits with status 2; anything else is a bug.
"""

from __future__ import annotations

__all__ = [
    "NormprobeError",
    "UnknownNameError",
    "NormalizerError",
    "ModelError",
    "DatasetError",
]


class NormprobeError(Exception):
    """Base class of the errors caused by user input."""


class UnknownNameError(NormprobeError, KeyError):
    """A registry lookup with a name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NormalizerError(NormprobeError, ValueError):
    """A normalizer used in a way it cannot work (shape, batch size, groups)."""


class DatasetError(NormprobeError, ValueError):
    """A dataset that cannot be loaded: missing or malformed file, bad option."""


class ModelError(NormprobeError, ValueError):
    """A model that cannot be built with the given arguments."""
