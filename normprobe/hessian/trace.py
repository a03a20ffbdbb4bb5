"""Variance-reduced trace estimation: Hutch++ beside Hutchinson.

Hutchinson's ``v^T A v`` has variance ``2 (||A||_F^2 - sum_i A_ii^2)`` for
Rademacher ``v``: a network Hessian's few large outliers dominate it. Hutch++
(Meyer, Musco, Musco & Woodruff 2021, Algorithm 1) spends a third of its
products on a sketch ``Q = orth(A S)`` of the dominant range, takes
``tr(Q^T A Q)`` exactly (a second third) and applies Hutchinson only to the
deflated rest ``(I - QQ^T) A (I - QQ^T)`` (the last third), whose Frobenius
norm no longer contains the outliers. Same number of products, error
``O(1/m)`` instead of ``O(1/sqrt(m))`` for matrices with decaying spectra.

Pure functions of a symmetric ``matvec``, like :mod:`normprobe.hessian.lanczos`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from normprobe.batch import all_finite
from normprobe.hessian.lanczos import HessianError, Matvec, mean_and_stderr, rademacher

__all__ = ["TraceEstimate", "hutch_plus_plus", "hutch_plus_plus_split", "xtrace"]


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate ``low_rank + mean(samples)`` with its standard error.

    ``low_rank`` is ``tr(Q^T A Q)`` over the sketched range (exact given the
    sketch; 0 for plain Hutchinson); ``samples`` are the Hutchinson values of
    the deflated rest, unbiased for ``tr(A) - low_rank``; ``stderr`` is their
    standard error (conditional on the sketch). ``matvecs`` counts products.
    """

    low_rank: float
    samples: np.ndarray
    rank: int
    matvecs: int

    @property
    def value(self) -> float:
        return self.low_rank + mean_and_stderr(self.samples)[0]

    @property
    def stderr(self) -> float:
        return mean_and_stderr(self.samples)[1]


def hutch_plus_plus_split(matvecs: int) -> tuple[int, int]:
    """``(sketch, samples)``: Hutch++'s use of ``matvecs`` products, ``2 * sketch + samples``.

    A third each for the sketch ``A S``, for ``A Q`` and for the residual
    samples (those get the remainder); at least one sketch column and two
    samples (a standard error needs two), so ``matvecs >= 4``.

    >>> hutch_plus_plus_split(64), hutch_plus_plus_split(4)
    ((21, 22), (1, 2))
    """
    if matvecs < 4:
        raise HessianError(
            f"Hutch++ needs at least 4 products (a sketch column, its product and two "
            f"samples), got {matvecs}"
        )
    sketch = max(1, min(matvecs // 3, (matvecs - 2) // 2))
    return sketch, matvecs - 2 * sketch


def _check_finite(y: torch.Tensor, method: str) -> None:
    if not all_finite(y):
        raise HessianError(
            f"the matrix-vector product returned non-finite values in {method}; check the loss "
            "at the current parameters (it may have diverged)"
        )


def _orthonormal_columns(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the numerical column space of ``y`` (SVD: rank-revealing).

    A QR without pivoting is not rank-revealing: Rademacher sketches of a
    low-rank matrix can repeat a direction, and its ``R`` then has a zero on
    the diagonal in front of independent columns.
    """
    u, sv, _ = torch.linalg.svd(y, full_matrices=False)
    return u[:, sv > sv.max() * max(y.shape) * torch.finfo(y.dtype).eps]


def hutch_plus_plus(
    matvec: Matvec,
    dim: int,
    matvecs: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutch++ with ``matvecs`` products of ``matvec``: ``tr(Q^T A Q)`` plus deflated Hutchinson.

    ``S`` (``sketch`` Rademacher columns, drawn first from ``generator``)
    gives ``Q = orth(A S)``; then ``sum_i q_i^T A q_i``; then ``samples``
    Rademacher ``g`` (drawn next), each deflated ``g' = g - Q Q^T g`` and
    scored ``g'^T A g'`` (:func:`hutch_plus_plus_split` says how many of
    each; sketch columns that ``A`` maps to zero leave their products to the
    samples). Exact for a matrix of rank <= ``sketch``; unbiased in general.
    The sketch takes ``2 * sketch`` vectors of ``dim`` in ``dtype``.

    >>> a = torch.diag(torch.tensor([100.0, 10.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    >>> est = hutch_plus_plus(lambda v: a @ v, 6, 12, generator=torch.Generator().manual_seed(0))
    >>> round(est.value, 10), est.matvecs
    (111.0, 12)
    """
    sketch = min(hutch_plus_plus_split(matvecs)[0], dim)
    s = torch.stack(
        [rademacher(dim, generator=generator, dtype=dtype, device=device) for _ in range(sketch)],
        dim=1,
    )
    y = torch.stack([matvec(s[:, i]).to(dtype) for i in range(sketch)], dim=1)  # (dim, sketch)
    del s
    _check_finite(y, "Hutch++")
    q = _orthonormal_columns(y)
    del y
    low_rank = 0.0
    for i in range(q.shape[1]):
        low_rank += float(q[:, i] @ matvec(q[:, i].contiguous()).to(dtype))
    count = sketch + q.shape[1]
    samples = matvecs - count  # a rank-deficient sketch leaves more for the samples
    values = np.empty(samples)
    for i in range(samples):
        g = rademacher(dim, generator=generator, dtype=dtype, device=device)
        g = g - q @ (q.T @ g)
        values[i] = float(g @ matvec(g).to(dtype))
        count += 1
    if not all(math.isfinite(x) for x in (low_rank, *values)):
        raise HessianError(
            "the matrix-vector product returned non-finite values in Hutch++; check the loss "
            "at the current parameters (it may have diverged)"
        )
    return TraceEstimate(low_rank=low_rank, samples=values, rank=int(q.shape[1]), matvecs=count)


def xtrace(
    matvec: Matvec,
    dim: int,
    matvecs: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """XTrace (Epperly, Tropp & Webber 2024): Hutch++ with every vector used for both parts.

    ``k = matvecs // 2`` Rademacher columns ``W`` (from ``generator``) give
    ``Y = A W = Q R`` and ``A Q``. For each ``i``, ``Q_i`` spans ``A W``
    without column ``i`` (``Q_i Q_i^T = Q (I - s_i s_i^T) Q^T``, ``s_i`` the
    normalized column ``i`` of ``R^{-T}``) and
    ``t_i = tr(Q_i^T A Q_i) + w_i^T (I - Q_i Q_i^T) A (I - Q_i Q_i^T) w_i``
    is unbiased and deflated by ``k - 1`` sketch directions; the estimate is
    the mean of the exchangeable ``t_i``, its standard error theirs. When
    ``A W`` is rank-deficient, ``A`` has rank below ``k`` (almost surely)
    and ``tr(Q^T A Q)`` over its range is the exact trace.

    Reported as a :class:`TraceEstimate` with ``low_rank = 0`` and the
    ``t_i`` as ``samples``.

    >>> a = torch.diag(torch.tensor([5.0, 3.0, 1.0] + [0.0] * 47, dtype=torch.float64))
    >>> est = xtrace(lambda v: a @ v, 50, 20, generator=torch.Generator().manual_seed(0))
    >>> round(est.value, 10), est.matvecs  # rank 3 < 10 test vectors: exact, 3 products spared
    (9.0, 13)
    """
    k = matvecs // 2
    if k < 2:
        raise HessianError(f"XTrace needs at least 4 products (two test vectors), got {matvecs}")
    k = min(k, dim)
    w = torch.stack(
        [rademacher(dim, generator=generator, dtype=dtype, device=device) for _ in range(k)], dim=1
    )
    y = torch.stack([matvec(w[:, i]).to(dtype) for i in range(k)], dim=1)  # (dim, k)
    _check_finite(y, "XTrace")
    q = _orthonormal_columns(y)
    full = q.shape[1] == k
    if full:
        q, r = torch.linalg.qr(y)
    aq = torch.stack([matvec(q[:, i].contiguous()).to(dtype) for i in range(q.shape[1])], dim=1)
    count = k + q.shape[1]
    total = float((q * aq).sum())
    if not full:
        return TraceEstimate(
            low_rank=total, samples=np.zeros(2), rank=int(q.shape[1]), matvecs=count
        )
    s = torch.linalg.inv(r.T)  # column i is orthogonal to every column of R but the i-th
    s = s / torch.linalg.vector_norm(s, dim=0)
    h = q.T @ aq  # (k, k) = Q^T A Q
    left_out = ((s.T @ h) * s.T).sum(dim=1)  # s_i^T H s_i
    traces = total - left_out
    qw = q.T @ w  # (k, k)
    for i in range(k):
        si = s[:, i]
        c = qw[:, i] - (si @ qw[:, i]) * si  # (I - s s^T) Q^T w
        apw = y[:, i] - aq @ c  # A (I - Q_i Q_i^T) w
        d = q.T @ apw
        ptapw = apw - q @ (d - (si @ d) * si)
        traces[i] += w[:, i] @ ptapw
    values = traces.double().cpu().numpy()
    if not np.isfinite(values).all():
        raise HessianError(
            "the matrix-vector product returned non-finite values in XTrace; check the loss "
            "at the current parameters (it may have diverged)"
        )
    return TraceEstimate(low_rank=0.0, samples=values, rank=k, matvecs=count)
