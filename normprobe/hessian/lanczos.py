"""The numerical core of the Hessian engine: pure functions of a symmetric ``matvec``.

(Over 500 lines, one job: Lanczos with its reorthogonalization variants,
quadrature and extreme eigenvalues are one algorithm family sharing the
same basis and breakdown rules.)

Nothing here knows about models. A ``matvec`` maps a 1-D tensor of length
``dim`` to another (``v -> A v`` for a symmetric ``A``); every function takes
its randomness from an explicit ``torch.Generator``.

- :func:`lanczos`: Lanczos with full reorthogonalization (classical
  Gram-Schmidt against the stored basis, a second pass when the first lost
  more than 1 - 1/sqrt(2) of the norm: "twice is enough") or partial
  reorthogonalization (Simon's estimate of the lost orthogonality decides
  when), returning the tridiagonal, the basis if asked, the steps actually
  taken and an honest breakdown flag (a residual below ``100 eps ||T||``:
  :func:`default_breakdown_tol`, independent of the dimension).
- :func:`gauss_quadrature` and :func:`stochastic_lanczos_quadrature`: SLQ nodes
  and weights (Ghorbani et al. 2019) from ``scipy.linalg.eigh_tridiagonal``;
  :func:`ritz_residuals`: which nodes are converged eigenvalues.
- :func:`hutchinson`: ``v^T A v`` for Rademacher probes, and
  :func:`mean_and_stderr` to turn them into a trace with its standard error.
- :func:`extreme_eigenpairs`: the largest (or smallest) eigenvalues through
  ARPACK (``scipy.sparse.linalg.eigsh``), each checked with an explicit
  residual ``||A v - lambda v||``; unconverged values are flagged, never
  returned silently.
- :func:`gaussian_density`: the Gaussian-smoothed density of a node/weight
  measure on a grid.

Memory: :func:`lanczos` keeps its basis as one ``(steps, dim)`` tensor in the
basis dtype (:func:`basis_bytes`): ``8 * steps * dim`` bytes in float64 and
``4 * steps * dim`` in float32, i.e. at ``steps = 100`` 800 and 400 bytes per
parameter (2.4 GB and 1.2 GB for 3 million parameters, 140 MB and 70 MB for
WRN-16-1's 175k); a caller's buffer can put it in host memory or a
memory-mapped file (:mod:`normprobe.hessian.basis`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch
from threadpoolctl import threadpool_limits

from normprobe.errors import NormprobeError

__all__ = [
    "Matvec",
    "HessianError",
    "LanczosResult",
    "Quadrature",
    "Eigenpairs",
    "blas_threads",
    "default_breakdown_tol",
    "basis_bytes",
    "rademacher",
    "lanczos",
    "lanczos_lockstep",
    "Matmat",
    "gauss_quadrature",
    "ritz_residuals",
    "stochastic_lanczos_quadrature",
    "hutchinson",
    "mean_and_stderr",
    "extreme_eigenpairs",
    "gaussian_density",
]

#: ``v -> A v`` for a symmetric ``A``; 1-D tensors of length ``dim``
Matvec = Callable[[torch.Tensor], torch.Tensor]


class HessianError(NormprobeError, ValueError):
    """The Hessian engine was called with arguments it cannot work with."""


@contextmanager
def blas_threads(limit: int | None = 1) -> Iterator[None]:
    """Limit the BLAS thread pools numpy and scipy use (not torch's) inside the block.

    scipy's OpenBLAS threads and torch's OpenMP threads compete for the cores
    when a scipy solver calls back into torch (ARPACK's ``eigsh`` calling a
    Hessian-vector product): on a 2-core machine ``eigsh`` over 21 autograd
    HVPs took 9.1 s with default threads and 1.2-1.5 s with one BLAS thread.
    Every scipy solver in this package runs inside ``blas_threads(1)``;
    ``limit=None`` leaves the pools alone.

    >>> with blas_threads(1):
    ...     _ = np.linalg.eigvalsh(np.eye(3))
    """
    if limit is None:
        yield
        return
    with threadpool_limits(limits=limit, user_api="blas"):
        yield


def rademacher(
    dim: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A vector of ``dim`` independent +-1 entries (drawn on the CPU generator, then moved).

    >>> rademacher(4, generator=torch.Generator().manual_seed(0)).abs().tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    signs = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int8)
    return (signs.to(dtype) * 2 - 1).to(device)


@dataclass(frozen=True)
class LanczosResult:
    """What :func:`lanczos` computed.

    ``alpha`` (``steps``,) and ``beta`` (``steps - 1``,) are the diagonal and
    off-diagonal of the tridiagonal ``T`` (float64, CPU); ``residual_norm`` is
    the norm of the last residual ``beta_steps``, so the Ritz pair ``(theta_i,
    s_i)`` of ``T`` has residual ``|residual_norm * s_i[-1]|``. ``steps`` is
    the number of steps taken, fewer than ``requested`` only after a
    ``breakdown`` (an invariant subspace was found: ``T``'s eigenvalues are
    then exact eigenvalues of ``A`` and the quadrature is exact, not
    truncated). ``basis`` is the ``(steps, dim)`` orthonormal basis when kept.
    ``breakdown_tol`` is the relative tolerance the breakdown test used;
    ``reorthogonalizations`` counts the steps that reorthogonalized against
    the whole basis (every step with full reorthogonalization).
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    residual_norm: float
    steps: int
    requested: int
    breakdown: bool
    basis: torch.Tensor | None = None
    breakdown_tol: float = float("nan")
    reorthogonalizations: int = 0


#: columns per block of a float32 basis's projections (each block's sums in float32, their total in float64)
BLOCK = 16384


#: the byte alignment of a fresh CPU tensor (torch's allocator)
_ALIGNMENT = 64


def _coefficients(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``q @ w``; for a float32 basis, summed in float64 over blocks of :data:`BLOCK` columns.

    One float32 sum over millions of entries loses digits with its length
    (BLAS accumulates in float32): a float32 basis so projected moved the
    top Ritz value of an operator with 1M parameters by 4e-6 of the
    spectral scale and of one with 10M by 3e-4, against the float64 basis.
    Summing 16,384-entry float32 partial products in float64 keeps it at
    float32's resolution (4e-8 at 1M, the quadrature's Wasserstein-1
    distance 1e-8 instead of 3e-6), for one BLAS call per block.
    """
    if q.dtype != torch.float32 or w.shape[0] <= BLOCK:
        return torch.mv(q, w)
    h = torch.zeros(q.shape[0], dtype=torch.float64, device=q.device)
    for start in range(0, w.shape[0], BLOCK):
        h += torch.mv(q[:, start : start + BLOCK], w[start : start + BLOCK])
    return h


def _norm(w: torch.Tensor) -> torch.Tensor:
    """``||w||``, accumulated in float64 for a float32 vector (see :func:`_coefficients`)."""
    if w.dtype == torch.float32:
        return torch.linalg.vector_norm(w, dtype=torch.float64)
    return torch.linalg.vector_norm(w)


def _reorthogonalize(q: torch.Tensor, w: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Classical Gram-Schmidt of ``w`` against the rows of ``q``, in place, twice when needed.

    A second pass runs when the first removed more than ``1 - 1/sqrt(2)`` of
    the norm (Daniel-Gragg-Kaufman-Stewart: "twice is enough"). Returns what the passes found along the last
    row (added to ``alpha``) and the new norm.
    """
    before = _norm(w)
    h = _coefficients(q, w)
    # one pass over the basis and w (the subtraction fused in)
    w.addmv_(q.T, h.to(w.dtype), alpha=-1)
    da = float(h[-1])
    after = _norm(w)
    if after < before / math.sqrt(2.0):
        h = _coefficients(q, w)
        w.addmv_(q.T, h.to(w.dtype), alpha=-1)
        da += float(h[-1])
        after = _norm(w)
    return da, after


class _Orthogonality:
    """Simon's estimate of ``omega_{j+1,k} ~ q_{j+1}^T q_k`` for partial reorthogonalization.

    From ``A q_k = beta_{k-1} q_{k-1} + alpha_k q_k + beta_k q_{k+1} + f_k``
    for every ``k``, the orthogonality of the next vector follows from the
    last two (0-indexed, ``k < j``):
    ``beta_j w_{j+1,k} = beta_k w_{j,k+1} + (alpha_k - alpha_j) w_{j,k}
    + beta_{k-1} w_{j,k-1} - beta_{j-1} w_{j-1,k}``, plus the rounding of
    the products, bounded by ``eps1 (|T_k| + |T_j|)`` with
    ``eps1 = sqrt(dim) eps / 2`` and added with the sign of the estimate
    (PROPACK's model). Mutable state: the last two rows of estimates.
    """

    def __init__(self, steps: int, dim: int, eps: float) -> None:
        self.eps = eps
        self.eps1 = 0.5 * math.sqrt(dim) * eps
        self.delta = math.sqrt(eps)
        self.prev = np.zeros(steps + 1)  # omega_{j-1, k}
        self.cur = np.zeros(steps + 1)  # omega_{j, k}
        self.cur[0] = 1.0
        self.j = 0
        self.due = False  # the step after a reorthogonalization reorthogonalizes too

    def advance(self, alpha: np.ndarray, beta: np.ndarray, a_j: float, b_j: float) -> bool:
        """Estimates for ``q_{j+1}`` from ``alpha[:j]``, ``beta[:j]``, ``alpha_j``, ``beta_j``.

        Returns whether they exceed ``sqrt(eps)`` (reorthogonalize now).
        """
        j = self.j
        new = np.zeros_like(self.cur)
        if self.due:  # this step reorthogonalized: back to rounding level
            new[: j + 1] = self.eps1
            self.due = False
        elif j:
            k = np.arange(j)
            t = beta[k] * self.cur[k + 1] + (alpha[k] - a_j) * self.cur[k]
            t[1:] += beta[k[1:] - 1] * self.cur[k[1:] - 1]
            t -= beta[j - 1] * self.prev[k]
            row_k = np.hypot(alpha[k], beta[k])
            t += np.where(t >= 0, 1.0, -1.0) * self.eps1 * (row_k + math.hypot(a_j, b_j))
            new[:j] = t / b_j
            new[j] = self.eps1
        else:
            new[0] = self.eps1
        new[j + 1] = 1.0
        self.prev, self.cur = self.cur, new
        self.j = j + 1
        return bool(np.abs(new[: j + 1]).max() > self.delta)

    def reset(self) -> None:
        """After reorthogonalizing ``q_{j+1}``: its estimates to rounding, and the next step's too."""
        self.cur[: self.j] = self.eps1
        self.due = True


def default_breakdown_tol(dtype: torch.dtype) -> float:
    """``100 * eps`` of ``dtype``: the relative residual below which Lanczos calls the Krylov space invariant.

    At a true breakdown the computed residual is rounding: a few ``eps``
    times ``||A||`` (2-13 eps measured on low-rank operators from 10k to 2M
    dimensions, float32 and float64; torch's blocked reductions keep the
    rounding from growing with the dimension). The tolerance must not grow
    with the dimension either: the former ``100 * dim * eps`` exceeded 1 in
    float32 above 84k parameters and stopped every run after one step. A
    missed breakdown is harmless (the next direction is rounding noise,
    orthogonalized, whose nodes get weights of order ``(beta / ||T||)^2``); a
    false one ends the run early, which the spectrum reports and warns about.

    >>> default_breakdown_tol(torch.float32) == 100 * torch.finfo(torch.float32).eps
    True
    """
    return 100 * torch.finfo(dtype).eps


def basis_bytes(steps: int, dim: int, dtype: torch.dtype) -> int:
    """Bytes of a ``(steps, dim)`` Lanczos basis in ``dtype`` (the dominant memory of SLQ).

    >>> basis_bytes(100, 1_000_000, torch.float64) / 2**20
    762.939453125
    """
    return int(steps) * int(dim) * torch.empty(0, dtype=dtype).element_size()


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def lanczos(
    matvec: Matvec,
    dim: int,
    steps: int,
    *,
    start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    keep_basis: bool = False,
    breakdown_tol: float | None = None,
    basis_dtype: torch.dtype | None = None,
    basis: torch.Tensor | None = None,
    reorthogonalize: Literal["full", "partial"] = "full",
    matvec_eps: float | None = None,
    matvec_dtype: torch.dtype | None = None,
) -> LanczosResult:
    """``steps`` Lanczos steps on ``matvec`` with full (or partial) reorthogonalization.

    Starts from ``start`` (normalized here) or, when it is None, from a
    Rademacher vector drawn from ``generator``. Every new direction is
    orthogonalized against the whole stored basis after the three-term
    recurrence (classical Gram-Schmidt, repeated once when the first pass
    removed more than ``1 - 1/sqrt(2)`` of its norm: "twice is enough"), so
    the basis stays orthonormal to rounding and the Ritz values carry no
    ghost copies. The loop stops early only when the residual norm falls below
    ``breakdown_tol * ||T||`` (default :func:`default_breakdown_tol`,
    ``100 * eps`` of the coarser of ``dtype`` and ``basis_dtype``: relative
    to the operator's scale, independent of ``dim``), which is recorded in
    ``breakdown``.

    ``reorthogonalize="partial"`` (Simon 1984, as in PROPACK) estimates the
    loss of orthogonality ``omega_jk ~ q_j^T q_k`` by its recurrence
    (:class:`_Orthogonality`) and reorthogonalizes only when it exceeds
    ``sqrt(eps)``, then once more at the next step. The basis stays
    semi-orthogonal, which keeps ``T`` the projection of ``A`` on a nearby
    orthonormal basis to ``O(eps ||A||)``: the same nodes and weights as
    full reorthogonalization to rounding, with far fewer passes over the
    basis (the cost that dominates SLQ beside the products for large models).
    ``matvec_eps`` is the relative rounding of the products when it is
    coarser than ``dtype`` (a float32 model's Hessian-vector products in a
    float64 Lanczos: ``finfo(float32).eps``); the estimate starts from it.

    The matvec sees vectors in ``matvec_dtype`` (default ``dtype``) on
    ``device``, and its products are taken into the recurrence as ``dtype``.
    A matvec that computes in a coarser dtype whatever it is given (a float32
    model's Hessian-vector products, :meth:`HessianOperator.matvec
    <normprobe.hessian.HessianOperator.matvec>`, which answers in the dtype
    of its vector) may take its vectors in that dtype: the same products,
    without converting each vector and product on the way (with a float32
    basis the values do not change, bit for bit). The basis and the
    orthogonalization use ``basis_dtype`` (default ``dtype``): a float32
    basis halves the memory and about halves the reorthogonalization time,
    and is as accurate as a float32 matvec: its projection coefficients and
    norms are summed in float64 (over blocks of :data:`BLOCK` entries, see
    :func:`_coefficients`), and ``alpha`` and ``beta`` are stored in
    float64 either way. ``basis``, if given, is the ``(steps, dim)``
    buffer to use (on any device, e.g. host memory or a memory-mapped file
    for a basis that does not fit on the accelerator; its dtype is the basis
    dtype): each product's result moves there, each new direction moves to
    ``device``. The basis costs ``steps * dim * itemsize`` bytes
    (:func:`basis_bytes`: 800 bytes per parameter at ``steps=100`` in
    float64); it is returned only with ``keep_basis``.

    A matrix with three distinct eigenvalues has a 3-dimensional Krylov space:

    >>> a = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0], dtype=torch.float64))
    >>> out = lanczos(lambda v: a @ v, 6, 6, generator=torch.Generator().manual_seed(0))
    >>> out.steps, out.breakdown
    (3, True)
    >>> [round(x, 6) for x in gauss_quadrature(out.alpha, out.beta)[0].tolist()]
    [1.0, 2.0, 3.0]
    """
    if dim < 1 or steps < 1:
        raise HessianError(f"lanczos needs dim >= 1 and steps >= 1, got dim={dim}, steps={steps}")
    if start is None:
        if generator is None:
            raise HessianError(
                "lanczos needs a start vector or a torch.Generator for a random one; "
                "pass generator=torch.Generator().manual_seed(seed)"
            )
        start = rademacher(dim, generator=generator, dtype=dtype, device=device)
    run = _lanczos_run(
        dim,
        steps,
        start,
        dtype=dtype,
        device=device,
        breakdown_tol=breakdown_tol,
        basis_dtype=basis_dtype,
        basis=basis,
        reorthogonalize=reorthogonalize,
        matvec_eps=matvec_eps,
        matvec_dtype=matvec_dtype,
    )
    while run.active:
        run.step(matvec(run.vector()))
    return run.result(keep_basis)


def _lanczos_run(
    dim: int,
    steps: int,
    start: torch.Tensor,
    *,
    dtype: torch.dtype,
    device: torch.device | str | None,
    breakdown_tol: float | None,
    basis_dtype: torch.dtype | None,
    basis: torch.Tensor | None,
    reorthogonalize: str,
    matvec_eps: float | None,
    matvec_dtype: torch.dtype | None = None,
) -> _LanczosRun:
    """A :class:`_LanczosRun` from :func:`lanczos`'s arguments, checked."""
    start = start.to(dtype=dtype, device=device if device is not None else start.device)
    if start.shape != (dim,):
        raise HessianError(f"start vector must have shape ({dim},), got {tuple(start.shape)}")
    norm = torch.linalg.vector_norm(start)
    if not torch.isfinite(norm) or norm == 0:
        raise HessianError("the Lanczos start vector is zero or not finite; pass a nonzero one")
    steps = min(steps, dim)
    if basis is not None:
        if basis.dim() != 2 or basis.shape[1] != dim or basis.shape[0] < steps:
            raise HessianError(
                f"the basis buffer must have shape (>= {steps}, {dim}), got {tuple(basis.shape)}"
            )
        if basis_dtype is not None and basis.dtype != basis_dtype:
            raise HessianError(
                f"the basis buffer is {basis.dtype} but basis_dtype={basis_dtype}; pass one"
            )
        basis_dtype = basis.dtype
    basis_dtype = dtype if basis_dtype is None else basis_dtype
    if basis_dtype not in (torch.float32, torch.float64):
        raise HessianError(f"basis_dtype must be torch.float32 or torch.float64, got {basis_dtype}")
    eps = torch.finfo(_coarser(dtype, basis_dtype)).eps
    tol = (
        default_breakdown_tol(_coarser(dtype, basis_dtype))
        if breakdown_tol is None
        else breakdown_tol
    )
    if reorthogonalize not in ("full", "partial"):
        raise HessianError(f"reorthogonalize must be 'full' or 'partial', got {reorthogonalize!r}")
    if matvec_dtype is not None and not matvec_dtype.is_floating_point:
        raise HessianError(f"matvec_dtype must be a floating dtype, got {matvec_dtype}")
    run = _LanczosRun(
        dim, steps, start / norm, dtype, basis_dtype, basis, tol, eps, reorthogonalize, matvec_eps,
        dtype if matvec_dtype is None else matvec_dtype,
    )  # fmt: skip
    return run


class _LanczosRun:
    """One Lanczos recurrence, advanced one product at a time.

    :func:`lanczos` feeds it ``A q_j`` for ``q_j = vector()`` until it is no
    longer ``active``; :func:`lanczos_lockstep` advances several side by
    side, with one batched product per step. The arithmetic of a run
    depends only on its own products, so a run gives the same bits whether
    it runs alone or in lockstep with others.
    """

    def __init__(
        self,
        dim: int,
        steps: int,
        start: torch.Tensor,
        dtype: torch.dtype,
        basis_dtype: torch.dtype,
        basis: torch.Tensor | None,
        tol: float,
        eps: float,
        reorthogonalize: str,
        matvec_eps: float | None,
        matvec_dtype: torch.dtype,
    ) -> None:
        if basis is None:
            basis = torch.empty(steps, dim, dtype=basis_dtype, device=start.device)
        self.dim, self.steps, self.dtype, self.tol, self.eps = dim, steps, dtype, tol, eps
        self.basis = basis
        self.home = start.device  # where the matvec lives
        self.handed = matvec_dtype  # the dtype of the vectors the matvec is given
        # a product in the basis dtype goes there directly where the detour through the
        # recurrence's dtype would widen and narrow it back (float32 through float64): exact
        self.direct = torch.finfo(dtype).eps <= torch.finfo(basis.dtype).eps
        basis[0] = self._to_basis(start)
        self.work = torch.empty(dim, dtype=basis.dtype, device=basis.device)  # the new direction
        noise = eps if matvec_eps is None else max(float(matvec_eps), eps)
        self.watch = _Orthogonality(steps, dim, noise) if reorthogonalize == "partial" else None
        self.reorthogonalized = 0
        self.alpha = torch.zeros(steps, dtype=torch.float64)
        self.beta = torch.zeros(steps, dtype=torch.float64)
        self.scale = 0.0  # running bound on ||T|| for the breakdown test
        self.taken, self.breakdown, self.residual = steps, False, 0.0
        self.j = 0
        self.active = True

    def _to_basis(self, v: torch.Tensor) -> torch.Tensor:
        return v.to(dtype=self.basis.dtype, device=self.basis.device)  # v itself where it is

    def vector(self) -> torch.Tensor:
        """``q_j``, the vector whose product the next :meth:`step` needs (dtype and device of the matvec)."""
        return self.basis[self.j].to(dtype=self.handed, device=self.home)

    def step(self, product: torch.Tensor) -> None:
        """Take ``A q_j``: extend the tridiagonal and the basis by one step."""
        j, dim, basis = self.j, self.dim, self.basis
        if product.shape != (dim,):
            raise HessianError(f"matvec must return shape ({dim},), got {tuple(product.shape)}")
        if not (self.direct and product.dtype == basis.dtype):
            product = product.to(self.dtype)
        w = self._to_basis(product)
        if w.data_ptr() % _ALIGNMENT:
            # a row of lockstep's block of products: BLAS rounds a reduction over a vector
            # that starts off its alignment otherwise than over a fresh one on some CPUs
            # (AVX2), and a row must give the bits of the same product from matvec
            w = self.work.copy_(w)
        # The three-term recurrence, then reorthogonalization against the whole basis
        # (every step, or where the partial scheme's estimate says so). Written into
        # one scratch vector, out= and in place, each subtraction fused with its product
        # (add with alpha, addmv): a fresh vector per operation costs
        # page faults that measured several times the arithmetic (float64, 126k).
        a = float(_coefficients(basis[j : j + 1], w)[0])
        w = torch.add(w, basis[j], alpha=-a, out=self.work)
        if j:
            w.add_(basis[j - 1], alpha=-self.beta[j - 1].item())
        q = basis[: j + 1]
        watch = self.watch
        done = watch is None or watch.due  # this step reorthogonalizes anyway
        if done:
            da, after = _reorthogonalize(q, w)
            a += da
            self.reorthogonalized += 1
        else:
            after = _norm(w)
        b = float(after)
        if watch is not None and j + 1 < self.steps and b > 0 and math.isfinite(b):
            # once per step at most: where the estimate's rounding floor is above sqrt(eps)
            # (float32 products of more than about 34M parameters) it says "now" every step
            if watch.advance(self.alpha[:j].numpy(), self.beta[:j].numpy(), a, b) and not done:
                da, after = _reorthogonalize(q, w)
                a += da
                b = float(after)
                self.reorthogonalized += 1
                watch.reset()
        self.alpha[j] = a
        if not math.isfinite(b) or not math.isfinite(float(self.alpha[j])):
            raise HessianError(
                f"the matrix-vector product returned non-finite values at Lanczos step {j + 1}; "
                "check the loss at the current parameters (it may have diverged)"
            )
        self.beta[j] = b
        self.scale = max(
            self.scale, abs(float(self.alpha[j])) + b + (float(self.beta[j - 1]) if j else 0.0)
        )
        self.residual = b
        self.j = j + 1
        if j + 1 >= self.steps:
            self.active = False
        elif b <= self.tol * max(self.scale, self.eps):
            self.taken, self.breakdown, self.active = j + 1, True, False
        else:
            torch.div(w, b, out=basis[j + 1])

    def result(self, keep_basis: bool) -> LanczosResult:
        taken = self.taken
        return LanczosResult(
            alpha=self.alpha[:taken].clone(),
            beta=self.beta[: taken - 1].clone(),
            residual_norm=self.residual,
            steps=taken,
            requested=self.steps,
            breakdown=self.breakdown,
            basis=self.basis[:taken] if keep_basis else None,
            breakdown_tol=self.tol,
            reorthogonalizations=self.reorthogonalized,
        )


#: ``V -> A V`` for a ``(b, dim)`` block of vectors (one product per row); :func:`lanczos_lockstep`
Matmat = Callable[[torch.Tensor], torch.Tensor]


def lanczos_lockstep(
    matmat: Matmat,
    starts: torch.Tensor,
    steps: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    breakdown_tol: float | None = None,
    basis_dtype: torch.dtype | None = None,
    bases: torch.Tensor | None = None,
    reorthogonalize: Literal["full", "partial"] = "full",
    matvec_eps: float | None = None,
    matvec_dtype: torch.dtype | None = None,
) -> list[LanczosResult]:
    """:func:`lanczos` from each row of ``starts`` (``(b, dim)``), the runs side by side.

    Each step applies ``matmat`` once to the ``(b', dim)`` block of the
    current Lanczos vectors of the runs still going (a run that breaks down
    leaves the block). Every run does exactly the arithmetic of
    :func:`lanczos` on its own products, so when ``matmat`` gives each row
    the bits ``matvec`` would (as a batched Hessian-vector product does),
    the results are bit for bit those of one :func:`lanczos` per start
    (``matvec_dtype`` as there: the dtype of the block ``matmat`` is given).
    ``bases``, if given, is a ``(b, steps, dim)`` buffer (one basis per run).

    >>> a = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
    >>> starts = torch.ones(2, 6, dtype=torch.float64)
    >>> runs = lanczos_lockstep(lambda v: v @ a, starts, 3)
    >>> [r.steps for r in runs], bool(torch.equal(runs[0].alpha, runs[1].alpha))
    ([3, 3], True)
    """
    if starts.dim() != 2 or starts.shape[0] < 1:
        raise HessianError(f"starts must be a (b, dim) block, got shape {tuple(starts.shape)}")
    count, dim = starts.shape
    if bases is not None and (bases.dim() != 3 or bases.shape[0] < count):
        raise HessianError(
            f"bases must have shape (>= {count}, steps, {dim}), got {tuple(bases.shape)}"
        )
    runs: list[_LanczosRun] = []
    for i in range(count):
        runs.append(
            _lanczos_run(
                dim,
                steps,
                starts[i],
                dtype=dtype,
                device=device,
                breakdown_tol=breakdown_tol,
                basis_dtype=basis_dtype,
                basis=None if bases is None else bases[i],
                reorthogonalize=reorthogonalize,
                matvec_eps=matvec_eps,
                matvec_dtype=matvec_dtype,
            )
        )
    while True:
        going = [r for r in runs if r.active]
        if not going:
            break
        products = matmat(torch.stack([r.vector() for r in going]))
        if products.shape != (len(going), dim):
            raise HessianError(
                f"matmat must return shape ({len(going)}, {dim}), got {tuple(products.shape)}"
            )
        for run, product in zip(going, products):
            run.step(product)
    return [r.result(False) for r in runs]


def _tridiagonal_eigh(alpha: torch.Tensor | np.ndarray, beta: torch.Tensor | np.ndarray):
    d = np.asarray(alpha, dtype=np.float64).ravel()
    e = np.asarray(beta, dtype=np.float64).ravel()
    if e.size != max(d.size - 1, 0):
        raise HessianError(
            f"a tridiagonal with {d.size} diagonal entries needs {d.size - 1} off-diagonal "
            f"entries, got {e.size}"
        )
    if d.size == 1:
        return d.copy(), np.ones((1, 1))
    with blas_threads(1):
        return scipy.linalg.eigh_tridiagonal(d, e)


def gauss_quadrature(
    alpha: torch.Tensor | np.ndarray, beta: torch.Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the Gauss quadrature of a Lanczos tridiagonal.

    Nodes are the eigenvalues of ``T`` (ascending) and weights the squared
    first components of its eigenvectors (they sum to 1), computed by
    ``scipy.linalg.eigh_tridiagonal`` with one BLAS thread.

    >>> nodes, weights = gauss_quadrature(np.array([1.0, 1.0]), np.array([1.0]))
    >>> nodes.round(6).tolist(), weights.round(6).tolist()
    ([0.0, 2.0], [0.5, 0.5])
    """
    nodes, vectors = _tridiagonal_eigh(alpha, beta)
    return nodes, vectors[0] ** 2


def ritz_residuals(
    alpha: torch.Tensor | np.ndarray, beta: torch.Tensor | np.ndarray, residual_norm: float
) -> np.ndarray:
    """``|beta_m s_i[-1]|``: the residual norm of each Ritz pair of a Lanczos run (per node).

    In exact arithmetic ``||A y_i - theta_i y_i||`` for the Ritz vector
    ``y_i``; a small value marks a node that is (close to) an eigenvalue of
    ``A``, a large one a quadrature node standing for a cluster.

    >>> ritz_residuals(np.array([1.0, 1.0]), np.array([1.0]), 0.0).tolist()
    [0.0, 0.0]
    """
    _, vectors = _tridiagonal_eigh(alpha, beta)
    return np.abs(residual_norm * vectors[-1])


@dataclass(frozen=True)
class Quadrature:
    """Stochastic Lanczos quadrature: one node/weight set per start vector.

    ``nodes[j]`` and ``weights[j]`` (float64 arrays of length ``steps[j]``)
    come from start vector ``j``; ``ritz_residuals[j]`` are the Ritz residual
    norms ``|beta_m s_i[-1]|`` of its nodes (small: the node is an eigenvalue);
    ``first_moments[j]`` is ``q_j^T A q_j`` (``alpha_1``) for the normalized
    start vector ``q_j``; ``residual_norms[j]`` the last residual norm (at a
    breakdown, the one that fell below ``breakdown_tol * ||T||``).
    """

    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    steps: list[int]
    breakdown: list[bool]
    first_moments: list[float]
    requested: int
    ritz_residuals: list[np.ndarray]
    residual_norms: list[float] = field(default_factory=list)
    breakdown_tol: float = float("nan")
    reorthogonalizations: list[int] = field(default_factory=list)


def stochastic_lanczos_quadrature(
    matvec: Matvec,
    dim: int,
    steps: int,
    num_vectors: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    basis_dtype: torch.dtype | None = None,
    basis: torch.Tensor | None = None,
    breakdown_tol: float | None = None,
    reorthogonalize: Literal["full", "partial"] = "full",
    matvec_eps: float | None = None,
    matvec_dtype: torch.dtype | None = None,
    matmat: Matmat | None = None,
    bases: torch.Tensor | None = None,
) -> Quadrature:
    """SLQ (Ghorbani et al. 2019): ``num_vectors`` Rademacher starts, ``steps`` Lanczos steps each.

    The start vectors are the first ``num_vectors`` draws of
    :func:`rademacher` from ``generator`` (normalized); their nodes and
    weights estimate the spectral measure ``(1/dim) sum_i delta(lambda_i)``.
    ``basis_dtype``, ``basis`` (one ``(steps, dim)`` buffer, reused by every
    start vector), ``breakdown_tol``, ``reorthogonalize``, ``matvec_eps`` and
    ``matvec_dtype`` go to :func:`lanczos`.

    With ``matmat`` (``V -> A V`` for a ``(b, dim)`` block) the start
    vectors run side by side (:func:`lanczos_lockstep`: one block product
    per step instead of ``num_vectors`` products), each in a basis of its
    own: ``bases``, a ``(num_vectors, steps, dim)`` buffer, or allocated.
    The start vectors are the same draws, and each run's arithmetic is its
    sequential run's, so the nodes and weights are the same bits whenever
    ``matmat``'s rows are ``matvec``'s products.

    >>> a = torch.diag(torch.linspace(-1, 1, 50, dtype=torch.float64))
    >>> q = stochastic_lanczos_quadrature(lambda v: a @ v, 50, 8, 2,
    ...                                   generator=torch.Generator().manual_seed(0))
    >>> len(q.nodes), [float(w.sum().round(12)) for w in q.weights]
    (2, [1.0, 1.0])
    """
    if num_vectors < 1:
        raise HessianError(f"SLQ needs at least one start vector, got num_vectors={num_vectors}")
    nodes, weights, residuals, taken, breakdown, moments = [], [], [], [], [], []
    norms: list[float] = []
    passes: list[int] = []
    tol = float("nan")
    options = {
        "dtype": dtype,
        "device": device,
        "basis_dtype": basis_dtype,
        "breakdown_tol": breakdown_tol,
        "reorthogonalize": reorthogonalize,
        "matvec_eps": matvec_eps,
        "matvec_dtype": matvec_dtype,
    }
    if matmat is None:
        runs: Iterator[LanczosResult] = (
            lanczos(
                matvec,
                dim,
                steps,
                start=rademacher(dim, generator=generator, dtype=dtype, device=device),
                basis=basis,
                **options,
            )
            for _ in range(num_vectors)
        )  # one at a time: the start vectors are drawn in the same order either way
    else:
        starts = torch.stack(
            [
                rademacher(dim, generator=generator, dtype=dtype, device=device)
                for _ in range(num_vectors)
            ]
        )
        runs = iter(lanczos_lockstep(matmat, starts, steps, bases=bases, **options))
    for run in runs:
        n, vectors = _tridiagonal_eigh(run.alpha, run.beta)
        nodes.append(n)
        weights.append(vectors[0] ** 2)
        residuals.append(np.abs(run.residual_norm * vectors[-1]))
        taken.append(run.steps)
        breakdown.append(run.breakdown)
        moments.append(float(run.alpha[0]))
        norms.append(run.residual_norm)
        tol = run.breakdown_tol
        passes.append(run.reorthogonalizations)
    return Quadrature(
        nodes,
        weights,
        taken,
        breakdown,
        moments,
        min(steps, dim),
        ritz_residuals=residuals,
        residual_norms=norms,
        breakdown_tol=tol,
        reorthogonalizations=passes,
    )


def hutchinson(
    matvec: Matvec,
    dim: int,
    samples: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    matmat: Matmat | None = None,
    block: int = 8,
) -> np.ndarray:
    """``v^T A v`` for ``samples`` Rademacher vectors ``v`` from ``generator`` (unnormalized).

    Each value is an unbiased estimate of ``trace(A)``; see :func:`mean_and_stderr`.
    With ``matmat`` (``V -> A V`` for a ``(b, dim)`` block) the products are
    taken ``block`` vectors at a time: the same vectors, in the same order.

    >>> a = torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64))
    >>> hutchinson(lambda v: a @ v, 4, 3, generator=torch.Generator().manual_seed(0)).tolist()
    [10.0, 10.0, 10.0]
    """
    values = np.empty(samples)
    if matmat is None:
        for i in range(samples):
            v = rademacher(dim, generator=generator, dtype=dtype, device=device)
            values[i] = float(v @ matvec(v).to(dtype))
        return values
    if block < 1:
        raise HessianError(f"block must be a positive integer, got {block}")
    for first in range(0, samples, block):
        count = min(block, samples - first)
        vs = torch.stack(
            [rademacher(dim, generator=generator, dtype=dtype, device=device) for _ in range(count)]
        )
        products = matmat(vs).to(dtype)
        for i in range(count):
            values[first + i] = float(vs[i] @ products[i])
    return values


def mean_and_stderr(samples: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Sample mean and its standard error ``std(ddof=1) / sqrt(n)`` (NaN error for one sample).

    >>> mean_and_stderr([1.0, 3.0])
    (2.0, 1.0)
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        raise HessianError("no samples to average; ask for at least one trace sample")
    if x.size == 1:
        return float(x[0]), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


@dataclass(frozen=True)
class Eigenpairs:
    """Extreme eigenvalues with their convergence evidence.

    ``values`` are sorted from the extreme inwards (descending for
    ``largest``, ascending for ``smallest``); NaN marks one the solver could
    not deliver. For each: ``residuals`` is ``||A v - lambda v||`` computed
    with one extra matvec on the returned unit vector (an eigenvalue of ``A``
    lies within this distance of ``lambda``), ``tolerances`` is the bound it
    must meet (``tol`` times ``|lambda|`` for the largest; times the spread
    ``shift - lambda`` for the smallest), and ``converged`` says whether it
    did. ``matvecs`` counts every product, the checks included.
    ``vectors`` is ``(k, dim)`` in the Lanczos dtype (None once dropped).
    """

    values: np.ndarray
    residuals: np.ndarray
    tolerances: np.ndarray
    converged: np.ndarray
    vectors: torch.Tensor | None
    matvecs: int
    which: Literal["largest", "smallest"]
    tol: float
    method: str
    message: str = ""

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


def _default_tol(dtype: torch.dtype) -> float:
    return math.sqrt(torch.finfo(dtype).eps)


def extreme_eigenpairs(
    matvec: Matvec,
    dim: int,
    k: int,
    *,
    which: Literal["largest", "smallest"] = "largest",
    shift: float | None = None,
    tol: float | None = None,
    max_matvecs: int = 1000,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Eigenpairs:
    """The ``k`` largest (or smallest) eigenvalues of ``matvec`` by ARPACK, each verified.

    ``scipy.sparse.linalg.eigsh`` (implicitly restarted Lanczos, ``which="LA"``)
    runs on a ``LinearOperator`` in ``dtype`` with one BLAS thread and stops
    when ARPACK's Ritz estimates reach ``tol`` relative to ``|lambda|``
    (default ``sqrt(eps)`` of ``dtype``; pass the coarser precision of the
    matvec and the Lanczos dtype). The smallest eigenvalues are the largest of
    ``shift * I - A`` (same Krylov convergence as ``which="SA"``, but the
    tolerance becomes relative to the spread ``shift - lambda``, which is
    what makes "lambda_min ~ 0" checkable); ``shift`` defaults to the largest
    eigenvalue, found first. ``max_matvecs`` bounds ARPACK's work (its
    ``maxiter`` is derived from it); when ARPACK does not converge the
    missing values are NaN, never a half-converged guess. Every returned
    pair is then checked with an explicit residual; ``converged`` is False
    where it misses the tolerance. Operators of dimension <= 64 are
    diagonalized densely (``dim`` matvecs) instead. ARPACK's start vector and
    the random vectors it draws when its Krylov space turns invariant come from
    ``generator`` (its seed, for the latter), so a call repeats bit for bit.

    Cost beside the products: ARPACK's own work per matvec (reorthogonalizing
    against its ``ncv`` Lanczos vectors, implicit restarts), memory bound: at
    126k dimensions 4.4-5 ms per matvec on a 2-core machine in float64, the
    same as ``eigsh`` on a plain numpy operator (the numpy/torch wrapping
    here costs next to nothing: no copies, no casts when ``dtype`` is the
    matvec's), and 2.5-3.7 ms in float32, with the same number of matvecs.
    With ``dtype=torch.float32`` each eigenvalue is the Rayleigh quotient of
    its Ritz vector, summed in float64 from the product its residual takes:
    ARPACK's own float32 Ritz values are good to about 1e-6 relative, the
    quotients to the products' rounding.

    >>> a = torch.diag(torch.arange(100, dtype=torch.float64))
    >>> top = extreme_eigenpairs(lambda v: a @ v, 100, 3, generator=torch.Generator().manual_seed(0))
    >>> top.values.round(8).tolist(), bool(top.converged.all())
    ([99.0, 98.0, 97.0], True)
    """
    if not 1 <= k <= dim:
        raise HessianError(f"k must be between 1 and the dimension {dim}, got {k}")
    tol = _default_tol(dtype) if tol is None else float(tol)
    if not tol > 0:
        raise HessianError(f"tol must be positive, got {tol}")
    count = [0]

    def counted(v: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return matvec(v).to(dtype)

    if which == "smallest" and shift is None:
        top = extreme_eigenpairs(
            matvec,
            dim,
            1,
            which="largest",
            tol=tol,
            max_matvecs=max_matvecs,
            generator=generator,
            dtype=dtype,
            device=device,
        )
        count[0] += top.matvecs
        shift = float(top.values[0]) if np.isfinite(top.values[0]) else 0.0
    elif which not in ("largest", "smallest"):
        raise HessianError(f"which must be 'largest' or 'smallest', got {which!r}")
    offset = 0.0 if which == "largest" else float(shift)

    def op(v: torch.Tensor) -> torch.Tensor:  # A, or shift * I - A
        av = counted(v)
        return av if which == "largest" else offset * v - av

    message = ""
    if dim <= 64 or k >= dim - 1:
        method = "dense"
        eye = torch.eye(dim, dtype=dtype, device=device)
        dense = torch.stack([op(eye[i]) for i in range(dim)]).double().cpu().numpy()
        with blas_threads(1):
            vals, vecs = scipy.linalg.eigh((dense + dense.T) / 2)
        order = np.argsort(vals)[::-1][:k]
        mu, vecs = vals[order], vecs[:, order]
    else:
        method = "arpack"
        ncv = min(dim, max(2 * k + 1, 20))
        maxiter = max(1, math.ceil(max(max_matvecs - ncv, 0) / max(ncv - k, 1)) + 1)
        np_dtype = np.float64 if dtype == torch.float64 else np.float32

        def np_matvec(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.ascontiguousarray(x, dtype=np_dtype).reshape(-1))
            return op(v.to(device)).cpu().numpy().astype(np_dtype, copy=False)

        linop = scipy.sparse.linalg.LinearOperator(
            (dim, dim), matvec=np_matvec, rmatvec=np_matvec, dtype=np_dtype
        )
        v0 = torch.randn(dim, generator=generator, dtype=torch.float64).numpy().astype(np_dtype)
        try:
            with blas_threads(1):
                mu, vecs = scipy.sparse.linalg.eigsh(
                    linop, k=k, which="LA", tol=tol, maxiter=maxiter, ncv=ncv, v0=v0,
                    **_arpack_restarts(generator),
                )  # fmt: skip
        except scipy.sparse.linalg.ArpackNoConvergence as err:
            mu, vecs = err.eigenvalues, err.eigenvectors
            message = (
                f"ARPACK converged for {len(mu)} of {k} eigenvalues within {count[0]} "
                f"matvecs (max_matvecs={max_matvecs}, tol={tol:g}); the others are NaN. "
                f"Raise max_matvecs or loosen tol"
            )
        except scipy.sparse.linalg.ArpackError as err:  # e.g. no Arnoldi factorization
            mu, vecs = np.zeros(0), np.zeros((dim, 0))
            message = f"ARPACK failed after {count[0]} matvecs ({err}); every value is NaN"
        order = np.argsort(mu)[::-1]
        mu, columns = np.asarray(mu, dtype=np.float64)[order], order
    if method == "dense":
        columns = np.arange(len(mu))
    values = np.full(k, np.nan)
    residuals = np.full(k, np.nan)
    vectors = torch.full((k, dim), float("nan"), dtype=dtype, device=device)
    found = len(mu)
    values[:found] = mu if which == "largest" else offset - mu
    # ARPACK in float32 computes its Ritz values from float32 sums (1e-6 relative on the
    # quickstart's MLP); the Rayleigh quotient of each Ritz vector, summed in float64 from the
    # product the residual takes anyway, is as accurate as the products (3-6e-8 against
    # float64 ARPACK's 7-9e-8 on float32 products), at no extra product
    refine = method == "arpack" and dtype != torch.float64
    for i in range(found):
        # column by column: a reordered copy of every eigenvector at once cost another k * dim
        v = torch.as_tensor(np.ascontiguousarray(vecs[:, columns[i]]), dtype=dtype).to(device)
        v = v / torch.linalg.vector_norm(v)
        vectors[i] = v
        product = counted(v)
        if refine:
            v64, product = v.double(), product.double()
            values[i] = float(torch.dot(v64, product) / torch.dot(v64, v64))
            residuals[i] = float(torch.linalg.vector_norm(product - values[i] * v64))
        else:
            residuals[i] = float(torch.linalg.vector_norm(product - values[i] * v))
    if refine and found > 1:
        # refined values that crossed (a near-double eigenvalue) go back in order
        order = np.argsort(-values[:found] if which == "largest" else values[:found], kind="stable")
        values[:found], residuals[:found] = values[:found][order], residuals[:found][order]
        vectors[:found] = vectors[:found][torch.as_tensor(order, device=vectors.device)]
    if which == "largest":
        finite = np.abs(values[np.isfinite(values)])
        floor = 1e-6 * (finite.max() if finite.size else 0.0)
        scales = np.maximum(np.abs(values), floor)
    else:
        scales = np.abs(offset - values)
    tolerances = tol * scales
    converged = np.isfinite(residuals) & (residuals <= tolerances)
    if not converged.all() and not message:
        bad = int((~converged).sum())
        message = (
            f"{bad} of {k} eigenvalues miss the residual tolerance (tol={tol:g}); the matvec "
            f"may be noisier than tol allows (float32: use tol >= 1e-4) or not symmetric"
        )
    return Eigenpairs(
        values=values,
        residuals=residuals,
        tolerances=tolerances,
        converged=converged,
        vectors=vectors,
        matvecs=count[0],
        which=which,
        tol=tol,
        method=method,
        message=message,
    )


#: whether ``eigsh`` takes ``rng`` (scipy >= 1.15, whose ARPACK draws its restart vectors there)
_EIGSH_TAKES_RNG = "rng" in inspect.signature(scipy.sparse.linalg.eigsh).parameters


def _arpack_restarts(generator: torch.Generator) -> dict[str, np.random.Generator]:
    """``eigsh``'s ``rng``, seeded from ``generator``'s seed (its state is left alone).

    ARPACK draws a fresh random vector whenever its Krylov space becomes
    invariant: a Hessian of low rank (a network whose output collapsed to a
    constant) does that within a few products. scipy >= 1.15 draws it from
    ``rng``, seeded from the operating system's entropy when none is given, so
    two calls on the same operator and generator returned different values
    there; with this they return the same bits. Older scipy's ARPACK draws
    from a fixed internal seed and takes no ``rng``.
    """
    if not _EIGSH_TAKES_RNG:
        return {}
    return {"rng": np.random.default_rng(generator.initial_seed())}


def gaussian_density(
    nodes: Sequence[np.ndarray] | np.ndarray,
    weights: Sequence[np.ndarray] | np.ndarray,
    grid: np.ndarray,
    width: float,
) -> np.ndarray:
    """Average over start vectors of ``sum_i w_i N(grid; node_i, width^2)``.

    ``nodes`` and ``weights`` are one array per start vector (or a single
    1-D array). Each Gaussian integrates to one, so the density integrates to
    the average total weight (one for SLQ weights).

    >>> grid = np.linspace(-5, 5, 2001)
    >>> d = gaussian_density([np.array([0.0])], [np.array([1.0])], grid, 1.0)
    >>> round(float(np.trapezoid(d, grid)), 4)
    1.0
    """
    if not width > 0:
        raise HessianError(f"the kernel width must be positive, got {width}")
    if isinstance(nodes, np.ndarray) and nodes.ndim == 1:
        nodes, weights = [nodes], [np.asarray(weights)]
    if len(nodes) != len(weights) or not len(nodes):
        raise HessianError(
            f"need one weight array per node array, got {len(nodes)} and {len(weights)}"
        )
    grid = np.asarray(grid, dtype=np.float64)
    out = np.zeros_like(grid)
    norm = 1.0 / (width * math.sqrt(2.0 * math.pi))
    for n, w in zip(nodes, weights):
        z = (grid[:, None] - np.asarray(n, dtype=np.float64)[None, :]) / width
        out += np.exp(-0.5 * z * z) @ np.asarray(w, dtype=np.float64)
    return out * norm / len(nodes)
