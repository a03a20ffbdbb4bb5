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
- :func:`lanczos_basis`: a context manager yielding the buffer on a device or
  in a memory-mapped file (removed afterwards).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from normprobe.hessian.lanczos import HessianError, basis_bytes

__all__ = [
    "BasisMemoryError",
    "available_bytes",
    "check_basis_fits",
    "lanczos_basis",
]

#: fraction of the free memory the basis may take (the products need the rest)
BASIS_SHARE = 0.8


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
