"""Overhead of normprobe.Monitor in a plain PyTorch training loop.

    python benchmarks/monitor.py [--models mlp wrn] [--repeats 3] [--steps 300] [--hessian] [--quick]

The same loop (SGD with momentum 0.9, lr 0.05, batch 64, BatchNorm, digits)
is timed side by side, interleaved over ``--repeats`` rounds: without a
monitor; with a Monitor running the quickstart's probes (representation,
gradient correlation, gradient norms) every 50 steps and writing its run
folder; the same without a folder (``out=None``: the results in memory,
which shows what the part files cost); the same loop running, at the same steps, only the
bare passes the probes need (a forward pass without autograd and two forward+backward
passes at the probe batch of 128, on a copy of the model: the floor no bookkeeping can go
under); and, with ``--hessian``, with the quickstart's Hessian added at
steps 0, 50 and the last (``analyses/quickstart.yaml``). Printed: the median wall time of each
and the overhead ``monitored / plain - 1`` (target <= 10% for the probes),
with the measuring time alone and the load average, and the same ratio in CPU time
(user + system time of the process, which other processes on a loaded machine barely
change, unlike wall time; it leaves out time spent waiting on the disk); at the end one line
per ratio, ``RATIO <name> <monitored / plain>`` (``..._cpu``: in CPU time), for a summary to
collect.

- ``mlp``: the quickstart MLP, 8 x 128, on the 64 digit pixels.
- ``wrn``: a WRN-10-1 on the digits upsampled to 16 x 16.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

import normprobe

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = yaml.safe_load((ROOT / "analyses" / "quickstart.yaml").read_text())


def setup(name: str) -> tuple[Any, dict[str, Any]]:
    if name == "mlp":
        ds = normprobe.load_dataset("digits", normalize="unit")
        return ds, {"depth": 8, "width": 128}
    ds = normprobe.load_dataset("digits", normalize="unit", size=16)
    return ds, {"depth": 10, "widen": 1}


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def loop(
    name: str, ds: Any, options: dict[str, Any], steps: int, case: str
) -> tuple[float, float, float]:
    """Wall time and CPU time of one training run, and the monitor's measuring time."""
    model = normprobe.build_model(
        name, "batch", seed=0, input_shape=ds.input_shape, num_classes=ds.num_classes, **options
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = ds.train.x, ds.train.y
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        start, cpu = time.perf_counter(), cpu_seconds()
        monitor = None
        bare = copy.deepcopy(model) if case == "bare probe passes" else None
        if case not in ("plain", "bare probe passes"):
            hessian: Any = False
            if case == "probes + Hessian":
                hessian = {**QUICKSTART["hessian"], "schedule": [0, 50, steps]}
            probes = {k: v for k, v in QUICKSTART["probes"].items() if k != "schedule"}
            folder = None if case == "probes, no folder" else out
            monitor = normprobe.Monitor(
                model, F.cross_entropy, (x[:256], y[:256]), probes=probes, hessian=hessian,
                schedule=50, total_steps=steps, out=folder, optimizer=opt,
            )  # fmt: skip
        for step in range(steps + 1):
            if monitor is not None:
                monitor.step(step)
            if bare is not None and (step % 50 == 0 or step == steps):
                bare_passes(bare, x[:128], y[:128], x[128:256], y[128:256])
            if step == steps:
                break
            i = torch.randint(len(x), (64,), generator=g)
            loss = F.cross_entropy(model(x[i]), y[i])
            value = loss.item()
            if monitor is not None:
                monitor.log(step, batch_loss=value)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if monitor is not None:
            monitor.close()
        measured = monitor.measure_seconds if monitor else 0.0
        return time.perf_counter() - start, cpu_seconds() - cpu, measured


def bare_passes(
    model: torch.nn.Module, xa: torch.Tensor, ya: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor
) -> None:
    """What the quickstart's probes compute, without their bookkeeping: the representation
    probe's forward pass on the noisy batch (its pass on the clean batch is the gradient
    probes' pass on it), and one gradient per probe batch (``autograd.grad``)."""
    with torch.no_grad():
        model(xa + 0.3 * xa.std() * torch.randn_like(xa))
    params = [p for p in model.parameters() if p.requires_grad]
    for x, y in ((xa, ya), (xb, yb)):
        torch.autograd.grad(F.cross_entropy(model(x), y), params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "wrn"], choices=["mlp", "wrn"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hessian", action="store_true", help="also time the Hessian case")
    parser.add_argument("--quick", action="store_true", help="2 rounds (for benchmarks/summary.py)")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 2
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    cases = ["plain", "probes every 50", "probes, no folder", "bare probe passes"]
    cases += ["probes + Hessian"] if args.hessian else []
    ratios: list[tuple[str, float]] = []
    names = {
        "probes every 50": "monitor_overhead_{}",
        "probes, no folder": "monitor_overhead_{}_memory",
        "bare probe passes": "monitor_floor_{}",
        "probes + Hessian": "monitor_overhead_{}_hessian",
    }
    for name in args.models:
        ds, options = setup(name)
        loop(name, ds, options, 20, "probes every 50")  # warm-up
        wall: dict[str, list[float]] = {c: [] for c in cases}
        cpu: dict[str, list[float]] = {c: [] for c in cases}
        measuring: dict[str, list[float]] = {c: [] for c in cases}
        for _ in range(args.repeats):
            for case in cases:
                seconds, used, measured = loop(name, ds, options, args.steps, case)
                wall[case].append(seconds)
                cpu[case].append(used)
                measuring[case].append(measured)
        plain = statistics.median(wall["plain"])
        plain_cpu = statistics.median(cpu["plain"])
        print(f"\n{name}, {args.steps} steps, batch 64, medians of {args.repeats} (interleaved):")
        for case in cases:
            t = statistics.median(wall[case])
            c = statistics.median(cpu[case])
            m = statistics.median(measuring[case])
            extra = (
                ""
                if case == "plain"
                else f"  overhead {t / plain - 1:+.1%}, CPU {c / plain_cpu - 1:+.1%} "
                f"(measuring {m:.2f} s)"
            )
            print(f"  {case:<18} {t:7.2f} s, CPU {c:6.2f} s{extra}")
            if case != "plain":
                ratios.append((names[case].format(name), t / plain))
                ratios.append((names[case].format(name) + "_cpu", c / plain_cpu))
    print(f"\nload average after: {os.getloadavg()}")
    for key, ratio in ratios:
        print(f"RATIO {key} {ratio:.3f}")
    print("LOAD " + " ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
