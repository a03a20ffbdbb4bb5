"""Where the Lanczos basis lives, and whether it fits there before a run starts.

SLQ keeps one ``(steps, dim)`` basis per start vector (reused from one start
vector to the next), which dominates its memory: ``steps * dim * itemsize``
bytes, 80 GB for 100 float64 steps of a 100M-parameter model. A run that
would not fit is refused before its first product, with the numbers and the
ways out (a float32 basis, fewer steps, a basis in host memory or in a
memory-mapped file), rather than dying in the allocator halfway or swapping.

- :func:`available_bytes`: memory free on a device now (CUDA: ``mem_get_info``;
  CPU: ``MemAvailable`` of ``/proc/meminfo``, else ``sysconf``; None if unknown).
- :func:`check_basis_fits`: raise :class:`BasisMemoryError` when the basis
  needs more than a budget (default: the free memory of its device).
- :func:`check_top_k_fits`: raise :class:`TopKCostError` when ARPACK's top-k
  (or the dense fallback) would need more memory or Hessian-vector products
  than it has, with the largest ``k`` that fits.
- :func:`lanczos_basis`: a context manager yielding the buffer on a device or
  in a memory-mapped file (removed afterwards).
- :func:`vectors_dtype`: the dtype Lanczos vectors are kept in by default.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from normprobe.hessian.lanczos import HessianError, basis_bytes

__all__ = [
    "BasisMemoryError",
    "TopKCostError",
    "available_bytes",
    "check_basis_fits",
    "check_product_budget",
    "check_top_k_fits",
    "top_k_cost",
    "lanczos_basis",
    "vectors_dtype",
]

#: fraction of the free memory the basis may take (the products need the rest)
BASIS_SHARE = 0.8


def vectors_dtype(dtype: torch.dtype, product_dtype: torch.dtype) -> torch.dtype:
    """The dtype :func:`~normprobe.hessian.spectrum.hessian_spectrum` keeps its Lanczos vectors in
    by default (SLQ's basis and ARPACK's vectors), from its ``dtype`` and the products' dtype.

    float64 only when both are float64: float32 products carry float32
    rounding, which float64 vectors do not remove, and float32 vectors take
    half the memory and half the time of the passes over them.

    >>> vectors_dtype(torch.float64, torch.float32), vectors_dtype(torch.float64, torch.float64)
    (torch.float32, torch.float64)
    """
    both_double = dtype == torch.float64 and product_dtype == torch.float64
    return torch.float64 if both_double else torch.float32


class BasisMemoryError(HessianError, MemoryError):
    """The Lanczos basis would not fit in the memory available for it."""


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes(device: torch.device | str | None = None) -> int | None:
    """Bytes free on ``device`` now (None when the platform does not say).

    >>> isinstance(available_bytes("cpu"), (int, type(None)))
    True
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        return _meminfo_available()
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_basis_fits(
    steps: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    *,
    budget: int | None = None,
) -> int:
    """The basis's bytes, after checking they fit in ``budget`` (default 80% of the free memory).

    Raises :class:`BasisMemoryError` naming the need, the budget and the
    options, each with its own need. Returns the bytes needed.

    >>> check_basis_fits(10, 1000, torch.float64, budget=10**6)
    80000
    >>> check_basis_fits(100, 10**6, torch.float64, budget=10**8)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    normprobe.hessian.basis.BasisMemoryError: the Lanczos basis needs 0.75 GiB (100 steps x 1,000,000 parameters x 8 bytes, float64) on cpu, but 0.09 GiB are available for it; pass basis_dtype=torch.float32 (0.37 GiB), fewer steps (12 steps: 0.09 GiB), ...
    """
    device = torch.device("cpu" if device is None else device)
    need = basis_bytes(steps, dim, dtype)
    if budget is None:
        free = available_bytes(device)
        if free is None:
            return need
        budget = int(BASIS_SHARE * free)
    if need <= budget:
        return need
    itemsize = need // max(steps * dim, 1)
    fit = max(budget // max(dim * itemsize, 1), 0)
    half = (
        f"basis_dtype=torch.float32 ({_gib(basis_bytes(steps, dim, torch.float32))}), "
        if dtype == torch.float64
        else ""
    )
    raise BasisMemoryError(
        f"the Lanczos basis needs {_gib(need)} ({steps} steps x {dim:,} parameters x "
        f"{itemsize} bytes, {str(dtype).replace('torch.', '')}) on {device}, but "
        f"{_gib(budget)} are available for it; pass {half}fewer steps ({fit} steps: "
        f"{_gib(basis_bytes(fit, dim, dtype))}), basis_device='cpu' when the model is on an "
        f"accelerator, or basis_path='/some/disk/file' (a memory-mapped basis, slower)"
    )


class TopKCostError(HessianError):
    """More top eigenvalues asked than ARPACK (or the dense fallback) can find within its memory
    or its budget of Hessian-vector products."""


#: at or below this dimension (or for k >= dim - 1) the top eigenvalues come from a dense
#: Hessian built column by column (:func:`normprobe.hessian.lanczos.extreme_eigenpairs`)
DENSE_DIM = 64


def top_k_cost(dim: int, k: int, dtype: torch.dtype = torch.float64) -> tuple[str, int, int]:
    """``(method, bytes, products)``: what the ``k`` extreme eigenvalues of a ``dim``-dimensional
    Hessian cost at least, the way :func:`~normprobe.hessian.lanczos.extreme_eigenpairs` finds
    them.

    ARPACK keeps ``ncv = min(dim, max(2k + 1, 20))`` Lanczos vectors of ``dim`` numbers, three
    work vectors, the start vector and a product's input and output, and needs at least ``ncv``
    products; its ``k`` eigenvectors come out in an array of their own and are returned as a
    ``(k, dim)`` tensor: ``(ncv + 6 + 2k) * dim`` numbers (376 bytes per parameter for the top
    10 in float64; a 50M-parameter model's top-10 needs 17.5 GiB).
    The dense fallback (``dim <= 64`` or ``k >= dim - 1``) builds the ``dim x dim`` Hessian (and
    an identity of that size) with ``dim`` products.

    >>> top_k_cost(126_218, 10)
    ('arpack', 47457968, 21)
    >>> top_k_cost(126_218, 126_217)[:2]
    ('dense', 254895736384)
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    if dim <= DENSE_DIM or k >= dim - 1:
        return "dense", dim * dim * (8 + itemsize), dim
    ncv = min(dim, max(2 * k + 1, 20))
    return "arpack", (ncv + 6 + 2 * k) * dim * itemsize, ncv


def check_top_k_fits(
    dim: int,
    k: int,
    dtype: torch.dtype = torch.float64,
    *,
    max_matvecs: int | None = None,
    device: torch.device | str | None = None,
    budget: int | None = None,
    name: str = "k",
) -> None:
    """Refuse ``k`` top eigenvalues when their cost (:func:`top_k_cost`) exceeds ``budget`` bytes
    (default 80% of the free memory of ``device``) or, when given, ``max_matvecs`` products
    (ARPACK cannot even fill its first Krylov space with fewer products than vectors).

    The message names the argument (``name``), the estimate and the largest ``k`` that fits.

    >>> check_top_k_fits(126_218, 10)
    >>> check_top_k_fits(126_218, 100_000, max_matvecs=1000, budget=16 * 2**30)
    Traceback (most recent call last):
    ...
    normprobe.hessian.basis.TopKCostError: k: 100000 eigenvalues of a Hessian of dimension 126,218 need ARPACK to keep 126,218 Lanczos vectors and 100,000 eigenvectors (306.78 GiB) and at least 126,218 Hessian-vector products, more than the 16.00 GiB available and more than its budget of 1000 products (max_matvecs); use k <= 499
    """
    method, need, products = top_k_cost(dim, k, dtype)
    if budget is None:
        free = available_bytes(device)
        budget = None if free is None else int(BASIS_SHARE * free)
    too_big = budget is not None and need > budget
    starved = method != "dense" and max_matvecs is not None and products > max_matvecs
    if not too_big and not starved:
        return
    itemsize = torch.empty((), dtype=dtype).element_size()
    # the largest k whose ARPACK run fits both limits (the dense path is only taken near k = dim)
    by_products = dim if max_matvecs is None else (max_matvecs - 1) // 2
    # (ncv + 6 + 2k) vectors with ncv = 2k + 1 (where k is large enough to matter)
    by_memory = by_products if budget is None else (budget // (dim * itemsize) - 7) // 4
    fit = max(0, min(by_products, by_memory, dim - 2))
    if method == "dense":
        what = (
            f"the dense Hessian ({dim:,} x {dim:,}: {_gib(need)}) built from {products:,} "
            "Hessian-vector products"
        )
    else:
        what = (
            f"ARPACK to keep {products:,} Lanczos vectors and {k:,} eigenvectors "
            f"({_gib(need)}) and at least {products:,} Hessian-vector products"
        )
    limits = []
    if too_big:
        limits.append(f"more than the {_gib(budget)} available")
    if starved:
        limits.append(f"more than its budget of {max_matvecs} products (max_matvecs)")
    raise TopKCostError(
        f"{name}: {k} eigenvalues of a Hessian of dimension {dim:,} need {what}, "
        f"{' and '.join(limits)}; use {name} <= {fit}"
    )


@contextmanager
def lanczos_basis(
    steps: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    budget: int | None = None,
) -> Iterator[torch.Tensor]:
    """A ``(steps, dim)`` buffer for :func:`~normprobe.hessian.lanczos.lanczos`, checked to fit.

    With ``path`` the buffer is a memory-mapped file there (host memory holds
    only the pages in use; the file is removed on exit and must not exist
    before); otherwise it is allocated on ``device`` after
    :func:`check_basis_fits`.

    >>> with lanczos_basis(4, 10, torch.float32) as q:
    ...     tuple(q.shape), q.dtype
    ((4, 10), torch.float32)
    """
    if path is None:
        check_basis_fits(steps, dim, dtype, device, budget=budget)
        yield torch.empty(steps, dim, dtype=dtype, device=device)
        return
    file = Path(path)
    if file.exists():
        raise HessianError(f"basis_path {str(file)!r} exists; pass a path to a new file")
    if not file.parent.is_dir():
        raise HessianError(f"basis_path {str(file)!r}: folder {str(file.parent)!r} does not exist")
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    mapped = np.memmap(file, dtype=np_dtype, mode="w+", shape=(steps, dim))
    try:
        yield torch.from_numpy(mapped)
    finally:
        del mapped
        file.unlink(missing_ok=True)


def check_product_budget(
    pieces: Sequence[str],
    steps: int,
    trace_samples: int,
    dim: int,
    max_matvecs: int,
    *,
    steps_name: str = "steps",
    adjustable: bool = True,
) -> None:
    """Refuse a Lanczos run or a trace estimate of more Hessian-vector products than
    ``max_matvecs``, up front (as an ARPACK run is bounded, :func:`check_top_k_fits`): a
    mistyped ``steps=10**6`` would otherwise start a run of ``dim`` products, hours long on a
    large model. ``steps_name`` names the steps in the message (a config calls them
    ``lanczos_steps``); ``adjustable`` says the caller can raise ``max_matvecs``.

    >>> try:
    ...     check_product_budget(("density",), 10**6, 64, 27_008, 1000)
    ... except HessianError as err:
    ...     print(err)  # doctest: +ELLIPSIS
    steps: 1000000 Lanczos steps per start vector (27008 after capping at the Hessian's ...
    """
    if not isinstance(max_matvecs, int) or max_matvecs < 1:
        raise HessianError(f"max_matvecs must be a positive integer, got {max_matvecs!r}")
    bound = (
        f"max_matvecs={max_matvecs} allows" if adjustable else f"the bound of {max_matvecs} allows"
    )
    raise_it = ", or raise max_matvecs" if adjustable else ""
    taken = min(steps, dim)
    if "density" in pieces and taken > max_matvecs:
        raise HessianError(
            f"{steps_name}: {steps} Lanczos steps per start vector ({taken} after capping at the "
            f"Hessian's dimension) are more Hessian-vector products than {bound} a run; use "
            f"{steps_name} <= {max_matvecs} (the reference takes 100){raise_it}"
        )
    if "trace" in pieces and trace_samples > max_matvecs:
        raise HessianError(
            f"trace_samples: {trace_samples} samples are more Hessian-vector products than "
            f"{bound} a run; use trace_samples <= {max_matvecs}{raise_it}"
        )
