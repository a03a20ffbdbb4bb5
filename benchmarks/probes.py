"""Cost of each probe relative to a plain forward and a forward+backward pass on the same batch.

    python benchmarks/probes.py [--batch 128] [--repeats 15] [--norms batch layer]

For the MLP (depth 10, width 128, digits 8x8) and a small WRN (WRN-10-1,
digits 16x16) it times, in one run and interleaved round-robin so that load
on the machine hits every measurement alike: a forward pass (train mode,
``torch.no_grad``, what the representation probe runs twice; also shown with
autograd on), a forward+backward pass (train mode, mean cross-entropy,
``loss.backward()``), and each probe; then prints medians and the ratios,
flagging a setup whose baselines varied a lot between rounds (other load).

``--no-malloc-trim`` (Linux/glibc only) stops the C allocator from returning
freed memory to the system, for this process: on a VM where a fresh page
costs a fault, a probe that holds a batch's activations while the next pass
runs pays for that memory again on every call, and so does every forward
pass afterwards; the flag shows the ratios without that cost. Targets (issue): the
representation correlation <= 2.5x a forward pass, the gradient correlation
<= 2.5x a forward+backward pass. Baselines run on a copy of the model, so the
probes see the model as built. ``torch.set_num_threads`` is left as it is.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import normprobe
from normprobe.probes import gradient_correlation, gradient_norms, representation_correlation

Timed = dict[str, Callable[[], object]]


def _forward(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(x)

    return run


def _forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    return run


def cases(
    model: nn.Module, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
) -> Timed:
    baseline = copy.deepcopy(model)
    loss = F.cross_entropy
    return {
        "forward": _forward(baseline, a[0]),
        "forward (autograd on)": lambda: baseline(a[0]),
        "forward+backward": _forward_backward(baseline, *a),
        "repr_corr noise": lambda: representation_correlation(model, a[0]),
        "repr_corr independent": lambda: representation_correlation(
            model, a[0], pairing="independent", x_other=b[0]
        ),
        "repr_cos within": lambda: representation_correlation(model, a[0], pairing="within"),
        "grad_corr": lambda: gradient_correlation(model, loss, a, b),
        "grad_norms": lambda: gradient_norms(model, loss, a),
    }


def measure(timed: Timed, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each call of each callable, timed round-robin after ``warmup`` rounds."""
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for i in range(warmup + repeats):
        for name, fn in timed.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                samples[name].append(elapsed)
    return samples


BASELINES = ("forward", "forward (autograd on)", "forward+backward")
TARGETS = {"repr_corr noise": ("forward", 2.5), "grad_corr": ("forward+backward", 2.5)}


def _spread(s: list[float]) -> float:
    """p90 / p10 of the samples: about 1 on a quiet machine."""
    q = statistics.quantiles(s, n=10)
    return q[-1] / q[0]


#: ``RATIO <name> <value>`` lines printed at the end, for a summary to collect
RATIOS: list[tuple[str, float]] = []


def report(title: str, samples: dict[str, list[float]], key: str = "") -> None:
    times = {name: statistics.median(s) for name, s in samples.items()}
    fwd, fb = times["forward"], times["forward+backward"]
    spread = max(_spread(samples[name]) for name in BASELINES)
    noisy = f"  NOISY (p90/p10 {spread:.1f}): other load on the machine" if spread > 2.0 else ""
    print(
        f"\n{title}: forward {fwd * 1e3:.2f} ms (autograd on: "
        f"{times['forward (autograd on)'] * 1e3:.2f} ms), forward+backward {fb * 1e3:.2f} ms{noisy}"
    )
    print(f"  {'probe':<24}{'ms':>9}{'/ forward':>11}{'/ fwd+bwd':>11}  target")
    for name, t in times.items():
        if name in BASELINES:
            continue
        target = ""
        if name in TARGETS:
            base, limit = TARGETS[name]
            ratio = t / times[base]
            target = f"<= {limit}x {base}: {'ok' if ratio <= limit else 'MISSED'} ({ratio:.2f}x)"
            per = "forward" if base == "forward" else "fwd_bwd"
            RATIOS.append((f"probe_{name.split()[0]}_per_{per}_{key}", ratio))
        print(f"  {name:<24}{t * 1e3:>9.2f}{t / fwd:>11.2f}{t / fb:>11.2f}  {target}")


def keep_freed_memory() -> None:
    """glibc: no trimming and no mmap for large blocks, so freed memory is reused, never refaulted."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters from <malloc.h>
    if not (libc.mallopt(m_trim_threshold, 2**30) and libc.mallopt(m_mmap_threshold, 2**30)):
        raise SystemExit("--no-malloc-trim: mallopt failed (glibc only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--norms", nargs="+", default=["batch", "layer"])
    parser.add_argument("--no-malloc-trim", action="store_true", help=keep_freed_memory.__doc__)
    args = parser.parse_args()
    if args.no_malloc_trim:
        keep_freed_memory()
    print(
        f"normprobe probes benchmark: torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, batch {args.batch}, median of {args.repeats} after {args.warmup} warm-up rounds, "
        f"malloc trimming {'off' if args.no_malloc_trim else 'on (default)'} "
        f"(load average {os.getloadavg()[0]:.2f}: other processes on the machine slow "
        f"multithreaded kernels a lot, so compare ratios from quiet runs)"
    )
    setups = {
        "mlp (depth 10, width 128, digits 8x8)": (
            normprobe.load_dataset("digits"),
            dict(depth=10, width=128),
        ),
        "wrn (WRN-10-1, digits 16x16)": (
            normprobe.load_dataset("digits", size=16),
            dict(depth=10, widen=1),
        ),
    }
    for (title, (ds, kwargs)), name in zip(setups.items(), ["mlp", "wrn"]):
        n = args.batch
        a = ds.train.x[:n], ds.train.y[:n]
        b = ds.train.x[n : 2 * n], ds.train.y[n : 2 * n]
        for norm in args.norms:
            model = normprobe.build_model(
                name, norm, seed=0, input_shape=ds.input_shape, num_classes=ds.num_classes, **kwargs
            )
            samples = measure(cases(model, a, b), args.repeats, args.warmup)
            report(f"{title}, norm={norm}", samples, key=f"{name}_{norm}")
    for key, ratio in RATIOS:
        print(f"RATIO {key} {ratio:.3f}")
    print("LOAD " + " ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
