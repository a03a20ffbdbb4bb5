"""The Hessian spectrum engine (docs/definitions.md, the Hessian).

- :func:`hessian_spectrum`: SLQ density, top-k and smallest eigenvalues with
  their convergence evidence, outlier ratio ``lambda_1 / lambda_K``,
  Hutchinson trace with its standard error, per-layer weight norms; returns
  a :class:`HessianSpectrum` (``density(grid, width)``, ``to_frame()``).
- :class:`HessianOperator`: ``v -> H v`` for any model, loss and probe set
  (chunks, ``norm_mode``, parameter subsets), also as a scipy ``LinearOperator``;
  batches by the contract of :mod:`normprobe.batch` (tuple and dict inputs,
  Hugging Face outputs), attention on the math SDPA kernel, half-precision
  models in float32.
- The math, free of models: :func:`lanczos`, :func:`gauss_quadrature`,
  :func:`stochastic_lanczos_quadrature`, :func:`hutchinson`,
  :func:`extreme_eigenpairs`, :func:`gaussian_density`, :func:`blas_threads`;
  :func:`hutch_plus_plus` (:mod:`normprobe.hessian.trace`), a trace estimator
  with a lower error than Hutchinson's at the same number of products.
- The basis's memory (:mod:`normprobe.hessian.basis`): checked before SLQ
  starts (:class:`BasisMemoryError` with the numbers), kept in float32, on
  another device or in a memory-mapped file on request.
- Several processes (:mod:`normprobe.hessian.distributed`): when
  ``torch.distributed`` is initialized (``torchrun``) with more than one
  rank, each rank's ``data`` is its shard of the probe set; products,
  gradient and loss are summed over the ranks by one all-reduce, weighted by
  sample count, and every rank returns the same result (``distributed=False``
  opts out). ``norm_mode="train"`` then means each rank's own chunks' batch
  statistics, as data-parallel training without ``SyncBatchNorm``.

This package works on any ``torch.nn.Module`` and never imports
``normprobe.norms`` or ``normprobe.models``.

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> data = torch.randn(64, 4), torch.randint(0, 3, (64,))
>>> spec = hessian_spectrum(net, nn.functional.cross_entropy, data, what="trace")
>>> spec.to_frame().query("metric == 'trace'")[["value", "stderr"]].shape
(1, 2)
"""

from __future__ import annotations

from normprobe.hessian.basis import (
    BasisMemoryError,
    available_bytes,
    check_basis_fits,
    lanczos_basis,
)
from normprobe.hessian.hvp import (
    Data,
    HessianOperator,
    LossFn,
    NormMode,
    ParamSelection,
    excluded_parameters,
    parameter_roles,
    select_parameters,
    split_chunks,
    weight_norms,
)
from normprobe.hessian.lanczos import (
    Eigenpairs,
    HessianError,
    LanczosResult,
    Quadrature,
    basis_bytes,
    blas_threads,
    default_breakdown_tol,
    extreme_eigenpairs,
    gauss_quadrature,
    gaussian_density,
    hutchinson,
    lanczos,
    lanczos_lockstep,
    mean_and_stderr,
    rademacher,
    ritz_residuals,
    stochastic_lanczos_quadrature,
)
from normprobe.hessian.spectrum import (
    DENSITY_WIDTH_FRACTION,
    PIECES,
    HessianConvergenceWarning,
    HessianSpectrum,
    Piece,
    fully_connected,
    hessian_spectrum,
)
from normprobe.hessian.trace import TraceEstimate, hutch_plus_plus, hutch_plus_plus_split, xtrace

__all__ = [
    # the spectrum
    "hessian_spectrum",
    "HessianSpectrum",
    "HessianConvergenceWarning",
    "Piece",
    "PIECES",
    "DENSITY_WIDTH_FRACTION",
    "fully_connected",
    # the operator
    "HessianOperator",
    "select_parameters",
    "excluded_parameters",
    "parameter_roles",
    "split_chunks",
    "weight_norms",
    "LossFn",
    "NormMode",
    "ParamSelection",
    "Data",
    # the math
    "lanczos",
    "lanczos_lockstep",
    "LanczosResult",
    "gauss_quadrature",
    "ritz_residuals",
    "stochastic_lanczos_quadrature",
    "Quadrature",
    "hutchinson",
    "mean_and_stderr",
    "extreme_eigenpairs",
    "Eigenpairs",
    "gaussian_density",
    "rademacher",
    "blas_threads",
    "default_breakdown_tol",
    # trace estimation beyond Hutchinson
    "hutch_plus_plus",
    "hutch_plus_plus_split",
    "xtrace",
    "TraceEstimate",
    # the Lanczos basis's memory
    "basis_bytes",
    "available_bytes",
    "check_basis_fits",
    "lanczos_basis",
    # errors
    "HessianError",
    "BasisMemoryError",
]
