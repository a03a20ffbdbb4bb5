"""User-facing errors.

Every mistake a user can make (a bad name, a shape a layer cannot take, a
missing file) raises a subclass of :class:`NormprobeError` whose message says
what was expected, what was given and how to fix it. The CLI prints such an
error as one line and exits with status 2; anything else is a bug.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = [
    "NormprobeError",
    "UnknownNameError",
    "NormalizerError",
    "ModelError",
    "DatasetError",
    "user_stacklevel",
    "listed",
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


#: the package's folder (as imported, and resolved)
_PACKAGE = tuple(
    {str(Path(__file__).parent) + os.sep, str(Path(__file__).resolve().parent) + os.sep}
)
#: the standard library's context managers, which run the package's blocks
_CONTEXTLIB = str(Path(sys.modules["contextlib"].__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning raised by the caller of this function at the
    user's line: the frame that called into normprobe, above its outermost frame (and the
    ``contextlib`` frames that run its blocks), however deep the call was (a probe, a
    measurement step, a ``Monitor``), and through a library that normprobe called back from
    (scipy's ARPACK asking the Hessian for a product)."""
    frame = sys._getframe(1)  # the function that warns: stacklevel 1
    level, outermost = 1, 1
    while frame is not None:
        if frame.f_code.co_filename.startswith(_PACKAGE):
            outermost = level
        frame = frame.f_back
        level += 1
    frame, level = sys._getframe(outermost), outermost + 1
    frame = frame.f_back
    while frame is not None and frame.f_code.co_filename == _CONTEXTLIB:
        frame = frame.f_back
        level += 1
    return level


def listed(names: list[str], limit: int) -> str:
    """The first ``limit`` names, comma-separated, and how many there are in all beyond that.

    >>> listed(["a", "b", "c"], 2)
    'a, b, ... (3 in all)'
    """
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
