"""Cost of the Hessian engine against a gradient, against its own HVPs, and against PyHessian.

    python benchmarks/hessian.py [--models mlp wrn] [--repeats 7] [--steps 100] [--threads N]

One run, the same model and probe set for every measurement (digits, 512
samples in 4 chunks of 128, float32 models with BatchNorm):

- ``mlp``: the digits MLP (3 hidden layers of 32, 4,618 parameters), whose
  exact Hessian (dense, float64, forward-over-reverse column by column) is
  the accuracy reference;
- ``wrn``: WRN-16-1 on 16x16 digits (174,970 parameters); reference: the 10
  largest and 10 smallest eigenvalues by ARPACK at tol 1e-5, each certified
  by its explicit residual (an eigenvalue lies within the residual of it).

Printed ratios (targets from the issue): HVP time / gradient time (<= 2.5,
train mode, graphs cached); SLQ(m) time / (m x HVP time) (<= 1.1, full
reorthogonalization included); top-10 eigenvalues against PyHessian
``eigenvalues(top_n=10)`` at matched accuracy against the reference (>= 3x
faster at a relative error <= ``--accuracy``, default 1e-3: PyHessian at
its defaults, then (MLP only) at ``tol=1e-4``; its power iteration finds the
eigenvalues of largest magnitude, negative ones included, so each of its
values is scored against the nearest true eigenvalue, while ours must match
the true top-10 rank by rank; ours runs with ``tol`` = the accuracy); SLQ against PyHessian ``density()`` (same m, one start
vector, run with a ``torch.eig`` shim defined here only: torch 2 removed
``torch.eig``). PyHessian forces eval mode, so those comparisons use
``norm_mode="eval"``. Times are medians over interleaved repeats; the load
average is printed, since other processes on the machine slow torch's
OpenMP threads badly.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import normprobe
from normprobe.hessian import (
    HessianOperator,
    extreme_eigenpairs,
    hessian_spectrum,
    stochastic_lanczos_quadrature,
)
from normprobe.state import frozen_statistics, preserved

Batch = tuple[torch.Tensor, torch.Tensor]


def probe_set(model_name: str, samples: int = 512) -> Batch:
    """``samples`` fixed training examples of digits (16x16 for the WRN), in index order."""
    ds = normprobe.load_dataset("digits", **({"size": 16} if model_name == "wrn" else {}))
    index = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(0))[:samples]
    index = index.sort().values
    return ds.train.x[index], ds.train.y[index]


def build(model_name: str, x: torch.Tensor, wrn_depth: int = 16) -> nn.Module:
    """A BatchNorm MLP (3 x 32) or WRN-``wrn_depth``-1 for inputs like ``x``."""
    if model_name == "mlp":
        return normprobe.build_model("mlp", "batch", seed=0, depth=3, width=32, input_shape=64)
    return normprobe.build_model(
        "wrn", "batch", seed=0, depth=wrn_depth, widen=1, input_shape=tuple(x.shape[1:])
    )


def warm_up_running_stats(model: nn.Module, x: torch.Tensor) -> None:
    """A few train-mode passes so eval mode does not use the default running statistics."""
    model.train()
    with torch.no_grad():
        for chunk in torch.tensor_split(x, 4):
            model(chunk)


def gradient_pass(model: nn.Module, chunks: list[Batch]) -> Callable[[], object]:
    """The baseline: gradient of the mean loss over the probe set, same chunks, train mode."""
    params = list(model.parameters())
    n = sum(len(x) for x, _ in chunks)

    def run() -> object:
        with preserved(model), frozen_statistics(model):
            model.train()
            for x, y in chunks:
                loss = F.cross_entropy(model(x), y) * (len(x) / n)
                torch.autograd.grad(loss, params)

    return run


def interleaved(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each case, run round-robin so machine load hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def exact_eigenvalues(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Dense Hessian of a float64 copy in eval mode, column by column (jvp of grad), eigvalsh."""
    model = copy.deepcopy(model).double().eval()
    x = x.double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(w: torch.Tensor) -> torch.Tensor:
        values = {k: t.view(s) for k, t, s in zip(names, torch.split(w, sizes), shapes)}
        return F.cross_entropy(functional_call(model, values, (x,)), y)

    def column(v: torch.Tensor) -> torch.Tensor:
        return jvp(grad(loss), (flat,), (v,))[1]

    hessian = vmap(column, chunk_size=256)(torch.eye(flat.numel(), dtype=torch.float64))
    asym = float((hessian - hessian.T).abs().max() / hessian.abs().max())
    if asym > 1e-10:
        raise RuntimeError(f"reference Hessian not symmetric ({asym:.1e})")
    return np.linalg.eigvalsh(((hessian + hessian.T) / 2).numpy())[::-1]


def reference(model: nn.Module, data: Batch) -> tuple[np.ndarray, np.ndarray, str]:
    """The true top-10 (descending) and a pool of true eigenvalues to match any returned value to.

    MLP: the whole exact spectrum. WRN: the 10 largest and the 10 smallest
    eigenvalues from ARPACK on the model in eval mode at tol 1e-5, each
    certified by its explicit residual (enough to judge accuracies of 1e-3).
    """
    if sum(p.numel() for p in model.parameters()) <= 6000:
        exact = exact_eigenvalues(model, *data)
        return exact[:10], exact, "dense eigvalsh of the exact float64 Hessian"
    with HessianOperator(model, F.cross_entropy, data, norm_mode="eval") as op:
        found = [
            extreme_eigenpairs(
                op.matvec,
                op.dim,
                10,
                which=which,
                tol=1e-6,
                max_matvecs=3000,
                generator=torch.Generator().manual_seed(9),
            )  # fmt: skip
            for which in ("largest", "smallest")
        ]
    worst = max(float(np.max(f.residuals / np.abs(f.values))) for f in found)
    ok = all(f.all_converged for f in found)
    return (
        found[0].values,
        np.concatenate([f.values for f in found]),
        f"ARPACK top-10 and bottom-10, tol 1e-5 (converged {ok}, max residual/|lambda| {worst:.1e})",
    )


def nearest_error(values: np.ndarray, pool: np.ndarray) -> float:
    """Max over ``values`` of the relative distance to the nearest eigenvalue in ``pool``."""
    values = np.asarray(values, dtype=np.float64)
    gaps = np.abs(values[:, None] - pool[None, :]) / np.abs(pool[None, :])
    return float(gaps.min(axis=1).max())


@contextlib.contextmanager
def torch_eig_shim() -> Iterator[None]:
    """``torch.eig(a, eigenvectors=True)`` for PyHessian's density(), removed in torch 2: eigh here."""

    def eig(a: torch.Tensor, eigenvectors: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        values, vectors = torch.linalg.eigh(a)
        return torch.stack([values, torch.zeros_like(values)], dim=1), vectors

    had = hasattr(torch, "eig")
    old = getattr(torch, "eig", None)
    torch.eig = eig  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if had:
            torch.eig = old  # type: ignore[attr-defined]
        else:
            del torch.eig  # type: ignore[attr-defined]


def pyhessian_run(
    model: nn.Module, data: Batch, fn: Callable[[object], object]
) -> tuple[float, object, int]:
    """Seconds, result and number of HVPs of ``fn(pyhessian.hessian(copy of model, ...))``."""
    import sys

    from pyhessian import hessian

    module = sys.modules["pyhessian.hessian"]  # the package re-exports the class under this name
    original = module.hessian_vector_product
    count = [0]

    def counted(*args: object) -> object:
        count[0] += 1
        return original(*args)

    module.hessian_vector_product = counted
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            copy_ = copy.deepcopy(model)
            start = time.perf_counter()
            h = hessian(copy_, F.cross_entropy, data=data, cuda=False)
            out = fn(h)
            return time.perf_counter() - start, out, count[0]
    finally:
        module.hessian_vector_product = original


def bench(model_name: str, repeats: int, steps: int, use_pyhessian: bool, accuracy: float) -> None:
    x, y = probe_set(model_name)
    model = build(model_name, x)
    warm_up_running_stats(model, x)
    chunks = list(zip(torch.tensor_split(x, 4), torch.tensor_split(y, 4)))
    dim = sum(p.numel() for p in model.parameters())
    print(f"\n== {model_name}: {dim:,} parameters, 512 samples in 4 chunks of 128, float32 ==")

    # 1. HVP / gradient (train mode: per-chunk batch statistics)
    op = HessianOperator(model, F.cross_entropy, chunks)
    rebuilt = HessianOperator(model, F.cross_entropy, chunks, graph_memory=0)
    v = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    build_time, _ = timed(lambda: op.matvec(v))
    gradient = gradient_pass(copy.deepcopy(model), chunks)
    # pairs, not a three-way round: the rebuilt operator's allocations slow whatever runs next
    t = interleaved({"gradient": gradient, "hvp": lambda: op.matvec(v)}, repeats)
    u = interleaved({"gradient": gradient, "hvp": lambda: rebuilt.matvec(v)}, repeats)
    print(f"  gradient {t['gradient'] * 1e3:9.1f} ms")
    print(
        f"  HVP      {t['hvp'] * 1e3:9.1f} ms   HVP / gradient = {t['hvp'] / t['gradient']:.2f}"
        f"   (target <= 2.5; graphs cached: {op.cached_chunks}/4, {op.graph_bytes / 2**20:.0f} MiB)"
    )
    print(
        f"  HVP without graph reuse {u['hvp'] * 1e3:.1f} ms (/ gradient = "
        f"{u['hvp'] / u['gradient']:.2f}); first HVP incl. building graphs {build_time * 1e3:.1f} ms"
    )

    # 2. SLQ(m) / (m x HVP): plain HVPs timed just before and after, same conditions
    def hvp_times(n: int) -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            op.matvec(v)
            out.append(time.perf_counter() - start)
        return out

    around = hvp_times(20)
    slq_time, _ = timed(
        lambda: stochastic_lanczos_quadrature(
            op.matvec, dim, steps, 1, generator=torch.Generator().manual_seed(0)
        )
    )
    around += hvp_times(20)
    hvp_now = statistics.median(around)
    print(
        f"  SLQ m={steps}, 1 vector: {slq_time:.2f} s   SLQ / (m x HVP) = "
        f"{slq_time / (steps * hvp_now):.3f}   (target <= 1.1; HVP {hvp_now * 1e3:.1f} ms, median of "
        f"20 before and 20 after; basis {steps * dim * 8 / 2**20:.1f} MiB in float64)"
    )
    op.release()
    rebuilt.release()
    if not use_pyhessian:
        return

    # 3. top-10 at matched accuracy, eval mode. PyHessian's power iteration finds the
    # eigenvalues of largest magnitude, so each of its values is matched to the nearest
    # true eigenvalue (in its favour); ours must match the true top-10 rank by rank.
    top10, pool, how = reference(model, (x, y))
    print(f"  reference: {how}")
    print(f"  top-10 to relative error <= {accuracy:g}:")
    # PyHessian's defaults, then tighter (not for the WRN: its default run alone takes
    # minutes, and a ratio at PyHessian's lower accuracy bounds the matched one from below)
    attempts = ((1e-3, 100), (1e-4, 1000)) if dim <= 6000 else ((1e-3, 100),)
    for tol, max_iter in attempts:
        py_time, (py_values, _), py_hvps = pyhessian_run(
            model,
            (x, y),
            lambda h, tol=tol, m=max_iter: h.eigenvalues(top_n=10, maxIter=m, tol=tol),
        )
        py_err = nearest_error(np.asarray(py_values), pool)
        negative = int(np.sum(np.asarray(py_values) < 0))
        print(
            f"    PyHessian eigenvalues(top_n=10, maxIter={max_iter}, tol={tol:g}): {py_time:7.2f} s,"
            f" {py_hvps} HVPs, max rel err to the nearest eigenvalue {py_err:.1e}, "
            f"{negative} negative (not in the top-10)"
        )
        if py_err <= accuracy:
            break
    ours_time, ours = timed(
        lambda: hessian_spectrum(
            model, F.cross_entropy, (x, y), what="top", norm_mode="eval", tol=accuracy
        )
    )
    ours_err = float(np.max(np.abs(ours.top_eigenvalues - top10) / np.abs(top10)))
    print(
        f"    ours hessian_spectrum(what='top', tol={accuracy:g}): {ours_time:7.2f} s, "
        f"{ours.matvecs['top']} HVPs (10 of them residual checks), max rel err to the true "
        f"top-10 {ours_err:.1e}, converged {ours.top.all_converged}"
    )
    reached = (
        ""
        if py_err <= accuracy
        else " (PyHessian did not reach the accuracy: a lower bound for the matched ratio)"
    )
    print(
        f"    PyHessian / ours = {py_time / ours_time:.1f}x in time, "
        f"{py_hvps / ours.matvecs['top']:.1f}x in HVPs   (target >= 3){reached}"
    )

    # 4. SLQ vs PyHessian density(), eval mode, same m, one start vector
    with torch_eig_shim():
        py_time, (py_nodes, py_weights), py_hvps = pyhessian_run(
            model, (x, y), lambda h: h.density(iter=steps, n_v=1)
        )
    ours_time, spec = timed(
        lambda: hessian_spectrum(
            model,
            F.cross_entropy,
            (x, y),
            what="density",
            norm_mode="eval",
            steps=steps,
            num_vectors=1,
        )
    )
    distances = ["", ""]
    if len(pool) == dim:  # the whole exact spectrum is known: Wasserstein-1 / spectral range
        spread = float(pool.max() - pool.min())
        for i, (n, w) in enumerate(
            ((py_nodes[0], py_weights[0]), (spec.nodes[0], spec.weights[0]))
        ):
            w1 = scipy.stats.wasserstein_distance(np.asarray(n), pool, u_weights=np.asarray(w))
            distances[i] = f", W1 to the exact spectrum {w1 / spread:.2%} of its range"
    print(
        f"  SLQ     PyHessian density(iter={steps}, n_v=1): {py_time:7.2f} s, top node "
        f"{max(py_nodes[0]):.4f}, {py_hvps} HVPs{distances[0]}"
    )
    print(
        f"          ours (m={steps}, 1 vector):            {ours_time:7.2f} s, top node "
        f"{spec.nodes[0].max():.4f} (lambda_1 = {top10[0]:.4f}){distances[1]}   PyHessian / ours = "
        f"{py_time / ours_time:.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "wrn"], choices=["mlp", "wrn"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100, help="Lanczos steps m")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-pyhessian", action="store_true")
    parser.add_argument(
        "--accuracy", type=float, default=1e-3, help="top-10 max relative error to match"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    use_pyhessian = not args.no_pyhessian
    if use_pyhessian:
        try:
            import pyhessian  # noqa: F401
        except ImportError:
            print("pyhessian is not installed (pip install pyhessian==0.1): skipping comparisons")
            use_pyhessian = False
    print(
        f"nproc {os.cpu_count()}, torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    start = time.perf_counter()
    for name in args.models:
        bench(name, args.repeats, args.steps, use_pyhessian, args.accuracy)
    print(f"\ntotal {time.perf_counter() - start:.0f} s, load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
