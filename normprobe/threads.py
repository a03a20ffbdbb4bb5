"""How many torch CPU threads a run uses: ``threads: auto``.

Torch's default is one OpenMP thread per core. On a machine where anything
else runs (a shared workstation, a cluster node, N runs side by side with
``--jobs``) that default is the slow choice: an OpenMP parallel region ends
with every thread waiting for the slowest, and a thread the scheduler puts
aside holds all the others up. On a 2-core machine shared with other work,
two threads made a quickstart run more than 3x and a Hessian spectrum more
than 9x slower than one thread, while a second thread sped up an MLP's
training step by nothing below about 250,000 parameters and 1.2-1.4x at
0.5-1.9M (2 cores at load 2.6; ``benchmarks/contention.py`` measures
both).

``auto`` therefore picks a thread count from three things only: the model's
parameter count, the machine's core count (the cores this process may run
on) and the number of runs at once. It never looks at the momentary load,
so a rerun on the same machine uses the same count and reproduces bit for
bit (CPU reductions can depend on the thread count). The rule
(:func:`auto_threads`):

* one core is left free for the rest of the machine (on 1 or 2 cores that
  leaves 1 thread);
* the remaining cores are shared among the runs at once;
* a run gets one thread per :data:`PARAMETERS_PER_THREAD` parameters, at
  least 1, at most its share.

So on a 2-core machine every run uses 1 thread, serially or with
``--jobs 2``, and the two give bit-identical results.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from normprobe.errors import NormprobeError

__all__ = [
    "AUTO",
    "PARAMETERS_PER_THREAD",
    "Threads",
    "ThreadsError",
    "auto_threads",
    "check_threads",
    "machine_cores",
    "resolve_threads",
    "torch_threads",
]

#: The thread policy that picks the count from the model, the cores and the runs at once.
AUTO = "auto"
#: One thread per this many parameters: below it a second thread did not pay off on a 2-core
#: machine (an MLP of 126,218 parameters trained as fast with 1 thread as with 2; one of
#: 481,802 1.2x faster with 2; see ``benchmarks/contention.py --sizes``).
PARAMETERS_PER_THREAD = 250_000

#: A thread count, ``"auto"``, or None (leave torch's setting as it is).
Threads = int | Literal["auto"] | None


class ThreadsError(NormprobeError, ValueError):
    """A thread count that is neither a positive number nor ``"auto"``."""


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def auto_threads(parameters: int, cores: int | None = None, jobs: int = 1) -> int:
    """The torch thread count of ``threads: auto`` for one run.

    ``parameters``: the model's parameter count; ``cores``: the usable cores
    (default :func:`machine_cores`); ``jobs``: how many runs go at once.
    Depends on these three only, never on the load, so it is the same on
    every rerun on the same machine.

    >>> auto_threads(126_218, cores=2), auto_threads(5_000_000, cores=2, jobs=2)
    (1, 1)
    >>> auto_threads(100_000, cores=16), auto_threads(1_000_000, cores=16)
    (1, 4)
    >>> auto_threads(50_000_000, cores=16), auto_threads(50_000_000, cores=16, jobs=4)
    (15, 3)
    """
    if cores is None:
        cores = machine_cores()
    for name, value, least in (
        ("parameters", parameters, 0),
        ("cores", cores, 1),
        ("jobs", jobs, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ThreadsError(
                f"auto_threads: {name} must be a whole number >= {least}, got {value!r}"
            )
    share = max(1, (cores - 1) // jobs)  # one core left free, the rest shared among the runs
    return max(1, min(share, parameters // PARAMETERS_PER_THREAD))


def check_threads(threads: Threads, what: str = "threads") -> Threads:
    """``threads`` if it is a positive number, ``"auto"`` or None; else a
    :class:`ThreadsError` naming ``what``."""
    if threads is None or threads == AUTO:
        return threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ThreadsError(f"{what}: give a positive number of threads or 'auto', got {threads!r}")
    return threads


def resolve_threads(
    threads: Threads,
    parameters: int | nn.Module,
    *,
    jobs: int = 1,
    cores: int | None = None,
    what: str = "threads",
) -> int | None:
    """The thread count that ``threads`` asks for: a number as given, ``"auto"`` by
    :func:`auto_threads`, None as None (torch's setting left alone).

    ``parameters`` is a parameter count or the model itself.
    """
    if check_threads(threads, what) != AUTO:
        return threads
    if isinstance(parameters, nn.Module):
        parameters = sum(p.numel() for p in parameters.parameters())
    return auto_threads(parameters, cores, jobs)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch threads and restore the previous count after
    (None: leave it as it is).

    >>> before = torch.get_num_threads()
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
