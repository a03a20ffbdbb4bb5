"""Cost of the probes inside training, and the wall time of the quickstart analysis.

    python benchmarks/analyze.py [--norms batch layer none] [--repeats 3] [--no-quickstart] [--quick]

1. Probe overhead: ``analyses/quickstart.yaml`` restricted to ``--norms``,
   the Hessian off, trained twice side by side (interleaved, ``--repeats``
   rounds, fresh output folder each time): once with the representation,
   gradient-correlation and gradient-norm probes every 50 steps (the
   quickstart's schedule), once with every probe off. Printed: the median
   wall time of each and the overhead ``probes / no probes - 1`` (target
   <= 10%).
2. Quickstart: the whole ``analyses/quickstart.yaml`` (every normalizer,
   probes every 50 steps, the Hessian at three steps), timed once, with the
   time of each run (target: <= 5 minutes on a 2-core machine).

Other processes on the machine slow torch's OpenMP threads badly; the load
average is printed with the results, so compare numbers from quiet runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from normprobe import analyze

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "analyses" / "quickstart.yaml"


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (other load on the machine barely changes
    it, unlike wall time)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_analyze(overrides: list[str], cpu: list[float] | None = None) -> float:
    with tempfile.TemporaryDirectory() as out:
        start, used = time.perf_counter(), cpu_seconds()
        analyze(QUICKSTART, out=out, quiet=True, overrides=overrides)
        if cpu is not None:
            cpu.append(cpu_seconds() - used)
        return time.perf_counter() - start


def probe_overhead(norms: list[str], repeats: int) -> tuple[float, float]:
    common = [f"normalizers=[{','.join(norms)}]", "hessian.enabled=false"]
    off = [
        "probes.representation.enabled=false",
        "probes.gradient_correlation.enabled=false",
        "probes.gradient_norms.enabled=false",
    ]
    cases = {"probes every 50 steps": common, "no probes": common + off}
    timed_analyze(common + ["train.steps=10"])  # warm-up: imports, dataset, allocator
    samples: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, overrides in cases.items():
            samples[name].append(timed_analyze(overrides, cpu[name]))
    with_probes = statistics.median(samples["probes every 50 steps"])
    without = statistics.median(samples["no probes"])
    print(
        f"\n1. probe overhead: quickstart, normalizers {', '.join(norms)}, 300 steps, Hessian off, "
        f"median of {repeats}"
    )
    for name, values in samples.items():
        print(
            f"  {name:<24} {statistics.median(values):7.2f} s   ({', '.join(f'{v:.2f}' for v in values)})"
        )
    overhead = with_probes / without - 1
    verdict = "ok" if overhead <= 0.10 else f"MISSED ({overhead:.1%})"
    print(f"  overhead {overhead:+.1%}   target <= 10%: {verdict}")
    in_cpu = statistics.median(cpu["probes every 50 steps"]) / statistics.median(cpu["no probes"])
    print(f"  in CPU time (user + system): overhead {in_cpu - 1:+.1%}")
    return with_probes / without, in_cpu


def quickstart() -> None:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        results = analyze(QUICKSTART, out=out, quiet=True)
        wall = time.perf_counter() - start
    runs = results.runs
    print(f"\n2. quickstart: {len(runs)} runs ({', '.join(runs['normalizer'])})")
    for row in runs.itertuples():
        print(
            f"  {row.normalizer:<14} {row.seconds:6.1f} s  (measuring {row.measure_seconds:5.1f} s)"
            f"  {row.status}, test acc {row.final_test_acc:.3f}"
        )
    verdict = "ok" if wall <= 300 else f"MISSED ({wall / 60:.1f} min)"
    print(f"  wall time {wall:.1f} s   target <= 5 min: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norms", nargs="+", default=["batch", "layer", "none"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-quickstart", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the probe overhead only, median of 5 (for benchmarks/summary.py)",
    )
    args = parser.parse_args()
    if args.quick:  # five rounds: the ratio of two ~9 s runs moves by several points between rounds
        args.no_quickstart, args.repeats = True, max(args.repeats, 5)
    print(
        f"normprobe analyze benchmark: torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start"
    )
    ratio, in_cpu = probe_overhead(args.norms, args.repeats)
    if not args.no_quickstart:
        quickstart()
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    print(f"RATIO probe_overhead_quickstart {ratio:.3f}")
    print(f"RATIO probe_overhead_quickstart_cpu {in_cpu:.3f}")
    print("LOAD " + " ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
