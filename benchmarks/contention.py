"""What a busy machine costs: torch's default threads against ``threads: auto``.

    python benchmarks/contention.py [--quick] [--repeats 3] [--spinners 1] [--sizes]

Two jobs, each timed on the machine as it is ("quiet") and beside CPU-bound
background processes ("busy": ``--spinners`` Python busy loops, default one,
started before the timing and killed after it, each in a session of its own
as another user's job would be; ``--same-session`` keeps them in this one,
where Linux's autogroup scheduling makes them share this session's part of
the CPU with the job), under two thread policies:

- ``default``: torch's default, one thread per core (what a run got before
  ``threads: auto``);
- ``auto``: :func:`normprobe.threads.auto_threads` for the job's model.

The jobs:

(a) ``quickstart``: ``analyses/quickstart.yaml`` with the normalizers
    batch and layer (``--quick``: batch only, 40 steps, the top eigenvalues
    at the last step), into a
    temporary folder, the policy passed as ``analyze(threads=...)``;
(b) ``hessian``: :func:`normprobe.hessian_spectrum` of the quickstart's MLP
    (8 x 128 with BatchNorm, 126,218 parameters) on its 256 Hessian samples:
    density (2 x 40 Lanczos steps), top-10 and trace (16 samples), as in the
    quickstart (``--quick``: top-5 and 20 steps), the policy passed as
    ``hessian_spectrum(threads=...)``.

Each timing runs in a fresh process (the import is not timed), the
measurements interleaved (quiet and busy, default and auto, round after
round) and the medians printed. A timing that passes ``--limit`` seconds is
stopped and counted as the limit (printed with ``>``; a ratio over it is
then a bound, and said so). Printed per job: the contention cost (busy / quiet) of each
policy (target for auto: < 2x) and the quiet time of auto over default,
with the load average; and at the end one ``RATIO <name> <value>`` line per
ratio for collecting.

``--sizes`` adds the measurement behind ``PARAMETERS_PER_THREAD``: the time
of a training step (batch 64, SGD, BatchNorm MLP on 64 features) with 1 and
with 2 threads, interleaved, for MLPs from 3,530 to 1.9M parameters.

The machine's other work counts too: on a shared machine the "quiet"
numbers are not quiet, so compare ratios from one run, with its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "analyses" / "quickstart.yaml"
SPIN = "while True:\n    pass\n"


# ---------------------------------------------------------------------------
# the jobs, each run in a child process: `contention.py --child JOB THREADS [--quick]`


def _quickstart_job(threads: int | str, quick: bool) -> float:
    from normprobe import analyze

    overrides = ["normalizers=[batch,layer]"]
    if quick:
        overrides = [
            "normalizers=[batch]",
            "train.steps=40",
            "probes.schedule.every=20",
            "hessian.schedule=[40]",
            "hessian.pieces=[top]",
        ]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        analyze(QUICKSTART, out=out, quiet=True, overrides=overrides, threads=threads)
        return time.perf_counter() - start


def hessian_case(quick: bool):
    """The quickstart's MLP and Hessian probe set, and the spectrum's arguments."""
    import torch
    import torch.nn.functional as F

    import normprobe

    ds = normprobe.load_dataset("digits", normalize="unit")
    index = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(0))[:256]
    data = ds.train.x[index.sort().values], ds.train.y[index.sort().values]
    model = normprobe.build_model("mlp", "batch", seed=0, depth=8, width=128, input_shape=64)
    if quick:
        options = {"what": "top", "k": 5, "steps": 20}
    else:
        options = {"what": ("density", "top", "trace"), "steps": 40, "num_vectors": 2, "k": 10}
    kwargs = {"loss_fn": F.cross_entropy, "trace_samples": 16, "chunk_size": 128, **options}
    return model, data, kwargs


def _hessian_job(threads: int | str, quick: bool) -> float:
    from normprobe import hessian_spectrum

    model, data, kwargs = hessian_case(quick)
    start = time.perf_counter()
    hessian_spectrum(model, data=data, threads=threads, **kwargs)
    return time.perf_counter() - start


JOBS = {"quickstart": _quickstart_job, "hessian": _hessian_job}


def _child(job: str, threads: str, quick: bool) -> None:
    count: int | str = threads if threads == "auto" else int(threads)
    print(json.dumps({"seconds": JOBS[job](count, quick)}), flush=True)


# ---------------------------------------------------------------------------
# the parent: spinners, interleaved timings, ratios


def spinners(n: int, same_session: bool = False) -> list[subprocess.Popen]:
    """``n`` busy loops, each in a session of its own (another user's job: with Linux's
    autogroup scheduling a session shares the CPU as one) unless ``same_session``."""
    procs = [
        subprocess.Popen([sys.executable, "-c", SPIN], start_new_session=not same_session)
        for _ in range(n)
    ]
    time.sleep(0.5)  # let them take their share of the cores
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


def timed(
    job: str, threads: str, quick: bool, busy: int, limit: float, same_session: bool = False
) -> tuple[float, bool]:
    """Seconds of one job in a child process (beside ``busy`` spinners), and whether it hit
    ``limit`` (then the limit is returned)."""
    command = [sys.executable, __file__, "--child", job, threads] + (["--quick"] if quick else [])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    background = spinners(busy, same_session) if busy else []
    try:
        out = subprocess.run(
            command, capture_output=True, text=True, timeout=limit, env=env, check=True
        )
    except subprocess.TimeoutExpired:
        return limit, True
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"{job} with {threads} threads failed:\n{err.stderr}") from None
    finally:
        stop(background)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"], False


def _parameters_of_quickstart_mlp() -> int:
    import normprobe

    model = normprobe.build_model("mlp", "batch", seed=0, depth=8, width=128, input_shape=64)
    return sum(p.numel() for p in model.parameters())


def contention(args: argparse.Namespace) -> dict[str, float]:
    from normprobe.threads import auto_threads, machine_cores

    cores = machine_cores()
    parameters = _parameters_of_quickstart_mlp()
    policies = {"default": str(cores), "auto": "auto"}
    print(
        f"contention benchmark{' (--quick)' if args.quick else ''}: {cores} cores, default "
        f"{cores} thread(s) (torch's: one per core), auto {auto_threads(parameters, cores)} "
        f"thread(s) for the quickstart MLP ({parameters:,} parameters); busy = beside "
        f"{args.spinners} busy-loop process(es) "
        f"({'in this session' if args.same_session else 'each in a session of its own'}); "
        f"{args.repeats} round(s), limit {args.limit:.0f} s "
        f"per timing; load average {_load()} at start",
        flush=True,
    )
    ratios: dict[str, float] = {}
    bounded: list[str] = []
    for job in args.jobs:
        samples: dict[tuple[str, str], list[float]] = {}
        capped: set[tuple[str, str]] = set()
        loads = []
        for _ in range(args.repeats):
            for policy, threads in policies.items():
                for state, busy in (("quiet", 0), ("busy", args.spinners)):
                    loads.append(os.getloadavg()[0])
                    seconds, hit = timed(
                        job, threads, args.quick, busy, args.limit, args.same_session
                    )
                    samples.setdefault((policy, state), []).append(seconds)
                    if hit:
                        capped.add((policy, state))
        med = {key: statistics.median(values) for key, values in samples.items()}
        print(f"\n{job}: median of {args.repeats}, load average {min(loads):.2f}-{max(loads):.2f}")
        for policy in policies:
            quiet, busy = med[(policy, "quiet")], med[(policy, "busy")]
            cost: float | None = busy / quiet
            if (policy, "quiet") in capped:
                said, cost = "   n/a (quiet over the limit)", None
            else:
                said = f"{'>' if (policy, 'busy') in capped else ' '}{cost:5.2f}x"
            if policy == "auto" and cost is not None:
                said += "  target < 2x: " + ("ok" if cost < 2 else "MISSED")
            print(
                f"  {policy:<8} quiet {_shown(med, capped, policy, 'quiet')}   "
                f"busy {_shown(med, capped, policy, 'busy')}   "
                f"contention cost {said}   (quiet {_list(samples[(policy, 'quiet')])}; "
                f"busy {_list(samples[(policy, 'busy')])})"
            )
            if cost is not None:
                ratios[f"contention_cost_{job}_{policy}"] = cost
                if (policy, "busy") in capped:
                    bounded.append(f"contention_cost_{job}_{policy} (a lower bound)")
        for state in ("quiet", "busy"):
            ratio = med[("auto", state)] / med[("default", state)]
            bound = "<" if ("default", state) in capped else ""
            print(f"  {state} time auto/default {bound}{ratio:.3f}", end="  ")
            ratios[f"{state}_auto_over_default_{job}"] = ratio
            if bound:
                bounded.append(f"{state}_auto_over_default_{job} (an upper bound)")
        print()
    if bounded:
        print(f"\nbounds (a timing hit the limit): {', '.join(bounded)}")
    return ratios


def _steps(model, opt, x, y, k: int) -> float:
    """Milliseconds per SGD step, over ``k`` steps."""
    import torch.nn.functional as F

    start = time.perf_counter()
    for _ in range(k):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - start) / k * 1e3


def sizes(repeats: int) -> None:
    """Training-step time with 1 and 2 threads across MLP sizes (the threshold's measurement)."""
    import torch

    import normprobe

    print(f"\nsizes: one training step (batch 64, SGD), 1 vs 2 threads, median of {repeats}")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 64, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    before = torch.get_num_threads()
    for depth, width in [(2, 32), (4, 64), (8, 64), (8, 128), (8, 256), (8, 512)]:
        model = normprobe.build_model("mlp", "batch", seed=0, depth=depth, width=width)
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        times: dict[int, list[float]] = {1: [], 2: []}
        for threads in times:
            torch.set_num_threads(threads)
            _steps(model, opt, x, y, 5)
        torch.set_num_threads(1)
        n = max(5, int(300 / _steps(model, opt, x, y, 10)))  # about 0.3 s at 1 thread
        for _ in range(repeats):
            for threads in times:
                torch.set_num_threads(threads)
                times[threads].append(_steps(model, opt, x, y, n))
        one, two = statistics.median(times[1]), statistics.median(times[2])
        print(
            f"  {params:>9,} parameters  1 thread {one:7.3f} ms  2 threads {two:7.3f} ms  "
            f"speed-up of the 2nd thread {one / two:4.2f}x   load {_load()}",
            flush=True,
        )
    torch.set_num_threads(before)


def _shown(med: dict, capped: set, policy: str, state: str) -> str:
    over = ">" if (policy, state) in capped else " "
    return f"{over}{med[(policy, state)]:7.2f} s"


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], "--quick" in sys.argv)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller jobs, one round (~3 min)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 3; 1 quick)")
    parser.add_argument("--spinners", type=int, default=1, help="background busy loops")
    parser.add_argument(
        "--same-session",
        action="store_true",
        help="start the busy loops in this session (as a job of the same user's shell) "
        "instead of a session of their own (another user's job)",
    )
    parser.add_argument("--limit", type=float, default=None, help="seconds per timing at most")
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--sizes", action="store_true", help="also 1 vs 2 threads across sizes")
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.limit = args.limit or (25.0 if args.quick else 300.0)
    ratios = contention(args)
    if args.sizes:
        sizes(args.repeats if not args.quick else 3)
    print(f"\nload average {_load()} at the end")
    for name, value in ratios.items():
        print(f"RATIO {name} {value:.3f}")


if __name__ == "__main__":
    main()
