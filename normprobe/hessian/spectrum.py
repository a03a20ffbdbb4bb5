"""The Hessian spectrum of a model: SLQ density, extreme eigenvalues, outlier ratio, trace.

(Over 500 lines, one job: the result type and the driver that fills it;
the math lives in lanczos.py, trace.py and basis.py, the operator in
hvp.py.)

:func:`hessian_spectrum` (docs/definitions.md, the Hessian) builds a
:class:`~normprobe.hessian.hvp.HessianOperator` and runs the pieces asked
for; :class:`HessianSpectrum` keeps the raw results (SLQ nodes and weights
per start vector, eigenvalues with their residuals, Hutchinson samples) so
that a density can be re-smoothed and a table rebuilt without recomputing.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from normprobe.batch import (
    OutputPick,
    autocast_on,
    autograd_available,
    batch_size,
    full_precision,
    model_device,
    take,
)
from normprobe.hessian.basis import (
    BasisMemoryError,
    check_product_budget,
    check_top_k_fits,
    lanczos_basis,
    vectors_dtype,
)
from normprobe.hessian.distributed import ShardGroup, shard_group
from normprobe.hessian.hvp import (
    Data,
    HessianOperator,
    LossFn,
    NormMode,
    ParamSelection,
    _as_batch,
    _is_batch,
    weight_norms,
)
from normprobe.hessian.lanczos import (
    Eigenpairs,
    HessianError,
    basis_bytes,
    extreme_eigenpairs,
    gaussian_density,
    hutchinson,
    mean_and_stderr,
    stochastic_lanczos_quadrature,
)
from normprobe.hessian.trace import hutch_plus_plus, xtrace
from normprobe.roles import is_normalizer
from normprobe.threads import Threads, check_threads, resolve_threads, torch_threads

__all__ = [
    "Piece",
    "PIECES",
    "HessianSpectrum",
    "HessianConvergenceWarning",
    "hessian_spectrum",
    "fully_connected",
    "DENSITY_WIDTH_FRACTION",
]

#: what :func:`hessian_spectrum` can compute; "top" includes the outlier ratio
Piece = Literal["density", "top", "smallest", "trace"]
PIECES: tuple[str, ...] = ("density", "top", "smallest", "trace")
#: how :func:`hessian_spectrum` estimates the trace
TraceMethod = Literal["hutchinson", "hutch++", "xtrace"]
TRACE_METHODS: tuple[str, ...] = ("hutchinson", "hutch++", "xtrace")
#: ``batched="auto"`` takes batched products only up to this many parameters (measured, b = 4,
#: 1 thread: 0.73-0.76 of a product's time per vector at 4.6k parameters, 0.88-1.08 at 126k)
BATCHED_MAX_DIM = 2**16
#: ``batched="auto"`` runs SLQ's start vectors side by side only while their bases take at most
#: this many bytes (measured, 40 steps, 1 thread: 4 start vectors of a 4.6k-parameter MLP, 6 MB,
#: 0.70x the time of one at a time; 2 of the quickstart's 126k-parameter MLP, 80 MB, 1.16x)
LOCKSTEP_BYTES = 32 * 2**20
#: default Gaussian kernel width of :meth:`HessianSpectrum.density`, as a fraction of the spectral range
DENSITY_WIDTH_FRACTION = 0.01

#: the default bound on each ARPACK run's Hessian-vector products (``max_matvecs``)
MAX_MATVECS = 1000


class HessianConvergenceWarning(UserWarning):
    """An eigenvalue missed its residual tolerance; its ``converged`` flag is False."""


@dataclass(frozen=True)
class HessianSpectrum:
    """Everything :func:`hessian_spectrum` measured, raw, with its settings.

    Pieces that were not asked for are None. ``nodes[j]`` / ``weights[j]``:
    SLQ quadrature of start vector ``j`` (``lanczos_steps[j]`` steps;
    ``breakdown[j]`` if the Krylov space became invariant earlier, which
    makes that quadrature exact rather than truncated); ``ritz_residuals[j]``
    the Ritz residual norm of each node (small: the node is an eigenvalue). ``top`` and
    ``smallest``: eigenvalues with residual norms, tolerances, convergence
    flags and matvec counts (vectors dropped). ``trace_samples``: the
    Hutchinson values ``v^T H v``. ``weight_norms``: Frobenius norm of every
    parameter tensor in the Hessian (eigenvalues of scale-invariant weights
    scale as ``1/||w||^2``, so read spectra of different normalizers with
    them). ``matvecs`` and ``seconds`` per piece. ``num_samples`` and
    ``num_chunks`` count every rank's, ``world_size`` the ranks that shared
    the probe set (1 in one process). ``excluded``: the parameters the
    default selection left out, with the reason ("frozen", "embedding",
    "norm"); ``product_dtype`` the dtype the Hessian-vector products ran in
    (float32 for a float16/bfloat16 model, ``model_dtype``).
    With ``trace_method="hutch++"``, ``trace_samples`` are the Hutchinson
    values of the deflated Hessian and ``trace_low_rank`` the exact trace over
    the sketched range, which :attr:`trace` adds (0 for plain Hutchinson and
    for ``"xtrace"``, whose samples are its exchangeable estimates ``t_i``).
    ``basis_dtype`` and ``reorthogonalize``: how the SLQ basis was kept
    (ARPACK's Lanczos vectors for ``top`` and ``smallest`` in the same dtype);
    ``batched``: per piece ("density", "trace"), whether its products were
    taken in blocks (:func:`hessian_spectrum`'s ``batched``; the numbers are
    the same either way).
    """

    dim: int
    num_samples: int
    num_chunks: int
    chunk_size: int
    norm_mode: str
    params: str
    dtype: str
    model_dtype: str
    seed: int
    steps: int
    num_vectors: int
    k: int
    num_classes: int | None
    tol: float
    weight_scaled: bool
    weight_norms: dict[str, float]
    nodes: list[np.ndarray] | None = None
    weights: list[np.ndarray] | None = None
    ritz_residuals: list[np.ndarray] | None = None
    lanczos_steps: list[int] | None = None
    breakdown: list[bool] | None = None
    top: Eigenpairs | None = None
    smallest: Eigenpairs | None = None
    trace_samples: np.ndarray | None = None
    matvecs: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    messages: tuple[str, ...] = ()
    world_size: int = 1
    excluded: dict[str, str] = field(default_factory=dict)
    product_dtype: str = ""
    trace_method: str = "hutchinson"
    trace_low_rank: float = 0.0
    basis_dtype: str | None = None
    reorthogonalize: str = "full"
    batched: dict[str, bool] = field(default_factory=dict)

    # -- derived values ----------------------------------------------------------------------

    @property
    def top_eigenvalues(self) -> np.ndarray:
        """The ``k`` largest eigenvalues, descending (NaN where the solver gave none)."""
        return self._need("top", self.top).values[: self.k]

    @property
    def smallest_eigenvalue(self) -> float:
        return float(self._need("smallest", self.smallest).values[0])

    @property
    def outlier_ratio(self) -> float:
        """``lambda_1 / lambda_K`` with K = :attr:`num_classes` (Rao & Sohl-Dickstein 2020, sec. 6);
        NaN if K is unknown, or if ``lambda_K`` is not positive (then the Hessian has fewer than
        K positive eigenvalues and there is no ratio of curvatures to report; a warning said so).
        """
        top = self._need("top", self.top)
        if self.num_classes is None or self.num_classes > len(top.values):
            return float("nan")
        lambda_k = float(top.values[self.num_classes - 1])
        if not lambda_k > 0:
            return float("nan")
        return float(top.values[0]) / lambda_k

    @property
    def outlier_ratio_converged(self) -> bool:
        top = self._need("top", self.top)
        if self.num_classes is None or self.num_classes > len(top.values):
            return False
        return bool(top.converged[0] and top.converged[self.num_classes - 1])

    @property
    def trace(self) -> float:
        """The estimate of ``tr H``: Hutchinson's mean (plus the sketched part for Hutch++)."""
        return self.trace_low_rank + mean_and_stderr(self._need("trace", self.trace_samples))[0]

    @property
    def trace_stderr(self) -> float:
        """Standard error of :attr:`trace`: sample std (ddof=1) over ``sqrt(samples)``.

        For Hutch++ that of the deflated samples, given the sketch.
        """
        return mean_and_stderr(self._need("trace", self.trace_samples))[1]

    @property
    def spectral_range(self) -> tuple[float, float]:
        """``(lambda_min, lambda_max)``: the converged extreme eigenvalues, else the SLQ node range."""
        lo, hi = math.inf, -math.inf
        if self.nodes is not None:
            lo = min(float(n.min()) for n in self.nodes)
            hi = max(float(n.max()) for n in self.nodes)
        if self.top is not None and self.top.converged[0]:
            hi = (
                max(hi, float(self.top.values[0]))
                if self.nodes is not None
                else float(self.top.values[0])
            )
        if self.smallest is not None and self.smallest.converged[0]:
            v = float(self.smallest.values[0])
            lo = min(lo, v) if self.nodes is not None else v
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise HessianError(
                "no spectral range: compute the density or both extreme eigenvalues "
                "(what=('density',) or what=('top', 'smallest'))"
            )
        return lo, hi

    @property
    def default_width(self) -> float:
        """The density's default kernel width: ``DENSITY_WIDTH_FRACTION`` (1%) of the spectral range."""
        lo, hi = self.spectral_range
        spread = hi - lo
        return DENSITY_WIDTH_FRACTION * (spread if spread > 0 else max(abs(hi), 1.0))

    def density(
        self, grid: np.ndarray | Sequence[float] | None = None, width: float | None = None
    ) -> pd.DataFrame:
        """The Gaussian-smoothed SLQ density on ``grid``: columns ``eigenvalue``, ``density``, ``width``.

        ``width`` defaults to :attr:`default_width` (1% of the spectral
        range); ``grid`` to 1000 points spanning the range plus five widths
        on each side. The density integrates to one over a wide enough grid.
        """
        nodes = self._need("density", self.nodes)
        weights = self._need("density", self.weights)
        width = self.default_width if width is None else float(width)
        if grid is None:
            lo, hi = self.spectral_range
            grid = np.linspace(lo - 5 * width, hi + 5 * width, 1000)
        grid = np.asarray(grid, dtype=np.float64)
        values = gaussian_density(nodes, weights, grid, width)
        return pd.DataFrame({"eigenvalue": grid, "density": values, "width": width})

    def to_frame(self) -> pd.DataFrame:
        """All measurements as a tidy table, one row per value.

        ``metric`` is one of ``eigenvalue`` (``index`` = rank 1..k),
        ``smallest_eigenvalue``, ``outlier_ratio`` (``index`` = K), ``trace``
        (with ``stderr``), ``trace_sample`` (``vector`` = probe), ``slq_node``
        (``vector`` = start vector, ``index`` = node, ``weight``, ``residual`` =
        Ritz residual norm),
        ``weight_norm`` (``layer`` = parameter name), ``excluded_param``
        (``layer`` = a parameter the default selection left out, ``reason``
        why; value NaN). Eigenvalue rows carry
        ``residual``, ``tolerance``, ``converged`` and ``matvecs`` (of that
        solve, residual checks included); node rows ``steps`` (Lanczos steps
        of that start vector); the trace row ``stderr`` and ``samples``.
        Every row carries the settings (``norm_mode``, ``seed``, ...).
        """
        rows: list[dict[str, Any]] = []
        if self.top is not None:
            for i in range(len(self.top.values)):
                rows.append(_eig_row("eigenvalue", i + 1, self.top, i))
            if self.num_classes is not None:
                rows.append(
                    {
                        "metric": "outlier_ratio",
                        "index": self.num_classes,
                        "value": self.outlier_ratio,
                        "converged": self.outlier_ratio_converged,
                    }
                )
        if self.smallest is not None:
            rows.append(_eig_row("smallest_eigenvalue", 1, self.smallest, 0))
        if self.trace_samples is not None:
            rows.append(
                {
                    "metric": "trace",
                    "value": self.trace,
                    "stderr": self.trace_stderr,
                    "samples": len(self.trace_samples),
                }
            )
            for j, s in enumerate(self.trace_samples):
                rows.append({"metric": "trace_sample", "vector": j, "value": float(s)})
        if self.nodes is not None and self.weights is not None:
            for j, (nodes, weights) in enumerate(zip(self.nodes, self.weights)):
                steps = self.lanczos_steps[j] if self.lanczos_steps else len(nodes)
                ritz = self.ritz_residuals[j] if self.ritz_residuals else [np.nan] * len(nodes)
                for i, (n, w, r) in enumerate(zip(nodes, weights, ritz)):
                    rows.append(
                        {
                            "metric": "slq_node",
                            "vector": j,
                            "index": i,
                            "value": float(n),
                            "weight": float(w),
                            "residual": float(r),
                            "steps": steps,
                        }
                    )
        for name, norm in self.weight_norms.items():
            rows.append({"metric": "weight_norm", "layer": name, "value": norm})
        for name, reason in self.excluded.items():
            rows.append({"metric": "excluded_param", "layer": name, "reason": reason})
        frame = pd.DataFrame(rows, columns=_COLUMNS[: _COLUMNS.index("reason") + 1])
        for col in ("index", "vector", "steps", "matvecs", "samples"):
            frame[col] = frame[col].astype("Int64")
        frame["converged"] = frame["converged"].astype("boolean")
        settings = {
            "norm_mode": self.norm_mode,
            "params": self.params,
            "dim": self.dim,
            "num_samples": self.num_samples,
            "chunk_size": self.chunk_size,
            "lanczos_steps": self.steps,
            "num_vectors": self.num_vectors,
            "dtype": self.dtype,
            "model_dtype": self.model_dtype,
            "tol": self.tol,
            "weight_scaled": self.weight_scaled,
            "seed": self.seed,
        }
        for key, value in settings.items():
            frame[key] = value
        return frame

    def _need(self, piece: str, value: Any) -> Any:
        if value is None:
            raise HessianError(
                f"this spectrum was computed without {piece!r}; call hessian_spectrum(..., "
                f"what=(..., {piece!r}))"
            )
        return value


_COLUMNS = [
    "metric",
    "index",
    "vector",
    "value",
    "weight",
    "stderr",
    "residual",
    "tolerance",
    "converged",
    "steps",
    "matvecs",
    "samples",
    "layer",
    "reason",
]


def _eig_row(metric: str, index: int, pairs: Eigenpairs, i: int) -> dict[str, Any]:
    return {
        "metric": metric,
        "index": index,
        "value": float(pairs.values[i]),
        "residual": float(pairs.residuals[i]),
        "tolerance": float(pairs.tolerances[i]),
        "converged": bool(pairs.converged[i]),
        "matvecs": pairs.matvecs,
    }


def _subsample(
    data: Data,
    n_samples: int | None,
    seed: int,
    shards: ShardGroup | None = None,
    device: torch.device | None = None,
) -> Data:
    """A seeded random subset of ``n_samples`` rows of a single ``(x, y)`` probe set.

    Sharded over ranks, the subset is that of one process on the
    concatenation of the shards in rank order (the same seeded permutation
    of all the rows, drawn on every rank), and each rank keeps the rows of
    its own shard: one exchange of the shard sizes, on every rank.
    """
    if n_samples is None:
        return data
    batch = _is_batch(data)
    if batch and n_samples < 1:
        raise HessianError(f"n_samples must be positive or None, got {n_samples}")
    if shards is None:
        if not batch:
            return data
        x, y = _as_batch(data)
        n = batch_size(x, y, "data", HessianError)
        if n <= n_samples:
            return x, y
        gen = torch.Generator().manual_seed(seed)
        index = torch.randperm(n, generator=gen)[:n_samples].sort().values
        return take(x, index), None if y is None else y[index.to(y.device)]
    rows = 0
    if batch:
        x, y = _as_batch(data)
        rows = batch_size(x, y, "data", HessianError)
    table = shards.gather_ints([int(batch), rows], device)
    if len({kind for kind, _ in table}) > 1:
        raise HessianError(
            "some ranks pass one (x, y) probe set and others an iterable of chunks; pass the "
            "same kind of data on every rank"
        )
    counts = [count for _, count in table]
    total = sum(counts)
    if not batch or total <= n_samples:
        return data
    offset = sum(counts[: shards.rank])
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(total, generator=gen)[:n_samples].sort().values
    mine = index[(index >= offset) & (index < offset + rows)] - offset
    return take(x, mine), None if y is None else y[mine.to(y.device)]


def _selection_label(params: ParamSelection, op: HessianOperator, model: nn.Module) -> str:
    if params is None:
        return "all"
    if isinstance(params, str):
        return params
    if isinstance(params, nn.Module):
        named = [name for name, m in model.named_modules() if m is params]
        return (named[0] or "all") if named else ",".join(op.names)
    return ",".join(params)


def fully_connected(model: nn.Module) -> bool:
    """Whether every layer with parameters of ``model`` is a ``Linear`` or a normalization layer.

    :func:`hessian_spectrum`'s ``batched="auto"`` takes batched products for
    such networks only (and only small ones): a rule of structure, so the
    path is the same on every run (measured on a CPU, b = 4, per vector:
    0.67-0.76 of a product's time on a 4.6k-parameter BatchNorm MLP,
    0.88-1.08 at 126k, 0.96-1.14 on WRN-16-1).

    >>> fully_connected(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    True
    >>> fully_connected(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))
    False
    """
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        if not isinstance(module, (nn.Linear, ParametrizationList)) and not is_normalizer(module):
            return False
    return True


def hessian_spectrum(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    what: Piece | Sequence[Piece] = PIECES,
    params: ParamSelection = None,
    norm_mode: NormMode = "train",
    n_samples: int | None = 512,
    chunk_size: int = 128,
    steps: int = 100,
    num_vectors: int = 4,
    k: int = 10,
    num_classes: int | None = None,
    trace_samples: int = 64,
    dtype: torch.dtype = torch.float64,
    tol: float | None = None,
    max_matvecs: int = MAX_MATVECS,
    weight_scaled: bool = False,
    graph_memory: int = 2 * 2**30,
    seed: int = 0,
    distributed: bool | None = None,
    process_group: Any = None,
    output: OutputPick = None,
    embeddings: bool = True,
    norms: bool = True,
    frozen: bool = False,
    product_dtype: torch.dtype | None = None,
    trace_method: TraceMethod = "hutchinson",
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    basis_path: str | os.PathLike[str] | None = None,
    reorthogonalize: Literal["full", "partial"] = "full",
    threads: Threads = None,
    batched: Literal["auto"] | bool = "auto",
) -> HessianSpectrum:
    """Hessian spectrum of the mean loss of ``model`` over a probe set (docs/definitions.md, the Hessian).

    ``data``: one ``(inputs, targets)`` probe set by the batch contract
    (:mod:`normprobe.batch`: inputs a tensor, a tuple or a dict such as
    ``{"input_ids": ..., "attention_mask": ...}``, targets a tensor or None),
    of which a seeded random subset of ``n_samples`` rows is used (all rows
    if fewer or ``None``) and cut into ``ceil(n / chunk_size)`` chunks of
    nearly equal size, at most ``chunk_size`` (64 rows at 24: 22, 21 and 21;
    :func:`~normprobe.hessian.hvp.split_chunks`); or an iterable of such
    chunks used as given (``chunk_size`` is then not used; the spectrum's
    ``num_chunks`` and ``num_samples`` say what was). The loss is
    ``loss_fn(prediction, targets)`` (``output=`` picks the prediction;
    ``loss_fn=None`` takes the model's own ``outputs.loss``). ``H = sum_c (n_c / n) H_c``; ``norm_mode`` picks batch
    statistics per chunk (``train``, running statistics untouched) or the
    running statistics (``eval``); ``params`` restricts the Hessian to some
    parameters (a layer, a block) for per-layer spectra; by default every
    trainable parameter, less embeddings (``embeddings=False``) or
    normalization gains (``norms=False``), plus frozen ones with
    ``frozen=True`` (the gradient probes' options; what is left out is in
    :attr:`HessianSpectrum.excluded`). Attention runs on the math SDPA
    kernel inside the products; a float16/bfloat16 model's products run in
    float32 (``product_dtype`` to choose). The model is left exactly as found.

    ``what`` selects the pieces (each can be asked for alone):

    - ``density``: SLQ with ``num_vectors`` Rademacher start vectors and
      ``steps`` Lanczos steps with full reorthogonalization, the basis kept
      in the coarser of ``dtype`` and the products' dtype unless
      ``basis_dtype`` says otherwise: float64 for a float64 model, float32
      for a float32 one, whose products carry float32 rounding anyway: its
      quadrature stays within 1e-7 of the spectral scale of the same model's
      in float64 with either basis (Wasserstein-1 distance: 1-3e-7 for both
      on the quickstart's 126k MLP; 3.0e-9 against 2.1e-9 on a 112k MLP;
      its projections are summed in float64 over blocks, see
      :func:`~normprobe.hessian.lanczos.lanczos`), and the float32 basis
      takes half the memory and about half the time of the passes over
      it. Basis
      memory ``steps * dim * itemsize``: 800 bytes per parameter at 100
      steps in float64, 400 in float32. Raw nodes and weights are kept,
      smoothed by :meth:`HessianSpectrum.density`. The basis is checked to
      fit before the first product (:class:`~normprobe.hessian.basis.BasisMemoryError`
      with the numbers otherwise); ``basis_dtype`` overrides its dtype,
      ``basis_device`` keeps it elsewhere (host memory for a model on an
      accelerator) and ``basis_path`` in a memory-mapped file.
      A start vector whose Lanczos run stops early (breakdown: an invariant
      Krylov subspace) is reported in ``breakdown`` and warned about.
      ``reorthogonalize="partial"`` reorthogonalizes only where Simon's
      estimate of the lost orthogonality (from the products' precision)
      reaches ``sqrt(eps)``: the same nodes to rounding, fewer passes over
      the basis.
    - ``top``: the ``k`` largest eigenvalues (at least ``K`` =
      ``num_classes``, by default read from an explicit classes axis: axis 1
      of an ``(N, K)`` prediction, the last axis for a model with
      ``classes_last = True`` such as a language model's ``(N, T, K)``
      scores; for other shapes K is not guessed, the outlier ratio is not
      reported and a warning says to pass ``num_classes=``) by ARPACK, and
      the outlier ratio ``lambda_1 / lambda_K``. ARPACK keeps its Lanczos
      vectors in the basis's dtype (``basis_dtype``, by default float32 for
      float32 products, as SLQ): on the quickstart's 126k MLP its own work
      per product is 0.23-0.29 of a product's time in float32 against
      0.46-0.63 in float64, for the same number of products. Each value is
      then the Rayleigh quotient of its vector summed in float64
      (:func:`~normprobe.hessian.lanczos.extreme_eigenpairs`), as close to
      the exact eigenvalue as with float64 vectors (3-6e-8 relative against
      7-9e-8 on the float32 copies of the exact-Hessian test MLPs).
    - ``smallest``: the smallest eigenvalue (ARPACK on ``lambda_1 I - H``).
    - ``trace``: Hutchinson with ``trace_samples`` Rademacher probes; the
      first ``num_vectors`` of them are the SLQ start vectors, and when the
      density is computed their ``v^T H v = dim * alpha_1`` come free from
      Lanczos (the same numbers up to rounding as one product each).
      ``trace_method="hutch++"`` or ``"xtrace"`` spends the same
      ``trace_samples`` products on :func:`~normprobe.hessian.trace.hutch_plus_plus`
      or :func:`~normprobe.hessian.trace.xtrace` instead (the trace over a
      sketch of the outliers' range taken exactly, Hutchinson on the rest;
      no free samples): a lower error when a few eigenvalues carry much of
      the Hessian's Frobenius norm (as after training), a higher one on a
      flat spectrum (as at initialization).

    ``batched`` takes the SLQ start vectors side by side (one batched
    product per Lanczos step, :func:`~normprobe.hessian.lanczos.lanczos_lockstep`,
    a basis per start vector) and the Hutchinson probes 8 at a time
    (:meth:`~normprobe.hessian.hvp.HessianOperator.matmat`): the same
    vectors and, row by row, the same products to rounding, so the same
    numbers to rounding (bit for bit on the BatchNorm MLPs measured, 5e-16
    relative on a tanh MLP in float64). ``"auto"`` (default) decides from
    the model's structure and size alone, never from a timing, so a rerun
    takes the same path: batched for a fully connected network (every
    layer with parameters a ``Linear`` or a normalization layer) of at
    most ``BATCHED_MAX_DIM`` (65,536) parameters (per vector 0.67-0.76 of a
    product's time at 4.6k parameters; 0.88-1.08 at 126k, no gain there),
    one product at a time for anything else (convolutions measured no
    faster batched on a CPU); and SLQ side by side only while the bases of
    all start vectors take at most ``LOCKSTEP_BYTES`` (32 MiB: beyond that
    the passes over several bases cost more than the batching saves, 1.16x
    the sequential time for the quickstart's 126k MLP; 0.69x for 4 start
    vectors of a 4.6k one, 0.97-1.0x for 2).
    SLQ stays sequential when the bases of all start vectors would not fit
    (or ``basis_path`` is given). :attr:`HessianSpectrum.batched` records
    the path each piece took.

    Every eigenvalue comes with ``||H v - lambda v||`` from one extra
    product; ``converged`` is False (and a :class:`HessianConvergenceWarning`
    is issued) when it exceeds ``tol`` relative to ``|lambda|`` (to the
    spread ``lambda_1 - lambda_min`` for the smallest). ``tol`` defaults to
    the square root of the machine epsilon of the coarser of ``dtype`` and
    the model's dtype (1.5e-8 in float64, 3.5e-4 in float32).
    ``max_matvecs`` bounds each ARPACK run, and is checked up front
    against each Lanczos run (``min(steps, dim)`` products) and the trace
    estimate (``trace_samples``). Randomness comes from ``seed``:
    SLQ and trace probes from ``Generator(seed)``, ARPACK start vectors from
    ``seed + 1`` (top) and ``seed + 2`` (smallest), the probe subset from
    ``seed``, and whatever random numbers the model's forward pass draws with
    dropout off (a functional dropout at a fixed rate: said in a warning)
    from torch's generators seeded by ``seed`` and the chunk
    (:class:`~normprobe.hessian.hvp.HessianOperator`'s ``seed``).

    Several processes (``torchrun``): when ``torch.distributed`` is
    initialized and the group (``process_group``, default the default group)
    has more than one rank, call this on every rank with the same arguments
    and that rank's shard as ``data`` (:mod:`normprobe.hessian.distributed`).
    Products, gradient and loss are summed over the ranks by one all-reduce
    each, weighted by sample counts, and every rank returns the same
    spectrum: that of one process on the shards concatenated in rank order
    whenever the ranks' chunks are that process's chunks (always in
    ``norm_mode="eval"``; in ``"train"`` each rank's chunks have their own
    batch statistics, as data-parallel training without ``SyncBatchNorm``).
    ``n_samples`` counts the whole probe set, as in one process: the subset
    is one process's subset of the concatenation, each rank keeping its own
    rows. ``distributed=False`` computes on this rank's data alone (pass it
    when only some ranks call this: the others would be waited for);
    ``True`` requires an initialized group.

    ``threads``: torch's CPU threads during the call, restored after it: a
    number, or ``"auto"`` (:func:`normprobe.threads.auto_threads` of the
    model's parameter count and this machine's cores: 1 below 250,000
    parameters and on 1-2 cores, much faster than torch's default on a
    machine shared with other work); None (the default) leaves them as set.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> data = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> spec = hessian_spectrum(net, nn.functional.cross_entropy, data, steps=20, k=3)
    >>> bool(spec.top.converged.all()), spec.num_classes, len(spec.nodes)
    (True, 3, 4)
    >>> bool(abs(spec.top_eigenvalues[0] - max(n.max() for n in spec.nodes)) < 1e-6)
    True
    """
    if threads is not None:  # the same call with that many torch threads, restored after
        arguments = {**locals(), "threads": None}
        count = resolve_threads(
            check_threads(threads, "threads"), model if isinstance(model, nn.Module) else 0
        )
        with torch_threads(count):
            return hessian_spectrum(**arguments)
    if torch.is_inference_mode_enabled():
        # inside a loop's torch.inference_mode() block: autograd back on for the whole call
        arguments = dict(locals())
        with autograd_available():
            return hessian_spectrum(**arguments)
    if isinstance(model, nn.Module) and autocast_on(model_device(model)):
        # inside a loop's autocast region: the whole call (products, Lanczos, ARPACK's
        # vectors) in the model's own dtype, as outside it
        arguments = dict(locals())
        with full_precision(model_device(model)):
            return hessian_spectrum(**arguments)
    pieces = (what,) if isinstance(what, str) else tuple(what)
    unknown = [p for p in pieces if p not in PIECES]
    if unknown or not pieces:
        raise HessianError(f"what must name pieces from {', '.join(PIECES)}, got {what!r}")
    if dtype not in (torch.float32, torch.float64):
        raise HessianError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise HessianError(f"num_classes must be a positive integer or None, got {num_classes!r}")
    for name, value in (("steps", steps), ("num_vectors", num_vectors), ("k", k)):
        if not isinstance(value, int) or value < 1:
            raise HessianError(f"{name} must be a positive integer, got {value!r}")
    if trace_method not in TRACE_METHODS:
        raise HessianError(
            f"trace_method must be one of {', '.join(TRACE_METHODS)}, got {trace_method!r}"
        )
    if batched not in ("auto", True, False):
        raise HessianError(f"batched must be 'auto', True or False, got {batched!r}")
    if basis_dtype not in (None, torch.float32, torch.float64):
        raise HessianError(f"basis_dtype must be torch.float32 or torch.float64, got {basis_dtype}")
    if trace_method != "hutchinson" and isinstance(trace_samples, int) and trace_samples < 4:
        raise HessianError(
            f"trace_method={trace_method!r} needs trace_samples >= 4 (a sketch of at least "
            f"one vector, its product and two samples), got {trace_samples}"
        )
    if not isinstance(trace_samples, int) or trace_samples < 2:
        raise HessianError(
            f"trace_samples must be an integer >= 2 (a standard error needs two), "
            f"got {trace_samples!r}"
        )
    shards = shard_group(distributed, process_group)
    first = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    data = _subsample(data, n_samples, seed, shards, None if first is None else first.device)
    op = HessianOperator(
        model,
        loss_fn,
        data,
        params=params,
        norm_mode=norm_mode,
        chunk_size=chunk_size,
        weight_scaled=weight_scaled,
        graph_memory=graph_memory,
        distributed=distributed,
        process_group=process_group,
        output=output,
        num_classes=num_classes,
        embeddings=embeddings,
        norms=norms,
        frozen=frozen,
        product_dtype=product_dtype,
        seed=seed,
    )
    if ("top" in pieces or "smallest" in pieces) and k > op.dim:
        raise HessianError(
            f"k: {k} eigenvalues asked of a Hessian of dimension {op.dim} (the parameters "
            f"selected); use k <= {op.dim}"
        )
    check_product_budget(pieces, steps, trace_samples, op.dim, max_matvecs)
    coarse = vectors_dtype(dtype, op.dtype)
    tol = math.sqrt(torch.finfo(coarse).eps) if tol is None else float(tol)
    # float32 products: float32 Lanczos vectors (SLQ's basis, ARPACK's) are as accurate as
    # they are, at half the memory and passes
    basis_kept = coarse if basis_dtype is None else basis_dtype
    if "top" in pieces or "smallest" in pieces:
        check_top_k_fits(op.dim, k, basis_kept)  # memory only: ARPACK works in host memory
    results: dict[str, Any] = {}
    matvecs: dict[str, int] = {}
    seconds: dict[str, float] = {}
    messages: list[str] = []
    probes = torch.Generator().manual_seed(seed)
    block = batched is True or (
        batched == "auto" and fully_connected(model) and op.dim <= BATCHED_MAX_DIM
    )
    used: dict[str, bool] = {}

    def timed(piece: str, fn: Any) -> Any:
        before, start = op.matvecs, time.perf_counter()
        out = fn()
        matvecs[piece] = op.matvecs - before
        seconds[piece] = time.perf_counter() - start
        return out

    K = num_classes
    with op:
        if K is None and "top" in pieces:
            op.loss()  # one pass over the data tells the output width
            K = op.num_outputs
            if K is None and op.classes_problem is not None:
                messages.append(f"outlier ratio not computed: {op.classes_problem}")
        quad = None
        if "density" in pieces:
            taken = min(steps, op.dim)
            side_by_side = (
                block
                and num_vectors > 1
                and basis_path is None
                and (
                    batched is True
                    or basis_bytes(num_vectors * taken, op.dim, basis_kept) <= LOCKSTEP_BYTES
                )
            )
            with ExitStack() as stack:
                basis = bases = None
                if side_by_side:
                    try:
                        bases = stack.enter_context(
                            lanczos_basis(
                                num_vectors * taken,
                                op.dim,
                                basis_kept,
                                op.device if basis_device is None else basis_device,
                            )
                        ).view(num_vectors, taken, op.dim)
                    except BasisMemoryError:
                        side_by_side = False  # one basis at a time fits, or the next check says why
                if not side_by_side:
                    basis = stack.enter_context(
                        lanczos_basis(
                            taken,
                            op.dim,
                            basis_kept,
                            op.device if basis_device is None else basis_device,
                            path=basis_path,
                        )
                    )
                used["density"] = side_by_side
                quad = timed(
                    "density",
                    lambda: stochastic_lanczos_quadrature(
                        op.matvec,
                        op.dim,
                        steps,
                        num_vectors,
                        generator=probes,
                        dtype=dtype,
                        device=op.device,
                        basis=basis,
                        reorthogonalize=reorthogonalize,
                        matvec_eps=torch.finfo(coarse).eps,
                        # the operator computes in its own dtype whatever it is given: hand
                        # it that, and save converting each vector and product
                        matvec_dtype=op.dtype,
                        matmat=op.matmat if side_by_side else None,
                        bases=bases,
                    ),
                )
            messages.extend(_breakdown_messages(quad.steps, quad.requested, quad.residual_norms))
            results.update(
                nodes=quad.nodes,
                weights=quad.weights,
                ritz_residuals=quad.ritz_residuals,
                lanczos_steps=quad.steps,
                breakdown=quad.breakdown,
            )
        if "trace" in pieces and trace_method != "hutchinson":
            estimator = hutch_plus_plus if trace_method == "hutch++" else xtrace
            estimate = timed(
                "trace",
                lambda: estimator(
                    op.matvec,
                    op.dim,
                    trace_samples,
                    generator=probes,
                    dtype=dtype,
                    device=op.device,
                ),
            )
            results.update(trace_samples=estimate.samples, trace_low_rank=estimate.low_rank)
        elif "trace" in pieces:
            used["trace"] = block

            def trace() -> np.ndarray:
                if quad is None:
                    return hutchinson(
                        op.matvec,
                        op.dim,
                        trace_samples,
                        generator=probes,
                        dtype=dtype,
                        device=op.device,
                        matmat=op.matmat if block else None,
                    )
                free = np.asarray(quad.first_moments[:trace_samples]) * op.dim
                rest = hutchinson(
                    op.matvec,
                    op.dim,
                    max(trace_samples - len(free), 0),
                    generator=probes,
                    dtype=dtype,
                    device=op.device,
                    matmat=op.matmat if block else None,
                )
                return np.concatenate([free, rest])

            results["trace_samples"] = timed("trace", trace)
        top = None
        if "top" in pieces:
            count = min(max(k, K or 0), op.dim)
            top = timed(
                "top",
                lambda: extreme_eigenpairs(
                    op.matvec,
                    op.dim,
                    count,
                    which="largest",
                    tol=tol,
                    max_matvecs=max_matvecs,
                    generator=torch.Generator().manual_seed(seed + 1),
                    dtype=basis_kept,
                    device=op.device,
                ),
            )
            if quad is not None:
                top = _check_against_nodes(top, quad.nodes, messages, torch.finfo(op.dtype).eps)
            results["top"] = dataclasses.replace(top, vectors=None)
            if top.message:
                messages.append(f"top eigenvalues: {top.message}")
            if K is not None and K <= len(top.values) and top.values[K - 1] <= 0:  # not NaN
                messages.append(
                    f"outlier ratio not defined: lambda_{K} = {top.values[K - 1]:.3g} is not positive, so "
                    f"the Hessian has fewer than K = {K} positive eigenvalues (as for a network "
                    f"whose output collapsed to a constant); outlier_ratio is NaN"
                )
        if "smallest" in pieces:
            shift = float(top.values[0]) if top is not None and top.converged[0] else None
            small = timed(
                "smallest",
                lambda: extreme_eigenpairs(
                    op.matvec,
                    op.dim,
                    1,
                    which="smallest",
                    shift=shift,
                    tol=tol,
                    max_matvecs=max_matvecs,
                    generator=torch.Generator().manual_seed(seed + 2),
                    dtype=basis_kept,
                    device=op.device,
                ),
            )
            if quad is not None:
                floor = min(float(n.min()) for n in quad.nodes)
                spread = abs(small.values[0]) + abs(floor)
                if small.values[0] > floor + small.residuals[0] + 1e-8 * spread:
                    small = dataclasses.replace(small, converged=np.array([False]))
                    messages.append(
                        f"smallest eigenvalue {small.values[0]:.6g} lies above an SLQ node "
                        f"{floor:.6g}: ARPACK missed the bottom of the spectrum"
                    )
            if small.message:
                messages.append(f"smallest eigenvalue: {small.message}")
            results["smallest"] = dataclasses.replace(small, vectors=None)
    # a model whose double backward cannot be batched took its products one at a time
    used = {piece: way and op.batch_works is not False for piece, way in used.items()}
    spectrum = HessianSpectrum(
        dim=op.dim,
        num_samples=op.num_samples,
        num_chunks=op.num_chunks,
        chunk_size=chunk_size,
        norm_mode=norm_mode,
        params=_selection_label(params, op, model),
        dtype=str(dtype).replace("torch.", ""),
        model_dtype=str(op.model_dtype).replace("torch.", ""),
        product_dtype=str(op.dtype).replace("torch.", ""),
        excluded=dict(op.excluded),
        seed=seed,
        steps=steps,
        num_vectors=num_vectors,
        k=k,
        num_classes=K,
        tol=tol,
        weight_scaled=weight_scaled,
        weight_norms=weight_norms(op.named),
        matvecs=matvecs,
        seconds=seconds,
        messages=tuple(messages),
        world_size=op.world_size,
        trace_method=trace_method,
        basis_dtype=str(basis_kept).replace("torch.", ""),
        reorthogonalize=reorthogonalize,
        batched=used,
        **results,
    )
    for message in messages:
        warnings.warn(message, HessianConvergenceWarning, stacklevel=2)
    return spectrum


def _breakdown_messages(taken: list[int], requested: int, residuals: list[float]) -> list[str]:
    """One line per start vector whose Lanczos run stopped before ``requested`` steps."""
    return [
        f"SLQ start vector {j}: Lanczos stopped after {s} of {requested} steps (breakdown: "
        f"residual norm {r:.3g}, an invariant Krylov subspace); its {s} nodes are exact "
        f"eigenvalues of a Hessian with few distinct ones, or the operator is not symmetric"
        for j, (s, r) in enumerate(zip(taken, residuals))
        if s < requested
    ]


def _check_against_nodes(
    top: Eigenpairs, nodes: Sequence[np.ndarray], messages: list[str], model_eps: float = 0.0
) -> Eigenpairs:
    """Flag lambda_1 if an SLQ Ritz value exceeds it: Ritz values never exceed lambda_max.

    Both are computed through the model's HVPs, which carry rounding of the
    model's precision (``model_eps``: a float32 model's products are not
    symmetric beyond ~1e-7 relative), so a node above lambda_1 by less than
    100 such units is agreement, not a miss.
    """
    ceiling = max(float(n.max()) for n in nodes)
    lam, res = float(top.values[0]), float(top.residuals[0])
    slack = res + max(1e-8, 100 * model_eps) * abs(lam)
    if np.isfinite(lam) and ceiling > lam + slack:
        converged = top.converged.copy()
        converged[0] = False
        messages.append(
            f"top eigenvalue {lam:.6g} lies below an SLQ node {ceiling:.6g}: "
            f"ARPACK missed the top of the spectrum"
        )
        return dataclasses.replace(top, converged=converged)
    return top
