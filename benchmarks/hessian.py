"""Cost of the Hessian engine against a gradient, against its own HVPs, and against PyHessian.

    python benchmarks/hessian.py [--models mlp wrn quickstart] [--repeats 7] [--steps 100]
        [--threads N] [--no-pyhessian] [--trace] [--memory 1e6 1e7] [--quick]
        [--spectrum-sizes 1e6 1e7] [--spectrum-vectors 4 1]

``--quick`` runs every ratio once on all three models, small (about 5
minutes at one thread on a loaded 2-core machine); each ratio is also
printed at the end as a machine-readable ``RATIO <name> <value>`` line
(``TARGET <name> <target>`` beside it where the issue set one), which
``benchmarks/summary.py`` collects: HVP/gradient; SLQ/(m x HVP) with the
default basis, per basis option and with the start vectors side by side
(batched products); the per-vector cost of a batched product; the lean
batch norm against torch's double backward (WRN); ARPACK's own overhead
per matvec (quickstart), and our call against bare ``eigsh``; Hutch++
against Hutchinson at 48 HVPs; top-10 against PyHessian at matched
accuracy (MLP).

One run, the same model and probe set for every measurement (digits, 512
samples in 4 chunks of 128, float32 models with BatchNorm):

- ``mlp``: the digits MLP (3 hidden layers of 32, 4,618 parameters), whose
  exact Hessian (dense, float64, forward-over-reverse column by column) is
  the accuracy reference;
- ``wrn``: WRN-16-1 on 16x16 digits (174,970 parameters); reference: the 10
  largest and 10 smallest eigenvalues by ARPACK at tol 1e-5, each certified
  by its explicit residual (an eigenvalue lies within the residual of it);
- ``quickstart``: the quickstart's configuration (MLP 8 x 128 with
  BatchNorm, 126,218 parameters, 256 samples in 2 chunks, m = 40).

SLQ is timed for each way of keeping the basis orthogonal (full
reorthogonalization in float64; partial; a float32 basis, the default for
a float32 model's products; both), interleaved, each with its accuracy
against the float64 full basis and against the same model in float64
(Wasserstein-1 distance of the quadratures and largest node difference,
over the spectral scale). ``--trace``
compares Hutchinson, Hutch++ and XTrace at equal HVPs against the exact
trace of the digits MLP's float64 Hessian, at initialization and after 100
SGD steps (RMS error over 30 seeds). ``--memory`` times SLQ's Lanczos
(without the products: a diagonal Hessian-like operator) at the given
parameter counts for each basis option, with the basis's bytes, the peak
resident memory of the process and the accuracy against the float64 full
basis, and says how large a model this machine's free memory allows.
``--spectrum-sizes 1e6 1e7 5e7`` (with ``--spectrum-vectors 4 4 1``) runs
``hessian_spectrum``'s density (80 steps) and top-10 end to end on float32
BatchNorm MLPs of about those parameter counts, each in a process of its
own: the basis dtype it chose, the peak memory it added, the time and
products of each piece.

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
import math
import os
import statistics
import time
import types
from collections.abc import Callable, Iterator

import numpy as np
import scipy.stats
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import normprobe
from normprobe.hessian import (
    BasisMemoryError,
    HessianOperator,
    available_bytes,
    basis_bytes,
    check_basis_fits,
    extreme_eigenpairs,
    fully_connected,
    gauss_quadrature,
    hessian_spectrum,
    hutch_plus_plus,
    hutchinson,
    lanczos,
    rademacher,
    stochastic_lanczos_quadrature,
    xtrace,
)
from normprobe.hessian.basis import TopKCostError, top_k_cost, vectors_dtype
from normprobe.hessian.spectrum import BATCHED_MAX_DIM
from normprobe.state import frozen_statistics, preserved

Batch = tuple[torch.Tensor, torch.Tensor]

#: name -> (value, target): printed at the end as machine-readable ``RATIO name value`` lines
RATIOS: dict[str, tuple[float, str]] = {}


def ratio(name: str, value: float, target: str = "") -> None:
    """Record a ratio for the closing ``RATIO`` lines (``target`` as text, e.g. ``<= 2.5``)."""
    RATIOS[name] = (float(value), target)


def probe_set(model_name: str, samples: int = 512) -> Batch:
    """``samples`` fixed training examples of digits (16x16 for the WRN), in index order.

    The quickstart's MLP sees 256 samples with pixels in [0, 1], as in its analysis.
    """
    options = {"wrn": {"size": 16}, "quickstart": {"normalize": "unit"}}.get(model_name, {})
    samples = 256 if model_name == "quickstart" else samples
    ds = normprobe.load_dataset("digits", **options)
    index = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(0))[:samples]
    index = index.sort().values
    return ds.train.x[index], ds.train.y[index]


def build(model_name: str, x: torch.Tensor, wrn_depth: int = 16) -> nn.Module:
    """A BatchNorm MLP (3 x 32) or WRN-``wrn_depth``-1 for inputs like ``x``."""
    if model_name == "mlp":
        return normprobe.build_model("mlp", "batch", seed=0, depth=3, width=32, input_shape=64)
    if model_name == "quickstart":
        return normprobe.build_model("mlp", "batch", seed=0, depth=8, width=128, input_shape=64)
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
    """Eigenvalues (descending) of :func:`exact_hessian`."""
    return np.linalg.eigvalsh(exact_hessian(model, x, y).numpy())[::-1]


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Dense Hessian of a float64 copy in eval mode, column by column (jvp of grad), symmetric."""
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
    return (hessian + hessian.T) / 2


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


def lockstep(
    op: HessianOperator, name: str, dim: int, steps: int, hvp_times: Callable[[int], list[float]]
) -> None:
    """SLQ with the start vectors side by side (batched products) against b x m single HVPs;
    the bases in the products' dtype, as ``hessian_spectrum`` keeps them and as the single
    vector's line above is timed."""
    kept = op.dtype
    for b in (2, 4):
        around = hvp_times(10)
        seconds, _ = timed(
            lambda b=b: stochastic_lanczos_quadrature(
                op.matvec,
                dim,
                steps,
                b,
                generator=torch.Generator().manual_seed(0),
                matmat=op.matmat,
                basis_dtype=kept,
                matvec_eps=torch.finfo(kept).eps,
                matvec_dtype=op.dtype,
            )
        )
        around += hvp_times(10)
        hvp = statistics.median(around)
        value = seconds / (b * steps * hvp)
        ratio(f"slq_lockstep{b}_over_m_hvp_{name}", value, "<= 1.05")
        print(
            f"  SLQ m={steps}, {b} start vectors side by side (batched products): "
            f"SLQ / ({b} x m x HVP) = {value:.3f}   (HVP {hvp * 1e3:.1f} ms; "
            f"{str(kept).replace('torch.', '')} bases; load {os.getloadavg()[0]:.2f})"
        )


def batched_cost(op: HessianOperator, name: str, dim: int, repeats: int, b: int = 4) -> None:
    """Per-vector time of one batched product of b vectors over b single products, interleaved."""
    vs = torch.stack(
        [rademacher(dim, generator=torch.Generator().manual_seed(i)) for i in range(b)]
    )
    vs = vs.to(op.dtype)
    t = interleaved(
        {
            "sequential": lambda: [op.matvec(v) for v in vs],
            "batched": lambda: op.matmat(vs),
        },
        repeats,
    )
    value = t["batched"] / t["sequential"]
    ratio(f"batched_per_vector_{name}", value, "< 1")
    print(
        f"  batched HVP, b = {b}: per-vector time / single HVP = {value:.2f}   "
        f"(batched backward works: {op.batch_works}; hessian_spectrum's auto takes it: "
        f"{fully_connected(op.model) and dim <= BATCHED_MAX_DIM})"
    )


def arpack_overhead(
    op: HessianOperator, name: str, dim: int, hvp_times: Callable[[int], list[float]]
) -> None:
    """ARPACK's own time per matvec of a top-10 solve: (total - matvecs x HVP) / matvecs, with
    its vectors in float64 and in the products' dtype (``hessian_spectrum``'s default).

    The wrapper (numpy <-> torch, dtype casts, LinearOperator) costs next to
    nothing: eigsh on a plain numpy diagonal has the same per-matvec overhead.
    What remains is ARPACK's own work per matvec, its reorthogonalization
    against the ncv = 21 Lanczos vectors and its implicit restarts. The two
    dtypes run alternately (3 rounds; medians), each beside HVPs timed just
    before and after it.
    """
    kept = vectors_dtype(torch.float64, op.dtype)
    dtypes = dict.fromkeys([torch.float64, kept])
    per: dict[torch.dtype, list[float]] = {d: [] for d in dtypes}
    took: dict[torch.dtype, list[float]] = {d: [] for d in dtypes}
    tops = {}
    for _ in range(3):
        for dtype in dtypes:
            around = hvp_times(5)
            seconds, top = timed(
                lambda dtype=dtype: extreme_eigenpairs(
                    op.matvec,
                    dim,
                    10,
                    tol=1e-4,
                    dtype=dtype,
                    generator=torch.Generator().manual_seed(1),
                )
            )
            around += hvp_times(5)
            hvp = statistics.median(around)
            per[dtype].append((seconds - top.matvecs * hvp) / top.matvecs / hvp)
            took[dtype].append(seconds)
            tops[dtype] = top
    for dtype in dtypes:
        label = str(dtype).replace("torch.", "")
        value = statistics.median(per[dtype])
        suffix = "" if dtype == kept else "_float64"
        ratio(f"arpack_overhead_per_matvec_over_hvp_{name}{suffix}", value, "")
        print(
            f"  top-10 by ARPACK, {label} vectors{' (the default)' if dtype == kept else ''}: "
            f"{tops[dtype].matvecs} matvecs, {statistics.median(took[dtype]):.2f} s, overhead "
            f"per matvec {value:.2f} HVP"
        )
    if len(dtypes) > 1:
        a, b = tops[kept].values, tops[torch.float64].values
        value = statistics.median(took[kept]) / statistics.median(took[torch.float64])
        ratio(f"arpack_top10_time_{name}_default_over_float64", value, "< 1")
        print(
            f"  top-10 time, {str(kept).replace('torch.', '')} vectors / float64: {value:.3f}; "
            f"eigenvalues within {np.max(np.abs(a - b) / np.abs(b)):.1e} relative of each other "
            f"(largest residual / |lambda|: {np.max(tops[kept].residuals / np.abs(a)):.1e} and "
            f"{np.max(tops[torch.float64].residuals / np.abs(b)):.1e})"
        )


def arpack_wrapper(dim: int, repeats: int) -> None:
    """Our ARPACK call (torch matvec, LinearOperator wrapping, residual checks) against bare eigsh.

    Both on the same diagonal operator (a torch multiply against a numpy
    one), same k, ncv, tol and start vector, interleaved: the time per
    matvec of ours over that of bare ``eigsh``. About 1 means the wrapping
    costs nothing and the overhead is ARPACK's own.
    """
    import scipy.sparse.linalg as sla

    from normprobe.hessian import blas_threads

    d = _diagonal_operator(dim)
    dn = d.numpy()
    v0 = torch.randn(dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64).numpy()
    bare_count = [0]

    def bare() -> None:
        def mv(x: np.ndarray) -> np.ndarray:
            bare_count[0] += 1
            return dn * x.ravel()

        op = sla.LinearOperator((dim, dim), matvec=mv, dtype=np.float64)
        with blas_threads(1):
            sla.eigsh(op, k=10, which="LA", tol=1e-6, ncv=21, v0=v0)

    ours_count = [0]

    def ours() -> None:
        top = extreme_eigenpairs(
            d.mul, dim, 10, tol=1e-6, generator=torch.Generator().manual_seed(1)
        )
        ours_count[0] += top.matvecs

    t = interleaved({"bare": bare, "ours": ours}, repeats)
    per_bare = t["bare"] / (bare_count[0] / repeats)
    per_ours = t["ours"] / (ours_count[0] / repeats)
    ratio(f"arpack_ours_over_bare_eigsh_per_matvec_{dim // 1000}k", per_ours / per_bare, "~1")
    print(
        f"\n== ARPACK wrapping, {dim:,} dimensions (diagonal operator) ==\n  per matvec: ours "
        f"{per_ours * 1e3:.2f} ms, bare scipy eigsh on a numpy operator {per_bare * 1e3:.2f} ms "
        f"(ours / bare = {per_ours / per_bare:.2f}; ours includes 10 residual checks); load "
        f"{os.getloadavg()[0]:.2f}"
    )


def bench(
    model_name: str,
    repeats: int,
    steps: int,
    use_pyhessian: bool,
    accuracy: float,
    quick: bool = False,
) -> None:
    # quick: the WRN on 256 samples (2 chunks; the ratios are per chunk alike)
    x, y = probe_set(model_name, 256 if quick and model_name == "wrn" else 512)
    model = build(model_name, x)
    warm_up_running_stats(model, x)
    n_chunks = max(1, len(x) // 128)
    chunks = list(zip(torch.tensor_split(x, n_chunks), torch.tensor_split(y, n_chunks)))
    dim = sum(p.numel() for p in model.parameters())
    print(
        f"\n== {model_name}: {dim:,} parameters, {len(x)} samples in {n_chunks} chunks of 128, "
        f"float32 =="
    )

    # 1. HVP / gradient (train mode: per-chunk batch statistics)
    op = HessianOperator(model, F.cross_entropy, chunks)
    rebuilt = HessianOperator(model, F.cross_entropy, chunks, graph_memory=0)
    v = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    build_time, _ = timed(lambda: op.matvec(v))
    gradient = gradient_pass(copy.deepcopy(model), chunks)
    # pairs, not a three-way round: the rebuilt operator's allocations slow whatever runs next
    t = interleaved({"gradient": gradient, "hvp": lambda: op.matvec(v)}, repeats)
    u = interleaved({"gradient": gradient, "hvp": lambda: rebuilt.matvec(v)}, repeats)
    ratio(f"hvp_over_gradient_{model_name}", t["hvp"] / t["gradient"], "<= 2.5")
    print(f"  gradient {t['gradient'] * 1e3:9.1f} ms")
    print(
        f"  HVP      {t['hvp'] * 1e3:9.1f} ms   HVP / gradient = {t['hvp'] / t['gradient']:.2f}"
        f"   (target <= 2.5; graphs cached: {op.cached_chunks}/{n_chunks}, {op.graph_bytes / 2**20:.0f} MiB)"
    )
    print(
        f"  HVP without graph reuse {u['hvp'] * 1e3:.1f} ms (/ gradient = "
        f"{u['hvp'] / u['gradient']:.2f}); first HVP incl. building graphs {build_time * 1e3:.1f} ms"
    )
    if model_name == "wrn":  # torch's batch norm double backward against the lean one
        native = HessianOperator(model, F.cross_entropy, chunks)
        native.lean_batch_norm = False
        native.matvec(v)
        w = interleaved({"lean": lambda: op.matvec(v), "native": lambda: native.matvec(v)}, repeats)
        native.release()
        ratio("lean_bn_over_native_hvp_wrn", w["lean"] / w["native"], "< 1")
        print(
            f"  HVP with torch's batch norm double backward {w['native'] * 1e3:.1f} ms: "
            f"lean / torch's = {w['lean'] / w['native']:.3f} (HVP / gradient with torch's: "
            f"{w['native'] / t['gradient']:.2f})"
        )

    # 2. SLQ(m) / (m x HVP): plain HVPs timed just before and after, same conditions
    def hvp_times(n: int) -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            op.matvec(v)
            out.append(time.perf_counter() - start)
        return out

    # as hessian_spectrum runs it by default: the basis in the products' dtype, and the
    # operator handed vectors in its own dtype
    kept, eps = op.dtype, torch.finfo(op.dtype).eps
    around = hvp_times(10)
    slq_time, _ = timed(
        lambda: stochastic_lanczos_quadrature(
            op.matvec,
            dim,
            steps,
            1,
            generator=torch.Generator().manual_seed(0),
            basis_dtype=kept,
            matvec_eps=eps,
            matvec_dtype=op.dtype,
        )
    )
    around += hvp_times(10)
    hvp_now = statistics.median(around)
    ratio(f"slq_over_m_hvp_{model_name}", slq_time / (steps * hvp_now), "<= 1.05")
    print(
        f"  SLQ m={steps}, 1 vector: {slq_time:.2f} s   SLQ / (m x HVP) = "
        f"{slq_time / (steps * hvp_now):.3f}   (target <= 1.05; HVP {hvp_now * 1e3:.1f} ms, median of "
        f"10 before and 10 after; basis {basis_bytes(steps, dim, kept) / 2**20:.1f} MiB; full "
        f"reorthogonalization, {str(kept).replace('torch.', '')} basis as hessian_spectrum's default)"
    )
    arithmetic = lanczos_arithmetic(dim, steps, kept)
    ratio(f"lanczos_floor_over_m_hvp_{model_name}", 1 + arithmetic / hvp_now)
    print(
        f"  Lanczos arithmetic alone, the same run on a diagonal operator of {dim:,} entries: "
        f"{arithmetic * 1e3:.2f} ms a step = {arithmetic / hvp_now:.3f} of this HVP, so SLQ / "
        f"(m x HVP) cannot go below {1 + arithmetic / hvp_now:.3f} here with full "
        f"reorthogonalization"
    )
    if fully_connected(model):  # start vectors side by side: batched=True, or "auto" when small
        lockstep(op, model_name, dim, steps, hvp_times)
    batched_cost(op, model_name, dim, repeats)
    if not quick or model_name != "wrn":
        double = HessianOperator(
            copy.deepcopy(model).double(), F.cross_entropy, [(a.double(), b) for a, b in chunks]
        )
        slq_options(op, dim, steps, repeats=repeats, name=model_name, exact=double)
        double.release()
    if model_name != "wrn":
        arpack_overhead(op, model_name, dim, hvp_times)
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
    ratio(f"pyhessian_over_ours_top10_time_{model_name}", py_time / ours_time, ">= 3")
    print(
        f"    PyHessian / ours = {py_time / ours_time:.1f}x in time, "
        f"{py_hvps / ours.matvecs['top']:.1f}x in HVPs   (target >= 3){reached}"
    )

    if quick:
        return
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


#: the ways of keeping the Lanczos basis orthogonal: (label, reorthogonalize, basis dtype)
BASIS_OPTIONS = (
    ("full, float64 basis", "full", torch.float64),
    ("partial, float64 basis", "partial", torch.float64),
    ("full, float32 basis", "full", torch.float32),
    ("partial, float32 basis", "partial", torch.float32),
)


def _accuracy(ref: object, out: object, scale: float) -> str:
    """How far a Lanczos run's quadrature is from the reference run's, relative to ``scale``.

    W1: the Wasserstein-1 distance between the two node/weight measures (what
    a density smooths); top: the difference of the largest nodes (converged
    Ritz values). Unconverged bulk nodes move with rounding without
    changing the measure, so they are not compared one by one.
    """
    n_ref, w_ref = gauss_quadrature(ref.alpha, ref.beta)
    n, w = gauss_quadrature(out.alpha, out.beta)
    w1 = scipy.stats.wasserstein_distance(n, n_ref, u_weights=w, v_weights=w_ref)
    return f"W1 {w1 / scale:.1e}, top node {abs(n.max() - n_ref.max()) / scale:.1e} of the scale"


#: short names of BASIS_OPTIONS for the RATIO lines
OPTION_KEYS = ("full64", "partial64", "full32", "partial32")


def slq_options(
    op: HessianOperator,
    dim: int,
    steps: int,
    repeats: int,
    name: str = "",
    exact: HessianOperator | None = None,
) -> None:
    """SLQ / (m x HVP) for each basis option, interleaved, with accuracy against the default.

    ``exact``: the same model in float64, whose float64 full-basis run from the
    same start vector is the reference every option of a float32 model is
    measured against too (the products' own rounding included).
    """
    v = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    eps32 = torch.finfo(op.dtype).eps
    runs: dict[str, list[float]] = {label: [] for label, _, _ in BASIS_OPTIONS}
    hvps: list[float] = []
    outs: dict[str, object] = {}
    for _ in range(repeats):
        for label, mode, basis_dtype in BASIS_OPTIONS:
            for _ in range(5):
                hvps.append(timed(lambda: op.matvec(v))[0])
            seconds, outs[label] = timed(
                lambda mode=mode, basis_dtype=basis_dtype: lanczos(
                    op.matvec,
                    dim,
                    steps,
                    generator=torch.Generator().manual_seed(0),
                    basis_dtype=basis_dtype,
                    reorthogonalize=mode,
                    matvec_eps=eps32,
                    matvec_dtype=op.dtype,
                )  # fmt: skip
            )
            runs[label].append(seconds)
    hvp = statistics.median(hvps)
    ref = outs[BASIS_OPTIONS[0][0]]
    scale = float(np.abs(gauss_quadrature(ref.alpha, ref.beta)[0]).max())
    truth = None
    if exact is not None and op.dtype != torch.float64:
        truth = lanczos(exact.matvec, dim, steps, generator=torch.Generator().manual_seed(0))
    print(
        f"  SLQ m={steps} by basis option (median of {repeats} interleaved; HVP {hvp * 1e3:.1f} ms "
        f"median of {len(hvps)} between them; load {os.getloadavg()[0]:.2f}):"
    )
    for key, (label, _, _) in zip(OPTION_KEYS, BASIS_OPTIONS):
        out = outs[label]
        value = statistics.median(runs[label]) / (steps * hvp)
        ratio(f"slq_over_m_hvp_{name}_{key}", value, "<= 1.05")
        print(
            f"    {label:30s} SLQ / (m x HVP) = {value:.3f}  ({out.reorthogonalizations} of "
            f"{out.steps} steps reorthogonalized; vs float64 full: {_accuracy(ref, out, scale)})"
        )
        if truth is not None:
            print(f"    {'':30s} vs the float64 model: {_accuracy(truth, out, scale)}")


def lanczos_arithmetic(dim: int, steps: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """Seconds a step of :func:`bench`'s SLQ spends outside its products: the same call
    (one start vector, full reorthogonalization, a ``dtype`` basis) on a diagonal operator of
    ``dim`` entries, whose product is one multiplication, less that multiplication's time."""
    d = _diagonal_operator(dim).to(dtype)
    eps = torch.finfo(dtype).eps

    def run() -> object:
        return stochastic_lanczos_quadrature(
            d.mul, dim, steps, 1, generator=torch.Generator().manual_seed(0), basis_dtype=dtype,
            matvec_eps=eps, matvec_dtype=dtype,
        )  # fmt: skip

    run()
    seconds = statistics.median(timed(run)[0] for _ in range(repeats))
    v = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=dtype)
    product = statistics.median(timed(lambda: d.mul(v))[0] for _ in range(20))
    return max(seconds / steps - product, 0.0)


def trained(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 100) -> nn.Module:
    """A copy of ``model`` after ``steps`` seeded SGD steps (batch 64, lr 0.1, momentum 0.9)."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    return model


def trace_errors(seeds: int = 30, budgets: tuple[int, ...] = (24, 48, 96)) -> None:
    """Hutchinson, Hutch++ and XTrace at equal HVPs against the exact trace of the digits MLP."""
    x, y = probe_set("mlp")
    model = build("mlp", x)
    warm_up_running_stats(model, x)
    print(f"\n== trace at equal HVPs: RMS error over {seeds} seeds against the exact trace ==")
    print("   (digits MLP, 4,618 parameters, exact float64 Hessian in eval mode as the operator)")
    for when, net in (("at initialization", model), ("after 100 SGD steps", trained(model, x, y))):
        h = exact_hessian(net, x, y)
        e = np.linalg.eigvalsh(h.numpy())
        exact = float(torch.trace(h))
        share = np.sort(e**2)[::-1][:16].sum() / (e**2).sum()
        print(
            f"  {when}: trace {exact:.4f}; the top 16 |eigenvalues| carry {share:.0%} of ||H||_F^2"
        )
        for m in budgets:
            err: dict[str, list[float]] = {"hutchinson": [], "hutch++": [], "xtrace": []}
            for s in range(seeds):
                mv = h.matmul
                gens = [torch.Generator().manual_seed(s) for _ in range(3)]
                err["hutchinson"].append(hutchinson(mv, h.shape[0], m, generator=gens[0]).mean())
                err["hutch++"].append(hutch_plus_plus(mv, h.shape[0], m, generator=gens[1]).value)
                err["xtrace"].append(xtrace(mv, h.shape[0], m, generator=gens[2]).value)
            rms = {
                k: float(np.sqrt(np.mean(np.square(np.array(v) - exact)))) for k, v in err.items()
            }
            if m == 48:
                key = "init" if when.startswith("at") else "trained"
                ratio(
                    f"hutchpp_over_hutchinson_error_48hvp_{key}",
                    rms["hutch++"] / rms["hutchinson"],
                    "< 1",
                )
            print(
                f"    {m:3d} HVPs: Hutchinson {rms['hutchinson']:.4f}, Hutch++ {rms['hutch++']:.4f} "
                f"({rms['hutch++'] / rms['hutchinson']:.2f}x), XTrace {rms['xtrace']:.4f} "
                f"({rms['xtrace'] / rms['hutchinson']:.2f}x)"
            )


def _peak_rss() -> int:
    """The process's peak resident memory (VmHWM), bytes; 0 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _diagonal_operator(dim: int) -> torch.Tensor:
    """Ten outliers (50 down to 1.2) over a bulk N(0, 0.05^2): a Hessian-like diagonal, float64."""
    gen = torch.Generator().manual_seed(0)
    outliers = torch.tensor([50.0, 30.0, 20.0, 10.0, 5.0, 4.0, 3.0, 2.0, 1.5, 1.2])
    return torch.cat([outliers.double(), 0.05 * torch.randn(dim - 10, generator=gen).double()])


def _lanczos_alone(dim: int, steps: int, mode: str, basis_dtype: torch.dtype, out) -> None:
    """One Lanczos run in a fresh process: seconds, peak memory added, the tridiagonal."""
    torch.set_num_threads(1)
    d = _diagonal_operator(dim)
    before = _peak_rss()
    seconds, run = timed(
        lambda: lanczos(
            d.mul,
            dim,
            steps,
            generator=torch.Generator().manual_seed(1),
            basis_dtype=basis_dtype,
            reorthogonalize=mode,
        )  # fmt: skip
    )
    alpha, beta = run.alpha.numpy(), run.beta.numpy()  # plain arrays: no shared storage
    out.put((seconds, _peak_rss() - before, alpha, beta, run.reorthogonalizations))


def memory_scaling(sizes: list[int], steps: int = 80) -> None:
    """Lanczos time per step and memory against parameter count, per basis option (no model).

    Each run has a process of its own, so that its peak resident memory is its own.
    """
    print(f"\n== SLQ basis memory and time vs parameters (m={steps}, a diagonal operator) ==")
    ctx = mp.get_context("spawn")
    for dim in sizes:
        ref = None
        for label, mode, basis_dtype in BASIS_OPTIONS:
            try:  # what hessian_spectrum checks before its first product
                check_basis_fits(steps, dim, basis_dtype, "cpu")
            except BasisMemoryError as err:
                need = basis_bytes(steps, dim, basis_dtype)
                print(
                    f"  {dim:>11,} params  {label:30s} basis {need / 2**20:6.0f} MiB: refused up "
                    f"front ({str(err).split(';')[0].split(', but ')[1]})"
                )
                continue
            queue = ctx.Queue()
            proc = ctx.Process(target=_lanczos_alone, args=(dim, steps, mode, basis_dtype, queue))
            proc.start()
            seconds, peak, alpha, beta, passes = queue.get()
            proc.join()
            out = types.SimpleNamespace(alpha=alpha, beta=beta)
            ref = out if ref is None else ref
            print(
                f"  {dim:>11,} params  {label:30s} basis "
                f"{basis_bytes(steps, dim, basis_dtype) / 2**20:6.0f} MiB, peak memory "
                f"+{peak / 2**20:6.0f} MiB, {seconds / steps * 1e3:6.1f} ms per step "
                f"({passes} reorth.), vs float64 full: {_accuracy(ref, out, 50.0)}"
            )
    free = available_bytes("cpu") or 0
    print(
        f"  free memory now {free / 2**30:.1f} GiB; the largest model whose basis (or ARPACK's "
        "vectors) takes the 80% of it that hessian_spectrum allows:"
    )
    for label, per in (
        ("density, 80 steps, float64 basis", basis_bytes(80, 1, torch.float64)),
        ("density, 80 steps, float32 basis", basis_bytes(80, 1, torch.float32)),
        ("top-10 (ARPACK, float64)", top_k_cost(10**6, 10)[1] / 10**6),
    ):
        print(f"    {label:38s} {0.8 * free / per / 1e6:8.1f} M parameters")


def _width_for(params: float, depth: int = 4) -> int:
    """The width of a ``depth``-layer digits MLP (64 inputs, 10 classes) with about ``params`` parameters."""
    a, b = depth - 1, 64 + 10 + 3 * depth  # a w^2 + b w (weights, biases, batch norm gains)
    return int((-b + math.sqrt(b * b + 4 * a * params)) / (2 * a))


def _spectrum_alone(
    width: int, vectors: int, out, pieces: tuple[str, ...] = ("density", "top")
) -> None:
    """hessian_spectrum's density (80 steps), then its top-10, in a fresh process: the peak
    memory after each, the time and products of each, or the refusal of one that would not fit."""
    torch.set_num_threads(1)
    model = normprobe.build_model("mlp", "batch", seed=0, depth=4, width=width, input_shape=64)
    x, y = probe_set("mlp", 64)
    before = _peak_rss()
    report: dict[str, object] = {piece: "not run" for piece in ("density", "top")}
    for piece in pieces:
        try:
            spec = hessian_spectrum(
                model,
                F.cross_entropy,
                (x, y),
                what=piece,
                steps=80,
                num_vectors=vectors,
                k=10,
                n_samples=64,
                chunk_size=64,
            )
        except (BasisMemoryError, TopKCostError) as err:
            report[piece] = f"refused: {err}"
            continue
        report["dim"], report["basis"] = spec.dim, spec.basis_dtype
        detail = f"{spec.seconds[piece]:.0f} s, {spec.matvecs[piece]} HVPs"
        if piece == "top":
            detail += (
                f", lambda_1 {spec.top_eigenvalues[0]:.4g}, converged {spec.top.all_converged}"
            )
        report[piece] = f"{detail}, peak memory so far +{(_peak_rss() - before) / 2**30:.2f} GiB"
    out.put(report)


def model_scaling(
    sizes: list[int], vectors: list[int], pieces: tuple[str, ...] = ("density", "top")
) -> None:
    """hessian_spectrum end to end on float32 BatchNorm MLPs of the given sizes, one process each."""
    print(
        "\n== hessian_spectrum, density (80 steps) then top-10, float32 BatchNorm MLP of depth 4, "
        "64 samples, one thread =="
    )
    ctx = mp.get_context("spawn")
    for params, n_vectors in zip(sizes, vectors):
        width = _width_for(params)
        queue = ctx.Queue()
        proc = ctx.Process(target=_spectrum_alone, args=(width, n_vectors, queue, pieces))
        proc.start()
        proc.join()
        if proc.exitcode != 0 or queue.empty():
            print(f"  ~{params:,} params (width {width}): the process died (exit {proc.exitcode})")
            continue
        report = queue.get()
        dim = report.get("dim")
        print(
            f"  {dim or params:>11,} params (width {width}), {report.get('basis', '?')} basis, "
            f"{n_vectors} start vector(s); load {os.getloadavg()[0]:.2f}"
        )
        print(f"      density: {report['density']}")
        print(f"      top-10:  {report['top']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="*", default=["mlp", "wrn"], choices=["mlp", "wrn", "quickstart"]
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100, help="Lanczos steps m")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-pyhessian", action="store_true")
    parser.add_argument("--trace", action="store_true", help="Hutch++/XTrace vs Hutchinson")
    parser.add_argument(
        "--memory", nargs="*", type=float, default=[], help="parameter counts for the memory scan"
    )
    parser.add_argument(
        "--accuracy", type=float, default=1e-3, help="top-10 max relative error to match"
    )
    parser.add_argument(
        "--spectrum-sizes",
        nargs="*",
        type=float,
        default=[],
        help="parameter counts for hessian_spectrum end to end (density and top-10)",
    )
    parser.add_argument(
        "--spectrum-pieces",
        nargs="+",
        default=["density", "top"],
        choices=["density", "top"],
        help="the pieces of the end-to-end scan (each measured after the last)",
    )
    parser.add_argument(
        "--spectrum-vectors",
        nargs="*",
        type=int,
        default=[],
        help="SLQ start vectors per --spectrum-sizes entry (default 4 each)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="every ratio once, small: 3 repeats, m = 40 (20 for the WRN, on 256 samples), all "
        "three models, the trace comparison over 10 seeds at 48 HVPs, PyHessian's top-10 on the "
        "MLP only (a few minutes at 1 thread)",
    )
    args = parser.parse_args()
    if args.quick:
        args.models, args.repeats, args.steps, args.trace = (
            ["mlp", "quickstart", "wrn"],
            3,
            40,
            True,
        )
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
    load_before = os.getloadavg()[0]
    for name in args.models:
        steps = 40 if name == "quickstart" else args.steps  # the quickstart's lanczos_steps
        steps = 20 if args.quick and name == "wrn" else steps
        compare = use_pyhessian and name != "quickstart" and not (args.quick and name == "wrn")
        bench(name, args.repeats, steps, compare, args.accuracy, quick=args.quick)
    if args.trace:
        trace_errors(seeds=10, budgets=(48,)) if args.quick else trace_errors()
    if args.models:
        arpack_wrapper(126_218, args.repeats)
    if args.memory:
        memory_scaling([int(n) for n in args.memory])
    if args.spectrum_sizes:
        sizes = [int(n) for n in args.spectrum_sizes]
        vectors = args.spectrum_vectors + [4] * (len(sizes) - len(args.spectrum_vectors))
        model_scaling(sizes, vectors, tuple(args.spectrum_pieces))
    print(f"\ntotal {time.perf_counter() - start:.0f} s, load average now {os.getloadavg()[0]:.2f}")
    print(f"LOAD before {load_before:.2f} after {os.getloadavg()[0]:.2f}")
    for name, (value, target) in RATIOS.items():
        print(f"RATIO {name} {value:.4g}")
        if target:
            print(f"TARGET {name} {target.replace(' ', '')}")


if __name__ == "__main__":
    main()
