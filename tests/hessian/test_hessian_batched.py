"""Products in blocks: SLQ start vectors in lockstep and Hutchinson probes in batches.

Every batched path must give the numbers of the one-product-at-a-time path
(float64: to rounding, and bit for bit where the rows' products are), and
the Lanczos loop must still give the tridiagonal of the plain full
reorthogonalization it replaced.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import normprobe
from normprobe.hessian import (
    HessianError,
    HessianOperator,
    fully_connected,
    gauss_quadrature,
    hessian_spectrum,
    hutchinson,
    lanczos,
    lanczos_lockstep,
    rademacher,
    stochastic_lanczos_quadrature,
)


def _matrix(eigenvalues: np.ndarray, seed: int = 0) -> torch.Tensor:
    """A dense symmetric matrix with the given spectrum and a random eigenbasis."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ q.T


def _hessian_like(n: int, seed: int = 0) -> np.ndarray:
    """A few large outliers over a bulk around zero, like a network's Hessian."""
    rng = np.random.default_rng(seed)
    outliers = np.array([12.0, 9.0, 7.5, 6.0, 5.0, 4.2, 3.5, 3.0, 2.6, 2.2])
    bulk = rng.normal(0.0, 0.05, n - 10) + rng.exponential(0.05, n - 10)
    return np.sort(np.concatenate([outliers, bulk]))


def _reference_lanczos(a: torch.Tensor, start: torch.Tensor, steps: int):
    """The loop the engine had before: three-term recurrence, then CGS twice when needed."""
    dim = len(start)
    q = torch.zeros(steps, dim, dtype=torch.float64)
    q[0] = start / torch.linalg.vector_norm(start)
    alpha, beta = [], []
    for j in range(steps):
        w = a @ q[j]
        al = float(q[j] @ w)
        w = w - al * q[j]
        if j:
            w = w - beta[-1] * q[j - 1]
        before = torch.linalg.vector_norm(w)
        h = q[: j + 1] @ w
        w = w - q[: j + 1].T @ h
        al += float(h[-1])
        after = torch.linalg.vector_norm(w)
        if after < before / math.sqrt(2.0):
            h = q[: j + 1] @ w
            w = w - q[: j + 1].T @ h
            al += float(h[-1])
            after = torch.linalg.vector_norm(w)
        alpha.append(al)
        if j + 1 < steps:
            beta.append(float(after))
            q[j + 1] = w / after
    return np.array(alpha), np.array(beta)


def test_lanczos_matches_the_previous_loop_to_1e_12() -> None:
    a = _matrix(_hessian_like(400))
    start = rademacher(400, generator=torch.Generator().manual_seed(3))
    ref_nodes, ref_weights = gauss_quadrature(*_reference_lanczos(a, start, 60))
    out = lanczos(lambda v: a @ v, 400, 60, start=start)
    nodes, weights = gauss_quadrature(out.alpha, out.beta)
    scale = np.abs(ref_nodes).max()
    assert np.abs(nodes - ref_nodes).max() <= 1e-12 * scale
    assert np.abs(weights - ref_weights).max() <= 1e-12


@pytest.mark.parametrize("reorthogonalize", ["full", "partial"])
@pytest.mark.parametrize("basis_dtype", [torch.float64, torch.float32])
def test_lockstep_runs_are_the_sequential_runs_bit_for_bit(reorthogonalize, basis_dtype) -> None:
    a = _matrix(_hessian_like(300), seed=1)
    options = dict(basis_dtype=basis_dtype, reorthogonalize=reorthogonalize)
    seq = stochastic_lanczos_quadrature(
        lambda v: a @ v, 300, 40, 3, generator=torch.Generator().manual_seed(5), **options
    )
    calls = []

    def matmat(vs: torch.Tensor) -> torch.Tensor:
        calls.append(len(vs))
        return torch.stack([a @ v for v in vs])

    lock = stochastic_lanczos_quadrature(
        lambda v: a @ v,
        300,
        40,
        3,
        generator=torch.Generator().manual_seed(5),
        matmat=matmat,
        **options,
    )
    assert calls == [3] * 40  # one block product per step
    for name in ("nodes", "weights", "ritz_residuals"):
        for x, y in zip(getattr(seq, name), getattr(lock, name)):
            assert np.array_equal(x, y)
    assert seq.steps == lock.steps and seq.reorthogonalizations == lock.reorthogonalizations


def test_lockstep_block_shrinks_when_a_run_breaks_down() -> None:
    a = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    starts = torch.stack(
        [
            torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64),  # 2 values
            torch.ones(8, dtype=torch.float64),  # 5 values
        ]
    )
    sizes = []

    def matmat(vs):
        sizes.append(len(vs))
        return vs @ a

    runs = lanczos_lockstep(matmat, starts, 8)
    assert [r.steps for r in runs] == [2, 5] and all(r.breakdown for r in runs)
    assert sizes == [2, 2, 1, 1, 1]
    for r, s in zip(runs, starts):
        alone = lanczos(lambda v: a @ v, 8, 8, start=s)
        assert torch.equal(r.alpha, alone.alpha) and torch.equal(r.beta, alone.beta)
    with pytest.raises(HessianError, match="block"):
        lanczos_lockstep(matmat, torch.ones(8), 3)


def test_batched_hutchinson_draws_the_same_vectors() -> None:
    a = _matrix(_hessian_like(200), seed=2)
    seq = hutchinson(lambda v: a @ v, 200, 11, generator=torch.Generator().manual_seed(1))
    blocks = []

    def matmat(vs):
        blocks.append(len(vs))
        return vs @ a

    bat = hutchinson(
        lambda v: a @ v, 200, 11, generator=torch.Generator().manual_seed(1), matmat=matmat, block=4
    )
    assert blocks == [4, 4, 3]
    np.testing.assert_allclose(bat, seq, rtol=1e-13)


@pytest.fixture(scope="module")
def bn_mlp():
    model = normprobe.build_model("mlp", "batch", seed=0, depth=2, width=16, input_shape=64)
    model = model.double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 64, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (96,), generator=gen)
    return model, x, y


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"norm_mode": "eval"},
        {"graph_memory": 0},  # chunks rebuilt on every product
        {"weight_scaled": True, "params": ["blocks.1", "head"]},
    ],
)
def test_matmat_rows_are_matvec_products_in_float64(bn_mlp, options) -> None:
    model, x, y = bn_mlp
    with HessianOperator(
        model, nn.functional.cross_entropy, (x, y), chunk_size=32, **options
    ) as op:
        vs = torch.randn(5, op.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        block = op.matmat(vs)
        rows = torch.stack([op.matvec(v) for v in vs])
        assert op.matvecs == 10
    scale = float(rows.abs().max())
    assert float((block - rows).abs().max()) <= 1e-14 * scale
    with pytest.raises(HessianError, match="block of shape"):
        op.matmat(vs[0])


def test_batched_spectrum_equals_sequential_in_float64(bn_mlp) -> None:
    model, x, y = bn_mlp
    common = dict(
        what=("density", "trace"), steps=20, num_vectors=3, trace_samples=9, chunk_size=32
    )
    seq = hessian_spectrum(model, nn.functional.cross_entropy, (x, y), batched=False, **common)
    bat = hessian_spectrum(model, nn.functional.cross_entropy, (x, y), batched=True, **common)
    auto = hessian_spectrum(model, nn.functional.cross_entropy, (x, y), **common)
    assert seq.batched == {"density": False, "trace": False}
    assert bat.batched == {"density": True, "trace": True} == auto.batched
    scale = max(float(np.abs(n).max()) for n in seq.nodes)
    for a, b in zip(seq.nodes, bat.nodes):
        assert np.abs(a - b).max() <= 1e-12 * scale
    for a, b in zip(seq.weights, bat.weights):
        assert np.abs(a - b).max() <= 1e-12
    np.testing.assert_allclose(bat.trace_samples, seq.trace_samples, rtol=1e-12)
    assert bat.matvecs == seq.matvecs
    with pytest.raises(HessianError, match="batched"):
        hessian_spectrum(model, nn.functional.cross_entropy, (x, y), batched="yes", **common)


def test_auto_is_a_rule_of_structure() -> None:
    mlp = normprobe.build_model("mlp", "batch", seed=0, depth=2, width=8, input_shape=64)
    weight = normprobe.build_model("mlp", "weight", seed=0, depth=2, width=8, input_shape=64)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    assert fully_connected(mlp) and fully_connected(weight)
    assert not fully_connected(conv)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 4, 4, generator=gen), torch.randint(0, 2, (16,), generator=gen)
    spec = hessian_spectrum(
        conv, nn.functional.cross_entropy, (x, y), what="trace", trace_samples=4
    )
    assert spec.batched == {"trace": False}


def test_a_model_without_a_batching_rule_falls_back_to_one_product_at_a_time() -> None:
    # normprobe's layer norm has an op (aten::is_nonzero) with no batching rule in its
    # double backward on torch 2.13: the block goes through matvec, and the spectrum says so
    model = normprobe.build_model("mlp", "layer", seed=0, depth=2, width=12, input_shape=64)
    model = model.double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=gen)
    common = dict(what=("density", "trace"), steps=10, num_vectors=2, trace_samples=4)
    seq = hessian_spectrum(model, nn.functional.cross_entropy, (x, y), batched=False, **common)
    bat = hessian_spectrum(model, nn.functional.cross_entropy, (x, y), batched=True, **common)
    with HessianOperator(model, nn.functional.cross_entropy, (x, y)) as op:
        vs = torch.randn(2, op.dim, generator=gen, dtype=torch.float64)
        block = op.matmat(vs)
        works = op.batch_works
        assert torch.equal(block, torch.stack([op.matvec(v) for v in vs]))
    for a, b in zip(seq.nodes, bat.nodes):
        assert np.array_equal(a, b)
    if works is False:
        assert bat.batched == {"density": False, "trace": False}


def test_auto_runs_large_bases_one_start_vector_at_a_time(bn_mlp, monkeypatch) -> None:
    import normprobe.hessian.spectrum as spectrum

    model, x, y = bn_mlp
    common = dict(what=("density", "trace"), steps=10, num_vectors=2, trace_samples=4)
    monkeypatch.setattr(spectrum, "LOCKSTEP_BYTES", 1000)
    auto = hessian_spectrum(model, nn.functional.cross_entropy, (x, y), **common)
    forced = hessian_spectrum(model, nn.functional.cross_entropy, (x, y), batched=True, **common)
    assert auto.batched == {"density": False, "trace": True}
    assert forced.batched == {"density": True, "trace": True}
    for a, b in zip(auto.nodes, forced.nodes):
        assert np.abs(a - b).max() <= 1e-12 * np.abs(a).max()


def test_auto_keeps_larger_networks_one_product_at_a_time(bn_mlp, monkeypatch) -> None:
    import normprobe.hessian.spectrum as spectrum

    model, x, y = bn_mlp
    monkeypatch.setattr(spectrum, "BATCHED_MAX_DIM", 100)
    spec = hessian_spectrum(
        model,
        nn.functional.cross_entropy,
        (x, y),
        what=("density", "trace"),
        steps=5,
        num_vectors=2,
        trace_samples=4,
    )
    assert spec.batched == {"density": False, "trace": False}
