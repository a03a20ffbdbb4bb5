"""The Hessian of a probe set sharded over the ranks of ``torch.distributed``.

When ``torch.distributed`` is initialized (under ``torchrun``, say) and the
group has more than one rank, :class:`~normprobe.hessian.hvp.HessianOperator`
and :func:`~normprobe.hessian.spectrum.hessian_spectrum` take each rank's
``data`` as its shard of one probe set; nothing else changes for the caller:

- ``n`` is the sum of the ranks' sample counts, exchanged once when the
  operator is built, and every chunk ``c`` of ``n_c`` samples, on whichever
  rank, gets weight ``n_c / n``: ``H = sum_c (n_c / n) H_c`` over all the
  ranks' chunks, exact for uneven shards;
- a product ``H v`` is each rank's weighted sum over its own chunks, summed
  over the ranks by one all-reduce; the gradient and the loss likewise;
- every rank runs the same Lanczos, ARPACK and Hutchinson iterations on the
  same reduced products and the same seeded random vectors, so every rank
  takes the same decisions (steps, restarts, breakdowns), issues the same
  collectives and returns the same result.

Exactness: the result is that of one process on the concatenation of the
shards in rank order, up to the rounding of the sum's order, whenever the
ranks' chunks are the chunks one process would use. With
``norm_mode="eval"`` and normalizers without batch statistics (LayerNorm,
GroupNorm, ...) chunking does not change ``H``, so that always holds. With
``norm_mode="train"`` and batch statistics, each rank normalizes with the
statistics of its own chunks: the Hessian of the loss that data-parallel
training without ``SyncBatchNorm`` minimizes, when the chunks are the
per-rank minibatches. ``hessian_spectrum``'s ``n_samples`` counts the whole
probe set: the rows are one process's seeded draw from the concatenated
shards, each rank keeping its own (a rank may keep none).

Every data-dependent method of the operator (``matvec``, ``gradient``,
``loss``) is a collective: call it on every rank, in the same order (where
only some ranks measure the Hessian, pass ``distributed=False``). Ranks
that disagree raise a :class:`~normprobe.hessian.lanczos.HessianError` on
every rank rather than hang or mix their numbers: the construction compares
the ranks' setup (a rank whose arguments were refused, the parameter count,
a checksum of the parameters' bits; differing buffers, such as running
statistics, only warn, in ``eval`` mode where they are used), and every
all-reduce carries, in slots of its own, a flag for a rank that failed
computing its share (an error in the loss, out of memory) and checksums of
the vector and of the parameters it used. A different ``seed`` on one rank,
or iterations drifting apart (processors that round differently), are
caught at the first product whose vectors differ. The checks cost a few
integer operations per parameter and product, with 16 bytes per parameter
of cached weights (0.6 ms a product for WRN-10-1's 78k parameters, against
about 400 ms for its HVP on 256 samples, one CPU thread).

Devices: the all-reduces run on the model's device, so CPU models need a
group with a CPU backend (``gloo``, or ``cpu:gloo,cuda:nccl``) and CUDA
models ``nccl`` (gloo all-reduces CUDA tensors through host memory, slowly,
and that path is not tested here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from normprobe.hessian.lanczos import HessianError

__all__ = [
    "ShardGroup",
    "raise_failures",
    "shard_group",
    "bits_checksum",
    "position_weights",
    "mantissa_bits",
]

_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
_PRIME = 2**31 - 1  # a Mersenne prime
_LOW30, _LOW32 = 2**30 - 1, 2**32 - 1
_BLOCK = 2**22  # elements per step: int64 temporaries of 32 MiB at most


def _mix(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finalizer on 30-bit integers (int64, no product reaches 2**62)."""
    x = x & _LOW30
    x = (x ^ (x >> 16)) * 0x85EBCA6B & _LOW30
    x = (x ^ (x >> 13)) * 0xC2B2AE35 & _LOW30
    return x ^ (x >> 16)


def position_weights(
    length: int, *, offset: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """The ``(2, length)`` int64 weights in ``[1, 2**30]`` of positions ``offset, offset + 1, ...``.

    Hashed (not an arithmetic progression, whose weighted sums of a +-1
    pattern take few values), so the checksum below separates patterns.
    """
    position = torch.arange(offset, offset + length, device=device)
    low = _mix(position * 0x9E3779B1 + 0x3C6EF372)
    high = _mix(low * 0x9E3779B1 + 0x2545F491)
    return torch.stack([low + 1, high + 1])


def bits_checksum(
    tensors: Sequence[torch.Tensor], bits: int = 62, *, weights: torch.Tensor | None = None
) -> int:
    """A checksum of the tensors' bit patterns, in ``[0, min(2**31 - 1, 2**bits))``.

    Each element's bits, read as an integer and cut into two 32-bit halves,
    are weighted by :func:`position_weights` of its position (its offset in
    the concatenation of ``tensors``; pass ``weights`` to reuse them), and
    the sum is taken modulo the prime ``2**31 - 1``, in integer arithmetic
    that never overflows: equal tensors give equal checksums on any
    machine, in any summation order, and a change of any bit (a sign, the
    last bit of a mantissa, a permutation) changes it except with
    probability about ``2**-31``. The ranks compare these to make sure they
    hold the same parameters and vectors.

    >>> a = torch.tensor([1.0, -1.0], dtype=torch.float64)
    >>> bits_checksum([a]) == bits_checksum([a.clone()]) != bits_checksum([a.flip(0)])
    True
    """
    total, offset = 0, 0
    for t in tensors:
        t = t.detach()
        kind = _INT_OF_SIZE.get(t.element_size())
        if t.numel() == 0 or kind is None or t.is_complex():
            continue
        for block in t.contiguous().reshape(-1).view(kind).split(_BLOCK):
            ints = block.to(torch.int64)
            n = ints.numel()
            if weights is None:
                w = position_weights(n, offset=offset, device=ints.device)
            else:
                w = weights[:, offset : offset + n]
            offset += n
            mixed = (ints & _LOW32) * w[0] + ((ints >> 32) & _LOW32) * w[1]  # < 2**63
            total = (total + int(mixed.remainder(_PRIME).sum())) % _PRIME
    return total % (1 << bits)


@dataclass(frozen=True)
class ShardGroup:
    """The ranks that each hold a shard of the probe set, and the all-reduces among them.

    ``group`` is the ``torch.distributed`` process group (None: the default
    group), ``rank`` this process's rank in it and ``size`` its number of
    ranks.
    """

    group: Any
    rank: int
    size: int

    @property
    def backend(self) -> str:
        return str(dist.get_backend(self.group))

    def device(self, preferred: torch.device | None) -> torch.device:
        """Where to put a tensor for a collective: ``preferred`` (the model's device) if known."""
        if preferred is not None:
            return preferred
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place, and return it."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def gather_ints(self, values: Sequence[int], device: torch.device | None) -> list[list[int]]:
        """Every rank's ``values`` (same length everywhere), by rank, through one all-reduce.

        Each rank writes its row of a ``(size, len(values))`` int64 table of
        zeros; the sum is the whole table. (An all-gather would do, but gloo
        has no all-gather of CUDA tensors; every backend has all-reduce.)
        """
        table = torch.zeros(self.size, len(values), dtype=torch.int64, device=self.device(device))
        table[self.rank] = torch.tensor(list(values), dtype=torch.int64)
        return self.all_reduce(table).tolist()

    def reduce_with_checks(
        self,
        total: torch.Tensor,
        checks: Sequence[int],
        names: Sequence[str],
        *,
        extra: Sequence[int] = (),
        failure: Exception | None = None,
    ) -> tuple[torch.Tensor, list[list[float]]]:
        """Sum ``total`` over the ranks, checking that every rank passed the same ``checks``.

        A flag saying whether this rank failed (``failure``: the error it
        met computing its share; ``total`` is then a placeholder), the checks
        (integers below ``2**mantissa_bits(total.dtype)``, exact in that
        dtype) and the ``extra`` values ride in per-rank slots appended to
        the same all-reduce, at no extra collective. Every rank sees every
        rank's slots, so all raise together or none does: the failing rank
        its own error, the others a :class:`HessianError` naming it; then a
        check that differs (``names`` names each). Returns the sum and each
        rank's ``extra`` values.
        """
        row = [float(failure is not None)] + [float(c) for c in checks] + [float(e) for e in extra]
        slots = torch.zeros(self.size, len(row), dtype=total.dtype, device=total.device)
        slots[self.rank] = torch.tensor(row, dtype=total.dtype)
        buffer = self.all_reduce(torch.cat([total.reshape(-1), slots.reshape(-1)]))
        seen = buffer[total.numel() :].view(self.size, len(row)).tolist()
        raise_failures([s[0] for s in seen], failure, "failed computing their share (the error")
        for j, name in enumerate(names, start=1):
            column = [r[j] for r in seen]
            odd = [r for r, c in enumerate(column) if c != column[0]]
            if odd:
                raise HessianError(
                    f"the ranks' {name} differ (rank 0 against rank(s) "
                    f"{', '.join(map(str, odd))}); every rank must run the same model with the "
                    f"same parameters and the same arguments (seed included): only the data "
                    f"may differ"
                )
        return buffer[: total.numel()].view_as(total), [r[1 + len(checks) :] for r in seen]


def mantissa_bits(dtype: torch.dtype) -> int:
    """How many bits of an integer a float of ``dtype`` holds exactly (52 for float64)."""
    return round(-math.log2(torch.finfo(dtype).eps))


def shard_group(distributed: bool | None = None, process_group: Any = None) -> ShardGroup | None:
    """The :class:`ShardGroup` to shard the probe set over, or None for one process.

    ``distributed=None`` (the default) shards when ``torch.distributed`` is
    initialized and ``process_group`` (default: the default group) has more
    than one rank; ``True`` requires an initialized group (one rank is then
    allowed); ``False`` computes on this rank's data alone.

    >>> shard_group() is None  # torch.distributed is not initialized here
    True
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise HessianError(f"distributed must be True, False or None, got {distributed!r}")
    if distributed is False:
        if process_group is not None:
            raise HessianError(
                "process_group was given with distributed=False; drop one of them "
                "(distributed=False computes on this rank's data alone)"
            )
        return None
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized:
        if distributed:
            raise HessianError(
                "distributed=True but torch.distributed is not initialized; launch with torchrun "
                "and call torch.distributed.init_process_group() first, or pass "
                "distributed=None (shard when initialized) or False"
            )
        if process_group is not None:
            raise HessianError(
                "process_group was given but torch.distributed is not initialized; "
                "call torch.distributed.init_process_group() first"
            )
        return None
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise HessianError(
            "this process is not a member of process_group; call the Hessian on the group's "
            "ranks only, or pass distributed=False"
        )
    size = dist.get_world_size(process_group)
    if size == 1 and distributed is None:
        return None
    return ShardGroup(group=process_group, rank=rank, size=size)


def raise_failures(flags: Sequence[float], failure: BaseException | None, what: str) -> None:
    """After an exchange of failure flags: this rank's own error, else one naming the others.

    ``what`` continues "rank(s) 1, 3 ..." up to the opening parenthesis of
    "(the ... is raised there)".
    """
    if failure is not None:
        raise failure
    failed = [r for r, flag in enumerate(flags) if flag]
    if failed:
        raise HessianError(
            f"rank(s) {', '.join(map(str, failed))} {what} is raised there); every rank stops"
        )
