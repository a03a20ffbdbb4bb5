"""Cost of the probes inside training, and the wall time of the quickstart analysis.

    python benchmarks/analyze.py [--norms batch layer none] [--repeats 3] [--no-quickstart] [--quick]

1. Probe overhead: ``analyses/quickstart.yaml`` restricted to ``--norms``,
   the Hessian off, trained twice side by side (interleaved, ``--repeats``
   rounds, fresh output folder each time): once with the representation,
   gradient-correlation and gradient-norm probes every 50 steps (the
   quickstart's schedule), once with every probe off. Printed: the median
   wall time of each and the overhead ``probes / no probes - 1`` (target
   <= 10%), the median of each round's ratio (its two runs adjacent in
   time, so the machine's drift cancels), with the rounds' spread.
   Then a probe step against the passes it cannot do without (one forward
   of the noisy batch, a forward and backward of each probe batch), each
   timed after 50 training steps on a copy, side by side: the probe calls'
   share divided by that ratio is what the passes alone would add to the
   runs, the floor of the overhead; the rest is the probes' own statistics,
   hooks and bookkeeping.
2. Quickstart: the whole ``analyses/quickstart.yaml`` (every normalizer,
   probes every 50 steps, the Hessian at steps 0 and 300), timed once, with the
   time of each run (target: <= 5 minutes on a 2-core machine).

Other processes on the machine slow torch's OpenMP threads badly; the load
average is printed with the results, so compare numbers from quiet runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import normprobe.run as run_module
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


class ProbeClock:
    """Time spent in measurement steps that ran measures, inside the runs of an analysis
    (``analyze`` in this process: the run module's ``measure_step`` is wrapped)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def __enter__(self) -> ProbeClock:
        self.real = run_module.measure_step

        def timed(model, step, inputs, measures, *args, **kwargs):
            measures = list(measures)
            start = time.perf_counter()
            try:
                return self.real(model, step, inputs, measures, *args, **kwargs)
            finally:
                if measures:
                    self.seconds += time.perf_counter() - start
                    self.calls += 1

        run_module.measure_step = timed
        return self

    def __exit__(self, *exc: object) -> None:
        run_module.measure_step = self.real


def probe_overhead(norms: list[str], repeats: int) -> tuple[float, float, float]:
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
    direct: list[float] = []  # per run with probes: probe time / the rest of the run
    calls = 0
    for _ in range(repeats):
        for name, overrides in cases.items():
            with ProbeClock() as clock:
                samples[name].append(timed_analyze(overrides, cpu[name]))
            if name == "probes every 50 steps":
                direct.append(clock.seconds / (samples[name][-1] - clock.seconds))
                calls = clock.calls
    print(
        f"\n1. probe overhead: quickstart, normalizers {', '.join(norms)}, 300 steps, Hessian off, "
        f"{repeats} pairs"
    )
    for name, values in samples.items():
        print(
            f"  {name:<24} {statistics.median(values):7.2f} s   ({', '.join(f'{v:.2f}' for v in values)})"
        )
    # The machine's speed drifts by 10-20% over minutes (the same run took 7.5-9.0 s in one
    # series), more than the effect: each pair's two runs are adjacent in time, so the median
    # of the pairs' ratios is steadier than the ratio of the two medians.
    pairs = _pair_ratios(samples)
    ratio = statistics.median(pairs)
    verdict = "ok" if ratio - 1 <= 0.10 else f"MISSED ({ratio - 1:.1%})"
    print(
        f"  overhead {ratio - 1:+.1%} (median of the pairs' ratios; pairs "
        f"{min(pairs) - 1:+.1%} to {max(pairs) - 1:+.1%}; ratio of the medians "
        f"{_median_ratio(samples) - 1:+.1%})   target <= 10%: {verdict}"
    )
    in_cpu = statistics.median(_pair_ratios(cpu))
    print(f"  in CPU time (user + system): overhead {in_cpu - 1:+.1%}")
    # the probes' own time inside each run: probe steps and training steps alternate every
    # 50 steps, so the drift cancels; this leaves out what the probes cost outside their
    # calls (their rows in the tables, about 1-2 points)
    inside = statistics.median(direct)
    print(
        f"  inside the runs: the probe calls take {inside:+.1%} of the rest of the run "
        f"(median of {len(direct)}: {min(direct):+.1%} to {max(direct):+.1%}; "
        f"{calls} probe steps a run)"
    )
    return ratio, in_cpu, 1 + inside


def passes_alone(norms: list[str], rounds: int = 15, between: int = 50) -> float:
    """A probe step against the passes it cannot do without, side by side.

    For each of ``norms``, the quickstart's model and probe batches as its
    run has them at step 50 (captured from an analysis of 60 steps); then,
    ``rounds`` times, ``between`` training steps on a copy (so that each
    measurement starts as a probe step in a run does, after training), then
    the measurement step, then again ``between`` steps and the bare passes
    on another copy: one forward without autograd of the noisy batch, and a
    forward and backward (``torch.autograd.grad`` of the weights) of each of
    the two probe batches. Returns the median over the normalizers of the
    ratio of their medians; printed per normalizer.
    """
    captured: dict[str, tuple] = {}
    real = run_module.measure_step
    current = [""]

    def grab(model, step, inputs, measures, *args, **kwargs):
        measures = list(measures)
        if measures and step == 50:
            captured[current[0]] = (copy.deepcopy(model), step, inputs, measures, args, kwargs)
        return real(model, step, inputs, measures, *args, **kwargs)

    run_module.measure_step = grab
    try:
        for norm in norms:
            current[0] = norm
            timed_analyze([f"normalizers=[{norm}]", "hessian.enabled=false", "train.steps=60",
                           "train.lr=[0.05]", "train.lr_extend=0"])  # fmt: skip
    finally:
        run_module.measure_step = real
    print(
        f"\n   a probe step against its bare passes ({rounds} rounds, {between} training steps "
        f"before each):"
    )
    ratios = []
    for norm, step_args in captured.items():
        p, b = _step_and_passes(real, step_args, rounds, between)
        ratios.append(p / b)
        print(
            f"  {norm:<8} probe step {p * 1e3:6.2f} ms, its bare passes {b * 1e3:6.2f} ms: "
            f"{p / b:.2f}x"
        )
    return statistics.median(ratios)


def _step_and_passes(
    measure_step: Callable[..., object], step_args: tuple, rounds: int, between: int
) -> tuple[float, float]:
    """Median seconds of the measurement step ``step_args`` and of its bare passes
    (:func:`passes_alone`), each after ``between`` training steps on a copy of the model."""
    model, step, inputs, measures, args, kwargs = step_args
    (xa, ya), (xb, yb) = inputs.batch_a, inputs.batch_b
    trainee, bare = copy.deepcopy(model), copy.deepcopy(model)
    opt = torch.optim.SGD(trainee.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    params = list(bare.parameters())

    def train() -> None:
        for _ in range(between):
            i = torch.randint(0, len(xa), (64,), generator=gen)
            F.cross_entropy(trainee(xa[i]), ya[i]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def passes() -> None:
        with torch.no_grad():
            bare(xa + 0.1)
        for x, y in ((xa, ya), (xb, yb)):
            torch.autograd.grad(F.cross_entropy(bare(x), y), params)

    def probe() -> None:
        measure_step(model, step, inputs, measures, *args, **kwargs)

    times: dict[str, list[float]] = {"probe": [], "passes": []}
    for _ in range(rounds):
        for name, fn in (("probe", probe), ("passes", passes)):
            train()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["probe"]), statistics.median(times["passes"])


def _pair_ratios(samples: dict[str, list[float]]) -> list[float]:
    return [a / b for a, b in zip(samples["probes every 50 steps"], samples["no probes"])]


def _median_ratio(samples: dict[str, list[float]]) -> float:
    return statistics.median(samples["probes every 50 steps"]) / statistics.median(
        samples["no probes"]
    )


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
        help="the probe overhead only, 7 pairs (for benchmarks/summary.py)",
    )
    args = parser.parse_args()
    if args.quick:  # seven pairs: the ratio of two ~9 s runs moves by several points between pairs
        args.no_quickstart, args.repeats = True, max(args.repeats, 7)
    print(
        f"normprobe analyze benchmark: torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start"
    )
    ratio, in_cpu, inside = probe_overhead(args.norms, args.repeats)
    alone = passes_alone(args.norms)
    floor = 1 + (inside - 1) / alone
    print(
        f"  the passes alone would take {floor - 1:+.1%} of the rest of the runs (the probe calls' "
        f"share {inside - 1:+.1%} divided by {alone:.2f}); the rest is the probes' statistics, "
        f"hooks and bookkeeping"
    )
    if not args.no_quickstart:
        quickstart()
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    print(f"RATIO probe_overhead_quickstart {ratio:.3f}")
    print(f"RATIO probe_overhead_quickstart_cpu {in_cpu:.3f}")
    print(f"RATIO probe_overhead_quickstart_inside {inside:.3f}")
    print(f"RATIO probe_step_over_bare_passes {alone:.3f}")
    print(f"RATIO probe_passes_floor_quickstart {floor:.3f}")
    print("LOAD " + " ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
