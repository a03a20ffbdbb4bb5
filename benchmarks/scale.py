"""Scaling out: the quick grid on 1 and 2 local workers (and the Hessian on two processes).

    python benchmarks/scale.py [--steps N] [--jobs 2] [--repeats 1] [--no-hessian]

1. Run grid: ``analyses/quickstart.yaml`` (every normalizer that fits the
   MLP, 15 runs), one torch thread per worker (``train.threads=1``), timed
   with the local executor one run at a time in this process (1 worker) and
   with ``--jobs 2`` (2 worker processes, started by the timed call: their
   start-up counts), side by side (interleaved, ``--repeats`` rounds, a fresh
   output folder each time). Printed: the wall time of each, the speed-up
   (target >= 1.6x with 2 workers on a 2-core machine), and whether the two
   gave the same tables bit for bit. ``--steps`` shortens the training
   (default: the quickstart's 300 steps, about three minutes one at a time).
2. Hessian all-reduce overhead: ``benchmarks/scale_hessian.py``'s ``main()``
   with its defaults, when that file exists (``--no-hessian`` skips it).

Other processes on the machine take cores from the workers; the load
average is printed with the results, so compare numbers from quiet runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from normprobe import Results, analyze

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "analyses" / "quickstart.yaml"
TARGET = 1.6


def timed_grid(overrides: list[str], jobs: int | None) -> tuple[float, Results]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        results = analyze(QUICKSTART, out=out, quiet=True, overrides=overrides, jobs=jobs)
        return time.perf_counter() - start, results


def same_tables(a: Results, b: Results) -> bool:
    try:
        pd.testing.assert_frame_equal(a.metrics, b.metrics, check_exact=True)
        pd.testing.assert_frame_equal(a.hessian_nodes, b.hessian_nodes, check_exact=True)
    except AssertionError:
        return False
    return True


def run_grid(steps: int | None, jobs: int, repeats: int) -> None:
    overrides = ["train.threads=1"] + ([f"train.steps={steps}"] if steps else [])
    cases = {"1 worker (in process)": None, f"{jobs} workers (--jobs {jobs})": jobs}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    results: dict[str, Results] = {}
    for _ in range(repeats):
        for name, n in cases.items():
            wall, results[name] = timed_grid(overrides, n)
            samples[name].append(wall)
    one, many = (statistics.median(samples[name]) for name in cases)
    runs = next(iter(results.values())).runs
    print(
        f"\n1. run grid: quickstart, {len(runs)} runs of {steps or 300} steps, "
        f"1 torch thread per worker, median of {repeats}"
    )
    for name, values in samples.items():
        print(
            f"  {name:<24} {statistics.median(values):7.1f} s   "
            f"({', '.join(f'{v:.1f}' for v in values)})"
        )
    speedup = one / many
    verdict = "ok" if speedup >= TARGET else "MISSED"
    print(f"  speed-up {speedup:.2f}x   target >= {TARGET}x: {verdict}")
    a, b = results.values()
    print(f"  same tables bit for bit: {'yes' if same_tables(a, b) else 'NO'}")


def hessian_allreduce() -> None:
    """2. The Hessian all-reduce overhead: benchmarks/scale_hessian.py, when it exists."""
    path = Path(__file__).with_name("scale_hessian.py")
    print("\n2. Hessian all-reduce overhead (benchmarks/scale_hessian.py)")
    if not path.exists():
        print("  skipped: benchmarks/scale_hessian.py is not there")
        return
    # imported by name from its folder, so the processes it spawns can import it too
    sys.path.insert(0, str(path.parent))
    argv = sys.argv
    sys.argv = [str(path)]  # its own defaults
    try:
        importlib.import_module(path.stem).main()
    finally:
        sys.argv = argv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="training steps (default: the quickstart's)")
    parser.add_argument("--jobs", type=int, default=2, help="workers to compare with one")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-hessian", action="store_true", help="skip the Hessian part")
    args = parser.parse_args()
    print(
        f"normprobe scaling benchmark: torch {torch.__version__}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    run_grid(args.steps, args.jobs, args.repeats)
    if not args.no_hessian:
        hessian_allreduce()
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":  # the worker processes import this file again: keep the guard
    main()
