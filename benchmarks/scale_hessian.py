"""The all-reduce overhead of the Hessian-vector product on two processes.

    python benchmarks/scale_hessian.py [--models mlp wrn] [--samples 512] [--hvps 10] [--repeats 3]

Two processes (gloo, CPU, one torch thread each, spawned here) each hold half
of a probe set (digits, float32, BatchNorm, train mode, chunks of 128) and
time ``--hvps`` products of the sharded operator, every one ending in an
all-reduce of the product (and of two checksum slots per rank). The
baseline is what each rank would do without the other: one process, the
same half of the data, no process group (measured on rank 0 while rank 1
waits in a barrier). Their ratio is the cost of sharding. It splits into
two factors, measured too: the two processes sharing the machine (both
ranks computing their half alone at the same time, no all-reduce, over the
baseline) and the all-reduce itself (the sharded time over that). The
all-reduce of a vector of the Hessian's length is also timed alone. Times
are medians over interleaved repeats, per HVP; the load average is printed,
since other processes on the machine slow these times down.

Models: ``mlp``, the digits MLP (3 hidden layers of 32, 4,618 parameters);
``wrn``, WRN-10-1 on 16x16 digits (a small WideResNet, 77,754 parameters).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

# the models and probe sets of the single-process benchmark (same folder, on sys.path)
from hessian import build, probe_set

from normprobe.hessian import HessianOperator

Batch = tuple[torch.Tensor, torch.Tensor]


def _per_hvp(op: HessianOperator, hvps: int) -> float:
    """Seconds per product, graphs already cached."""
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    for _ in range(hvps):
        op.matvec(v)
    return (time.perf_counter() - start) / hvps


def _rank(rank: int, port: int, model_name: str, data: Batch, settings: dict, out: Path) -> None:
    """One of the two ranks: sharded products, then (rank 0) the same half alone."""
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=300),
    )
    try:
        x, y = data
        half = (
            (x[: len(x) // 2], y[: len(x) // 2])
            if rank == 0
            else (x[len(x) // 2 :], y[len(x) // 2 :])
        )
        model = build(model_name, x, wrn_depth=10)
        chunk_size, hvps = settings["chunk_size"], settings["hvps"]
        sharded = HessianOperator(model, F.cross_entropy, half, chunk_size=chunk_size)
        alone = HessianOperator(
            model, F.cross_entropy, half, chunk_size=chunk_size, distributed=False
        )
        buffer = torch.zeros(sharded.dim + 4)  # the product and the checksum slots
        for op in (sharded, alone):
            op.matvec(torch.ones(op.dim))  # builds and caches the graphs
        times: dict[str, list[float]] = {"two": [], "one": [], "concurrent": [], "allreduce": []}
        for _ in range(settings["repeats"]):
            dist.barrier()
            times["two"].append(_per_hvp(sharded, hvps))
            dist.barrier()
            if rank == 0:
                times["one"].append(_per_hvp(alone, hvps))
            dist.barrier()
            times["concurrent"].append(_per_hvp(alone, hvps))  # both ranks, no all-reduce
            dist.barrier()
            start = time.perf_counter()
            for _ in range(hvps):
                dist.all_reduce(buffer)
            times["allreduce"].append((time.perf_counter() - start) / hvps)
        if rank == 0:
            torch.save(
                {
                    "times": times,
                    "dim": sharded.dim,
                    "samples": sharded.num_samples,
                    "per_rank": sharded.rank_samples,
                },
                out / "times.pt",
            )
    finally:
        dist.destroy_process_group()


def allreduce_overhead(
    model_name: str = "mlp",
    *,
    samples: int = 512,
    chunk_size: int = 128,
    hvps: int = 10,
    repeats: int = 3,
) -> dict[str, float]:
    """Seconds per HVP on two gloo processes with half the probe set each, and on one with half.

    Returns ``two`` (sharded, per product, rank 0's clock), ``one`` (one
    process, half the data, no group), ``concurrent`` (both ranks on their
    half without a group, at the same time), ``allreduce`` (one all-reduce
    of a vector of the Hessian's length plus the checksum slots),
    ``ratio`` = two / one, ``sharing`` = concurrent / one, ``reduce`` =
    two / concurrent, and ``dim``, ``samples`` (over both ranks).
    """
    data = probe_set(model_name, samples)
    settings = {"chunk_size": chunk_size, "hvps": hvps, "repeats": repeats}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with TemporaryDirectory() as tmp:
        mp.start_processes(
            _rank,
            args=(port, model_name, data, settings, Path(tmp)),
            nprocs=2,
            start_method="spawn",
        )
        found = torch.load(Path(tmp) / "times.pt")
    result = {k: statistics.median(v) for k, v in found["times"].items()}
    result["ratio"] = result["two"] / result["one"]
    result["sharing"] = result["concurrent"] / result["one"]
    result["reduce"] = result["two"] / result["concurrent"]
    result["dim"], result["samples"] = found["dim"], found["samples"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "wrn"], choices=["mlp", "wrn"])
    parser.add_argument("--samples", type=int, default=512, help="the whole probe set")
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--hvps", type=int, default=10, help="products per timing")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, gloo on 127.0.0.1, one torch thread "
        f"per process, float32, BatchNorm in train mode, {args.samples} samples in chunks of "
        f"{args.chunk_size}, half per rank; median of {args.repeats} x {args.hvps} HVPs"
    )
    print(f"load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    header = (
        f"{'model':>5} {'params':>7} {'1 proc (ms)':>12} {'2 procs (ms)':>13} {'ratio':>6} "
        f"{'2 alone (ms)':>13} {'sharing':>8} {'reduce':>7} {'all-reduce (ms)':>16}"
    )
    print(header)
    for name in args.models:
        r = allreduce_overhead(
            name,
            samples=args.samples,
            chunk_size=args.chunk_size,
            hvps=args.hvps,
            repeats=args.repeats,
        )
        print(
            f"{name:>5} {int(r['dim']):>7} {1e3 * r['one']:>12.2f} {1e3 * r['two']:>13.2f} "
            f"{r['ratio']:>6.2f} {1e3 * r['concurrent']:>13.2f} {r['sharing']:>8.2f} "
            f"{r['reduce']:>7.2f} {1e3 * r['allreduce']:>16.3f}",
            flush=True,
        )
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        "1 proc: one process, half the data, no group; 2 procs: the sharded HVP (half each, "
        "all-reduced);\nratio = 2 procs / 1 proc (1: sharding is free) = sharing x reduce, "
        "where sharing = 2 alone / 1 proc\n(both ranks on their half at once, no all-reduce: "
        "the machine shared) and reduce = 2 procs / 2 alone (the all-reduce)"
    )


if __name__ == "__main__":
    main()
