"""Reductions that cannot overflow, for the values a float32 reduction could not hold.

The probes reduce in the model's precision, at least float32: a sum of squares
of 10^4 entries near 10^18 (a badly scaled or diverging network) exceeds
float32's 3.4e38, so a gradient norm reads ``inf`` and a correlation ``NaN``
although the exact value is an ordinary number. Where a probe's value comes
out non-finite it is computed again from the same tensors with these: in
float64, on each vector divided by its largest magnitude, which no finite
input can overflow. Values that came out finite keep the bits of the plain
reduction. What stays non-finite after that comes from the model's own
numbers (an output or a gradient holding NaN or an infinity) and is said by
:func:`warn_of_non_finite`, naming the layers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import torch

from normprobe.errors import listed, user_stacklevel

__all__ = ["direction", "norm", "all_finite_values", "warn_of_non_finite"]


def direction(t: torch.Tensor) -> torch.Tensor:
    """``t`` flattened in float64 and divided by its largest magnitude (a zero ``t`` stays zero).

    Scaling each vector by a positive number leaves every cosine and Pearson
    correlation as it was; the scaled entries lie in [-1, 1], so no sum,
    product or norm of them can overflow.

    >>> direction(torch.tensor([2e38, -1e38, 0.0])).tolist()
    [1.0, -0.5, 0.0]
    """
    v = t.detach().to(torch.float64).reshape(-1)
    if v.numel() == 0:
        return v
    m = v.abs().max()
    return v / m if bool(m > 0) else v


def norm(t: torch.Tensor) -> float:
    """The Euclidean norm of ``t`` flattened, in float64, free of intermediate overflow.

    >>> t = torch.full((10_000,), 2.0**120)  # float32's own norm reads inf
    >>> torch.linalg.vector_norm(t).item(), norm(t) == 100 * 2.0**120
    (inf, True)
    """
    v = t.detach().to(torch.float64).reshape(-1)
    if v.numel() == 0:
        return 0.0
    m = float(v.abs().max())
    if not (m > 0 and math.isfinite(m)):
        return m  # 0 for a zero tensor; NaN or inf for non-finite entries
    return m * float(torch.linalg.vector_norm(v / m))


def all_finite_values(values: Iterable[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def warn_of_non_finite(what: str, layers: Sequence[str]) -> None:
    """One warning naming the layers whose ``what`` holds NaN or infinite values."""
    if not layers:
        return
    warnings.warn(
        f"the {what} of layer{'s' if len(layers) > 1 else ''} {listed(list(layers), 8)} "
        f"holds NaN or infinite values, so their rows are NaN or infinite: the model's own "
        f"numbers overflowed (a diverging or badly scaled network, or a learning rate too "
        f"high); check the model at this step: the other layers' rows are unaffected",
        UserWarning,
        stacklevel=user_stacklevel(),
    )
