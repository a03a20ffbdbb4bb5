"""The pure numerics of normprobe.hessian.lanczos, against dense float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
import scipy.stats
import torch
from threadpoolctl import threadpool_info

from normprobe.hessian import (
    HessianError,
    blas_threads,
    default_breakdown_tol,
    extreme_eigenpairs,
    gauss_quadrature,
    gaussian_density,
    hutchinson,
    lanczos,
    lanczos_basis,
    mean_and_stderr,
    rademacher,
    ritz_residuals,
    stochastic_lanczos_quadrature,
)


def _matrix(eigenvalues: np.ndarray, seed: int = 0) -> torch.Tensor:
    """A dense symmetric matrix with the given spectrum and a random eigenbasis."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ q.T


def _hessian_like(n: int = 300, seed: int = 0) -> np.ndarray:
    """A few large outliers over a bulk around zero with a negative tail, like a network's."""
    rng = np.random.default_rng(seed)
    outliers = np.array([12.0, 9.0, 7.5, 6.0, 5.0, 4.2, 3.5, 3.0, 2.6, 2.2])
    bulk = rng.normal(0.0, 0.05, n - 10) + rng.exponential(0.05, n - 10)
    return np.sort(np.concatenate([outliers, bulk]))


def test_lanczos_is_orthonormal_and_tridiagonalizes() -> None:
    a = _matrix(_hessian_like())
    out = lanczos(
        lambda v: a @ v, 300, 60, generator=torch.Generator().manual_seed(1), keep_basis=True
    )
    q = out.basis
    assert out.steps == 60 and not out.breakdown and q.shape == (60, 300)
    assert torch.allclose(q @ q.T, torch.eye(60, dtype=torch.float64), atol=1e-13)
    t = torch.diag(out.alpha) + torch.diag(out.beta, 1) + torch.diag(out.beta, -1)
    assert torch.allclose(q @ a @ q.T, t, atol=1e-12)


def test_full_reorthogonalization_leaves_no_ghost_eigenvalues() -> None:
    # Without reorthogonalization, Lanczos run past convergence repeats the outliers.
    eigs = _hessian_like()
    a = _matrix(eigs)
    out = lanczos(lambda v: a @ v, 300, 120, generator=torch.Generator().manual_seed(2))
    nodes, weights = gauss_quadrature(out.alpha, out.beta)
    top = nodes[nodes > 2.0]
    np.testing.assert_allclose(np.sort(top)[::-1], eigs[::-1][:10], rtol=1e-10)


def test_breakdown_is_recorded_and_exact() -> None:
    eigs = np.repeat([-1.0, 0.5, 2.0, 3.0], 10)  # 4 distinct eigenvalues in 40 dimensions
    a = _matrix(eigs)
    out = lanczos(lambda v: a @ v, 40, 30, generator=torch.Generator().manual_seed(0))
    assert out.breakdown and out.steps == 4 and out.requested == 30
    nodes, weights = gauss_quadrature(out.alpha, out.beta)
    np.testing.assert_allclose(nodes, [-1.0, 0.5, 2.0, 3.0], atol=1e-12)
    assert weights.sum() == pytest.approx(1.0, abs=1e-14)


def test_quadrature_weights_are_projections_of_the_start_vector() -> None:
    eigs = np.linspace(-1.0, 4.0, 30)
    a = _matrix(eigs, seed=3)
    start = rademacher(30, generator=torch.Generator().manual_seed(4))
    out = lanczos(lambda v: a @ v, 30, 30, start=start)
    nodes, weights = gauss_quadrature(out.alpha, out.beta)
    evals, evecs = torch.linalg.eigh(a)
    expected = ((evecs.T @ (start / start.norm())) ** 2).numpy()
    np.testing.assert_allclose(nodes, evals.numpy(), atol=1e-12)
    np.testing.assert_allclose(weights, expected, atol=1e-12)


def test_quadrature_matches_moments_up_to_degree_2m_minus_1() -> None:
    eigs = _hessian_like(200)
    a = _matrix(eigs, seed=5)
    start = rademacher(200, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    q = start / start.norm()
    out = lanczos(lambda v: a @ v, 200, 6, start=start)
    nodes, weights = gauss_quadrature(out.alpha, out.beta)
    v = q.clone()
    for p in range(1, 12):  # Gauss quadrature with 6 nodes is exact to degree 11
        v = a @ v
        assert (weights * nodes**p).sum() == pytest.approx(float(q @ v), rel=1e-9, abs=1e-12)
    assert float(out.alpha[0]) == pytest.approx(float(q @ a @ q), rel=1e-12)


def test_slq_is_seeded() -> None:
    a = _matrix(_hessian_like(100))
    runs = [
        stochastic_lanczos_quadrature(
            lambda v: a @ v, 100, 10, 3, generator=torch.Generator().manual_seed(7)
        )
        for _ in range(2)
    ]
    for n1, n2 in zip(runs[0].nodes, runs[1].nodes):
        np.testing.assert_array_equal(n1, n2)
    assert runs[0].steps == [10, 10, 10] and runs[0].breakdown == [False] * 3


def test_lanczos_in_float32() -> None:
    a = _matrix(_hessian_like()).float()
    out = lanczos(
        lambda v: a @ v, 300, 60, generator=torch.Generator().manual_seed(1), dtype=torch.float32
    )
    nodes, _ = gauss_quadrature(out.alpha, out.beta)
    assert nodes.max() == pytest.approx(12.0, rel=1e-5)


def test_lanczos_rejects_bad_input() -> None:
    with pytest.raises(HessianError, match="start vector or a torch.Generator"):
        lanczos(lambda v: v, 3, 2)
    with pytest.raises(HessianError, match="zero or not finite"):
        lanczos(lambda v: v, 3, 2, start=torch.zeros(3))
    with pytest.raises(HessianError, match="non-finite"):
        lanczos(lambda v: v * float("nan"), 3, 2, start=torch.ones(3))


def test_hutchinson_is_exact_on_diagonal_and_unbiased() -> None:
    a = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    samples = hutchinson(lambda v: a @ v, 10, 5, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(samples, 55.0)
    b = _matrix(_hessian_like(100), seed=8)
    samples = hutchinson(lambda v: b @ v, 100, 400, generator=torch.Generator().manual_seed(0))
    mean, err = mean_and_stderr(samples)
    assert abs(mean - float(torch.trace(b))) < 3 * err


def test_extreme_eigenpairs_match_dense_to_1e_minus_10() -> None:
    eigs = _hessian_like()
    a = _matrix(eigs)
    top = extreme_eigenpairs(
        lambda v: a @ v, 300, 10, tol=1e-12, generator=torch.Generator().manual_seed(0)
    )
    assert top.method == "arpack" and top.all_converged
    np.testing.assert_allclose(top.values, eigs[::-1][:10], rtol=1e-10)
    assert (top.residuals <= top.tolerances).all()
    # the reported residual is the real one
    v = top.vectors[0]
    assert float((a @ v - top.values[0] * v).norm()) == pytest.approx(top.residuals[0], rel=1e-6)
    low = extreme_eigenpairs(
        lambda v: a @ v, 300, 1, which="smallest", tol=1e-10,
        generator=torch.Generator().manual_seed(0), max_matvecs=3000,
    )  # fmt: skip
    assert low.all_converged
    assert low.values[0] == pytest.approx(eigs[0], abs=1e-9 * (eigs[-1] - eigs[0]))


def test_extreme_eigenpairs_dense_path_and_float32() -> None:
    eigs = np.linspace(-2.0, 5.0, 40)
    a = _matrix(eigs)
    top = extreme_eigenpairs(lambda v: a @ v, 40, 3, generator=torch.Generator().manual_seed(0))
    assert top.method == "dense" and top.all_converged
    np.testing.assert_allclose(top.values, eigs[::-1][:3], rtol=1e-12)
    big = _matrix(_hessian_like()).float()
    top32 = extreme_eigenpairs(
        lambda v: big @ v, 300, 10, dtype=torch.float32, generator=torch.Generator().manual_seed(0)
    )
    assert top32.all_converged and top32.vectors.dtype == torch.float32
    np.testing.assert_allclose(top32.values, _hessian_like()[::-1][:10], rtol=1e-4)


def test_float32_arpack_eigenvalues_are_as_accurate_as_the_products(monkeypatch) -> None:
    """In float32 ARPACK's own Ritz values are good to a few 1e-7; each returned eigenvalue is
    the Rayleigh quotient of its vector summed in float64, as close to the float32 matrix's
    exact eigenvalues as float64 ARPACK gets (1e-8), in the same number of products."""
    n = 1500
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    top10 = torch.tensor([9.0, 7.5, 6.1, 5.0, 4.2, 3.3, 2.9, 2.5, 2.2, 2.0], dtype=torch.float64)
    d = torch.cat([top10, torch.rand(n - 10, generator=g, dtype=torch.float64) * 1.5 - 0.3])
    a = ((q * d) @ q.T).float()
    a = (a + a.T) / 2
    exact = np.linalg.eigvalsh(a.double().numpy())  # of the float32 matrix the products use
    seen = []
    real = scipy.sparse.linalg.eigsh

    def eigsh(op, *args, **kwargs):
        mu, vecs = real(op, *args, **kwargs)
        seen.append((op.dtype, np.sort(mu)[::-1]))
        return mu, vecs

    monkeypatch.setattr(scipy.sparse.linalg, "eigsh", eigsh)
    out = {}
    for dtype in (torch.float64, torch.float32):
        out[dtype] = extreme_eigenpairs(
            lambda v: a @ v.float(), n, 10, tol=1e-5, dtype=dtype,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        assert out[dtype].all_converged and out[dtype].vectors.dtype == dtype
        assert seen[-1][0] == (np.float64 if dtype == torch.float64 else np.float32)
    top = exact[::-1][:10]
    ritz32 = seen[-1][1]
    assert np.max(np.abs(ritz32 - top) / top) > 1e-7  # what ARPACK's float32 sums give
    np.testing.assert_allclose(out[torch.float32].values, top, rtol=3e-8)
    np.testing.assert_allclose(out[torch.float64].values, top, rtol=3e-8)
    assert out[torch.float32].matvecs == out[torch.float64].matvecs
    # residuals are those of the refined values: ||A v - lambda v||, in float64
    v = out[torch.float32].vectors[0].double()
    lam = out[torch.float32].values[0]
    residual = float((a.double() @ v - lam * v).norm())
    assert out[torch.float32].residuals[0] == pytest.approx(residual, rel=1e-2, abs=1e-6)
    low = extreme_eigenpairs(
        lambda v: a @ v.float(), n, 1, which="smallest", tol=1e-5, dtype=torch.float32,
        generator=torch.Generator().manual_seed(2), max_matvecs=3000,
    )  # fmt: skip
    assert low.all_converged
    assert low.values[0] == pytest.approx(exact[0], abs=1e-7 * (exact[-1] - exact[0]))


def test_unconverged_eigenvalues_are_flagged_never_silent() -> None:
    """The hessian-eigenthings failure (lambda_1 = 0.217 for a true 1.217) cannot pass unnoticed."""
    rng = np.random.default_rng(0)
    eigs = np.sort(np.concatenate([[1.217, 1.2, 1.19], rng.uniform(-0.3, 1.18, 497)]))
    a = _matrix(eigs)
    for budget in (22, 25, 30, 40, 60):
        out = extreme_eigenpairs(
            lambda v: a @ v, 500, 1, tol=1e-8, max_matvecs=budget,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        if out.converged[0]:
            # a converged value is within its residual of an eigenvalue, and here it is the top
            assert abs(out.values[0] - 1.217) <= out.residuals[0] + 1e-12
        else:
            assert np.isnan(out.values[0]) or out.residuals[0] > out.tolerances[0]
            assert "max_matvecs" in out.message or "tolerance" in out.message
    tiny = extreme_eigenpairs(
        lambda v: a @ v, 500, 3, tol=1e-10, max_matvecs=10,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert not tiny.converged.any() and "Raise max_matvecs" in tiny.message


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_low_rank_operator_gives_the_same_bits_on_every_call(dtype: torch.dtype) -> None:
    """Rank 3 in 300 dimensions with k = 10, like the Hessian of a network whose output
    collapsed: ARPACK's Krylov space turns invariant within a few products and it draws new
    random vectors. They come from the generator's seed, so two calls give the same bits
    (scipy >= 1.15 drew them from the operating system's entropy: the values of the null
    space, and the vectors, differed from call to call)."""
    d = torch.zeros(300, dtype=torch.float64)
    d[:3] = torch.tensor([3.5, 2.5, 1.5])
    a = torch.diag(d).to(dtype)
    first, second = (
        extreme_eigenpairs(
            lambda v: a @ v, 300, 10, generator=torch.Generator().manual_seed(0), dtype=dtype
        )
        for _ in range(2)
    )
    np.testing.assert_allclose(first.values[:3], [3.5, 2.5, 1.5], rtol=1e-6)
    np.testing.assert_array_equal(first.values, second.values)
    np.testing.assert_array_equal(first.residuals, second.residuals)
    np.testing.assert_array_equal(first.vectors.numpy(), second.vectors.numpy())


def test_a_noisy_operator_fails_the_explicit_residual_check() -> None:
    a = _matrix(_hessian_like())
    gen = torch.Generator().manual_seed(0)

    def noisy(v: torch.Tensor) -> torch.Tensor:
        return a @ v + 1e-4 * torch.randn(300, generator=gen, dtype=torch.float64)

    out = extreme_eigenpairs(
        noisy, 300, 3, tol=1e-3, max_matvecs=200, generator=torch.Generator().manual_seed(0)
    )
    strict = extreme_eigenpairs(
        noisy, 300, 3, tol=1e-6, max_matvecs=200, generator=torch.Generator().manual_seed(0)
    )
    assert out.converged[0]  # noise of norm 2e-3 meets tol 1e-3 relative to 12
    assert not strict.converged.any()


def test_gaussian_density_integrates_to_one_and_matches_closed_form() -> None:
    nodes = [np.array([0.0, 1.0]), np.array([0.5])]
    weights = [np.array([0.25, 0.75]), np.array([1.0])]
    grid = np.linspace(-3, 4, 7001)
    d = gaussian_density(nodes, weights, grid, 0.1)
    assert np.trapezoid(d, grid) == pytest.approx(1.0, abs=1e-8)
    peak = 1 / (0.1 * np.sqrt(2 * np.pi))
    i = np.searchsorted(grid, 0.5)
    far = peak * np.exp(-0.5 * (0.5 / 0.1) ** 2)  # a kernel 0.5 away from its node
    expected = 0.5 * (0.25 * far + 0.75 * far) + 0.5 * (1.0 * peak)
    assert grid[i] == pytest.approx(0.5) and d[i] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(HessianError, match="width must be positive"):
        gaussian_density(nodes, weights, grid, 0.0)


def test_mean_and_stderr() -> None:
    mean, err = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and err == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    with pytest.raises(HessianError, match="no samples"):
        mean_and_stderr([])


def test_blas_threads_limits_scipy_blas_only_inside() -> None:
    def blas() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas()
    with blas_threads(1):
        assert set(blas()) == {1}
    assert blas() == before


def test_ritz_residuals_are_the_true_residuals_of_the_ritz_vectors() -> None:
    a = _matrix(_hessian_like())
    out = lanczos(
        lambda v: a @ v, 300, 40, generator=torch.Generator().manual_seed(3), keep_basis=True
    )
    estimates = ritz_residuals(out.alpha, out.beta, out.residual_norm)
    t = torch.diag(out.alpha) + torch.diag(out.beta, 1) + torch.diag(out.beta, -1)
    thetas, s = torch.linalg.eigh(t)
    ritz = out.basis.T @ s  # (300, 40) Ritz vectors
    true = torch.linalg.vector_norm(a @ ritz - ritz * thetas, dim=0).numpy()
    np.testing.assert_allclose(estimates, true, rtol=1e-6, atol=1e-10)
    assert estimates[-1] < 1e-8  # the top outlier has converged
    quad = stochastic_lanczos_quadrature(
        lambda v: a @ v, 300, 40, 1, generator=torch.Generator().manual_seed(3)
    )
    np.testing.assert_allclose(quad.ritz_residuals[0], estimates, rtol=1e-9, atol=1e-12)


def _hessian_like_diagonal(dim: int, seed: int = 0) -> torch.Tensor:
    """A diagonal operator of dimension ``dim``: ten outliers over a bulk near zero (float64)."""
    gen = torch.Generator().manual_seed(seed)
    outliers = torch.tensor([50.0, 30.0, 20.0, 10.0, 5.0, 4.0, 3.0, 2.0, 1.5, 1.2])
    bulk = 0.05 * torch.randn(dim - 10, generator=gen, dtype=torch.float64)
    return torch.cat([outliers.double(), bulk])


def _quadrature_moments(nodes: np.ndarray, weights: np.ndarray, powers: int) -> np.ndarray:
    return np.array([(weights * nodes**p).sum() for p in range(1, powers + 1)])


@pytest.mark.parametrize("dim", [120_000, 300_000])
def test_float32_lanczos_above_100k_takes_every_step_and_matches_float64(dim: int) -> None:
    """Regression: the old tolerance ``100 * dim * eps`` was >= 1 in float32 above 84k.

    Every run then stopped after one step and returned a one-node "spectrum".
    """
    d = _hessian_like_diagonal(dim)
    start = rademacher(dim, generator=torch.Generator().manual_seed(1))
    q = start / start.norm()
    exact = np.array([float(q @ (d**p * q)) for p in range(1, 8)])  # q^T A^p q
    runs = {}
    for dtype, basis_dtype in (
        (torch.float64, None),
        (torch.float32, None),
        (torch.float64, torch.float32),
    ):
        a = d.to(dtype)
        runs[dtype, basis_dtype] = out = lanczos(
            lambda v, a=a: a * v, dim, 30, start=start, dtype=dtype, basis_dtype=basis_dtype
        )
        assert out.steps == 30 and not out.breakdown, (dtype, basis_dtype)
    ref_nodes, ref_weights = gauss_quadrature(*_ab(runs[torch.float64, None]))
    # Gauss quadrature with 30 nodes is exact to degree 59: the moments are the exact ones
    np.testing.assert_allclose(
        _quadrature_moments(ref_nodes, ref_weights, 7), exact, rtol=1e-10, atol=1e-13
    )
    for key in ((torch.float32, None), (torch.float64, torch.float32)):
        nodes, weights = gauss_quadrature(*_ab(runs[key]))
        # the converged outliers to float32 accuracy, the measure's moments too
        np.testing.assert_allclose(np.sort(nodes)[-5:], [5.0, 10.0, 20.0, 30.0, 50.0], rtol=2e-5)
        scale = 50.0 ** np.arange(1, 8)
        assert np.all(np.abs(_quadrature_moments(nodes, weights, 7) - exact) <= 1e-5 * scale)


def test_a_float32_basis_keeps_float32_resolution_at_a_million_parameters() -> None:
    """Its projections sum in float64 over blocks: the quadrature stays at float32's resolution.

    Summed by BLAS in float32 over all 1M entries, the same run moved the top
    node by 4.4e-6 of the scale and the quadrature by 3.0e-6 (Wasserstein-1).
    """
    dim = 1_000_000
    d = _hessian_like_diagonal(dim)
    runs = {
        basis_dtype: lanczos(
            d.mul, dim, 40, generator=torch.Generator().manual_seed(1), basis_dtype=basis_dtype
        )
        for basis_dtype in (torch.float64, torch.float32)
    }
    ref_nodes, ref_weights = gauss_quadrature(*_ab(runs[torch.float64]))
    nodes, weights = gauss_quadrature(*_ab(runs[torch.float32]))
    assert abs(nodes.max() - ref_nodes.max()) <= 2e-7 * 50.0
    w1 = scipy.stats.wasserstein_distance(nodes, ref_nodes, weights, ref_weights)
    assert w1 <= 1e-7 * 50.0


def _ab(out) -> tuple[torch.Tensor, torch.Tensor]:
    return out.alpha, out.beta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_breakdown_at_rounding_level_is_found_above_100k(dtype: torch.dtype) -> None:
    """``c I + U S U^T`` with rank 4 has a 5-dimensional Krylov space: Lanczos stops at 5, exactly."""
    dim, c = 150_000, 0.25
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(dim, 4, generator=gen, dtype=torch.float64))
    s = torch.tensor([40.0, 10.0, 3.0, -1.0], dtype=torch.float64)
    u_, s_ = u.to(dtype), s.to(dtype)
    out = lanczos(
        lambda v: c * v + u_ @ (s_ * (u_.T @ v)), dim, 20,
        generator=torch.Generator().manual_seed(1), dtype=dtype,
    )  # fmt: skip
    assert out.breakdown and out.steps == 5 and out.requested == 20
    assert out.breakdown_tol == 100 * torch.finfo(dtype).eps
    nodes, weights = gauss_quadrature(out.alpha, out.beta)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(nodes, np.sort(np.append(c + s.numpy(), c)), rtol=rtol)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)


def test_breakdown_tolerance_is_relative_to_scale_not_dimension() -> None:
    for dtype in (torch.float32, torch.float64):
        assert default_breakdown_tol(dtype) == 100 * torch.finfo(dtype).eps < 1e-4
    # the same operator at two scales breaks down at the same step
    d = torch.tensor([-1.0, 0.5, 2.0, 3.0], dtype=torch.float32).repeat(30_000)
    for factor in (1e-6, 1.0, 1e6):
        out = lanczos(
            lambda v, f=factor: f * d * v, d.numel(), 10,
            generator=torch.Generator().manual_seed(0), dtype=torch.float32,
        )  # fmt: skip
        assert out.steps == 4 and out.breakdown


def test_a_basis_buffer_in_host_memory_or_a_file_gives_the_same_bits(tmp_path) -> None:
    a = _matrix(_hessian_like())
    plain = stochastic_lanczos_quadrature(
        lambda v: a @ v, 300, 40, 3, generator=torch.Generator().manual_seed(2)
    )
    with lanczos_basis(40, 300, torch.float64) as buffer:
        shared = stochastic_lanczos_quadrature(
            lambda v: a @ v, 300, 40, 3, generator=torch.Generator().manual_seed(2), basis=buffer
        )
    with lanczos_basis(40, 300, torch.float64, path=tmp_path / "basis.bin") as mapped:
        on_disk = stochastic_lanczos_quadrature(
            lambda v: a @ v, 300, 40, 3, generator=torch.Generator().manual_seed(2), basis=mapped
        )
    assert not (tmp_path / "basis.bin").exists()
    for other in (shared, on_disk):
        for n1, n2, w1, w2 in zip(plain.nodes, other.nodes, plain.weights, other.weights):
            np.testing.assert_array_equal(n1, n2)
            np.testing.assert_array_equal(w1, w2)
    with pytest.raises(HessianError, match=r"shape \(>= 40, 300\)"):
        lanczos(lambda v: a @ v, 300, 40, start=torch.ones(300), basis=torch.empty(10, 300))


@pytest.mark.parametrize("reorthogonalize", ["full", "partial"])
@pytest.mark.parametrize("basis_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [300, 20_000])
def test_vectors_handed_in_the_matvecs_own_dtype_give_the_same_bits(
    reorthogonalize, basis_dtype, dim
) -> None:
    # A float32 operator answers in the dtype it is given, as HessianOperator does; handed
    # float32 vectors (matvec_dtype), the float64 recurrence must give the bits it gives when
    # every vector and product goes through float64 on the way
    gen = torch.Generator().manual_seed(4)
    diag = torch.randn(dim, generator=gen)
    low = torch.randn(dim, 3, generator=gen) * 2.0
    seen: list[torch.dtype] = []

    def matvec(v: torch.Tensor) -> torch.Tensor:
        seen.append(v.dtype)
        u = v.to(torch.float32)
        return (diag * u + low @ (low.T @ u)).to(v.dtype)

    def matmat(vs: torch.Tensor) -> torch.Tensor:
        return torch.stack([matvec(v) for v in vs])

    options = dict(
        basis_dtype=basis_dtype,
        reorthogonalize=reorthogonalize,
        matvec_eps=torch.finfo(torch.float32).eps,
    )
    runs = {}
    for handed in (None, torch.float32):
        seen.clear()
        runs[handed] = lanczos(
            matvec, dim, 30, generator=torch.Generator().manual_seed(6), keep_basis=True,
            matvec_dtype=handed, **options,
        )  # fmt: skip
        assert set(seen) == {torch.float64 if handed is None else torch.float32}
        runs[handed, "slq"] = [
            stochastic_lanczos_quadrature(
                matvec,
                dim,
                30,
                2,
                generator=torch.Generator().manual_seed(7),
                matvec_dtype=handed,
                matmat=block,
                **options,
            )
            for block in (None, matmat)
        ]
    before, after = runs[None], runs[torch.float32]
    assert after.steps == 30 and not after.breakdown
    assert torch.equal(before.alpha, after.alpha) and torch.equal(before.beta, after.beta)
    assert torch.equal(before.basis, after.basis) and before.basis.dtype == basis_dtype
    assert before.reorthogonalizations == after.reorthogonalizations
    for x, y in zip(runs[None, "slq"], runs[torch.float32, "slq"]):  # one by one; in lockstep
        for name in ("nodes", "weights", "ritz_residuals"):
            for a, b in zip(getattr(x, name), getattr(y, name)):
                np.testing.assert_array_equal(a, b)
    with pytest.raises(HessianError, match="matvec_dtype must be a floating dtype"):
        lanczos(matvec, dim, 3, start=torch.ones(dim), matvec_dtype=torch.int64)


def test_partial_reorthogonalization_matches_full_to_rounding() -> None:
    eigs = _hessian_like()
    a = _matrix(eigs)
    runs = {
        mode: lanczos(
            lambda v: a @ v,
            300,
            150,
            generator=torch.Generator().manual_seed(2),
            keep_basis=True,
            reorthogonalize=mode,
        )  # fmt: skip
        for mode in ("full", "partial")
    }
    full, part = runs["full"], runs["partial"]
    assert full.reorthogonalizations == 150 and 0 < part.reorthogonalizations < 150
    # semi-orthogonal: |q_j^T q_k| <= sqrt(eps), which keeps T exact to O(eps ||A||)
    gram = part.basis @ part.basis.T - torch.eye(150, dtype=torch.float64)
    assert float(gram.abs().max()) <= np.sqrt(np.finfo(np.float64).eps)
    nf, wf = gauss_quadrature(full.alpha, full.beta)
    npart, wpart = gauss_quadrature(part.alpha, part.beta)
    np.testing.assert_allclose(npart, nf, atol=1e-12 * eigs.max())
    np.testing.assert_allclose(wpart, wf, atol=1e-12)
    # no ghosts: each outlier appears once, at its value
    top = npart[npart > 2.0]
    np.testing.assert_allclose(np.sort(top)[::-1], eigs[::-1][:10], rtol=1e-10)


def test_partial_reorthogonalization_with_float32_products_in_a_float64_basis() -> None:
    """Products rounded to float32 lose orthogonality from 1e-7, not 1e-16: matvec_eps says so."""
    eigs = _hessian_like()
    a32 = _matrix(eigs).float()
    out = lanczos(
        lambda v: (a32 @ v.float()).double(), 300, 150, generator=torch.Generator().manual_seed(2),
        keep_basis=True, reorthogonalize="partial", matvec_eps=torch.finfo(torch.float32).eps,
    )  # fmt: skip
    gram = out.basis @ out.basis.T - torch.eye(150, dtype=torch.float64)
    assert float(gram.abs().max()) <= np.sqrt(torch.finfo(torch.float32).eps)
    nodes, _ = gauss_quadrature(out.alpha, out.beta)
    top = nodes[nodes > 2.0]
    np.testing.assert_allclose(np.sort(top)[::-1], eigs[::-1][:10], rtol=1e-5)


def test_partial_reorthogonalization_never_passes_twice_in_a_step() -> None:
    """Where the estimate's rounding floor ``sqrt(dim) eps / 2`` exceeds ``sqrt(eps)`` (float32
    products of more than about 34M parameters; here coarse products of 2,000), it asks for a
    pass every step: one, as full reorthogonalization makes, not two (it made 2 per step)."""
    dim, steps = 2000, 40
    d = _hessian_like_diagonal(dim)
    runs = {
        mode: lanczos(
            d.mul, dim, steps, generator=torch.Generator().manual_seed(0),
            reorthogonalize=mode, matvec_eps=1e-2,
        )  # fmt: skip
        for mode in ("full", "partial")
    }
    assert runs["partial"].reorthogonalizations <= steps
    np.testing.assert_allclose(runs["partial"].alpha, runs["full"].alpha, rtol=0, atol=1e-12)


def test_partial_reorthogonalization_above_100k_matches_exact_moments() -> None:
    dim = 126_218
    d = _hessian_like_diagonal(dim)
    start = rademacher(dim, generator=torch.Generator().manual_seed(1))
    q = start / start.norm()
    exact = np.array([float(q @ (d**p * q)) for p in range(1, 8)])
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        a = d.to(dtype)
        out = lanczos(
            lambda v, a=a: a * v, dim, 60, start=start, dtype=dtype, reorthogonalize="partial"
        )
        assert out.steps == 60 and out.reorthogonalizations <= 60
        nodes, weights = gauss_quadrature(out.alpha, out.beta)
        scale = 50.0 ** np.arange(1, 8)
        assert np.all(np.abs(_quadrature_moments(nodes, weights, 7) - exact) <= rtol * scale)
        # Ritz values to O(eps ||A||) (semi-orthogonality), as full reorthogonalization
        outliers = [5.0, 10.0, 20.0, 30.0, 50.0]
        np.testing.assert_allclose(np.sort(nodes)[-5:], outliers, atol=rtol * 50.0)
