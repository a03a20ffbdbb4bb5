"""Hutch++ and XTrace against the exact trace: dense matrices and small networks' exact Hessians.

Every comparison with Hutchinson is at the same number of products, over
the same seeds, scored against ``trace`` of the exact float64 Hessian
(conftest.py: 1,970-parameter MLPs with BatchNorm or LayerNorm). At
initialization these Hessians' spectra are flat (the top 16 of 1,970
eigenvalues carry 13-64% of the squared Frobenius norm), where deflation
cannot pay for the products it takes; after 100 SGD steps the LayerNorm
MLP's top 16 carry 97%, and there both beat Hutchinson.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import normprobe
from normprobe.hessian import (
    HessianError,
    hessian_spectrum,
    hutch_plus_plus,
    hutch_plus_plus_split,
    hutchinson,
    xtrace,
)

F = nn.functional


def _low_rank(dim: int, eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(dim, len(eigenvalues), generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ u.T


def test_xtrace_is_exact_on_a_matrix_of_rank_below_its_vectors() -> None:
    a = _low_rank(200, [9.0, -4.0, 2.5, 1.0, 0.5])
    est = xtrace(lambda v: a @ v, 200, 20, generator=torch.Generator().manual_seed(0))
    assert est.rank == 5 and est.matvecs == 15 and est.stderr == 0.0
    assert est.value == pytest.approx(float(torch.trace(a)), abs=1e-10)


def test_xtrace_leave_one_out_matches_a_direct_computation() -> None:
    """Each ``t_i`` against its definition with ``Q_i`` from a QR of ``A W`` without column i."""
    gen = torch.Generator().manual_seed(1)
    b = torch.randn(40, 40, generator=gen, dtype=torch.float64)
    a = b @ torch.diag(torch.logspace(0, -3, 40, dtype=torch.float64)) @ b.T
    est = xtrace(lambda v: a @ v, 40, 12, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)
    w = torch.stack([normprobe.hessian.rademacher(40, generator=gen) for _ in range(6)], dim=1)
    expected = []
    for i in range(6):
        qi, _ = torch.linalg.qr(a @ torch.cat([w[:, :i], w[:, i + 1 :]], dim=1))
        p = torch.eye(40, dtype=torch.float64) - qi @ qi.T
        expected.append(float(torch.trace(qi.T @ a @ qi) + w[:, i] @ p @ a @ p @ w[:, i]))
    np.testing.assert_allclose(est.samples, expected, rtol=1e-10)
    assert est.matvecs == 12


def test_hutch_plus_plus_is_exact_on_a_matrix_of_rank_below_the_sketch() -> None:
    a = _low_rank(200, [9.0, -4.0, 2.5, 1.0, 0.5])
    for seed in range(3):
        est = hutch_plus_plus(
            lambda v: a @ v, 200, 20, generator=torch.Generator().manual_seed(seed)
        )
        assert est.matvecs == 20 and est.rank == 5  # a sketch of 6 columns, one of them null
        assert est.value == pytest.approx(float(torch.trace(a)), abs=1e-10)
        np.testing.assert_allclose(est.samples, 0.0, atol=1e-10)  # nothing left to sample
        assert len(est.samples) == 20 - 6 - 5  # the null column's product went to the samples


@pytest.mark.parametrize("estimator", [hutch_plus_plus, xtrace])
def test_variance_reduced_estimators_are_unbiased(estimator) -> None:
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(60, 60, generator=gen, dtype=torch.float64)
    a = (b + b.T) / 2
    values = [
        estimator(lambda v: a @ v, 60, 12, generator=torch.Generator().manual_seed(s)).value
        for s in range(400)
    ]
    mean, err = np.mean(values), np.std(values, ddof=1) / np.sqrt(len(values))
    assert abs(mean - float(torch.trace(a))) < 4 * err


def test_split_and_bad_input() -> None:
    assert hutch_plus_plus_split(16) == (5, 6)
    for m in range(4, 40):
        sketch, samples = hutch_plus_plus_split(m)
        assert 2 * sketch + samples == m and sketch >= 1 and samples >= 2
    with pytest.raises(HessianError, match="at least 4 products"):
        hutch_plus_plus_split(3)
    with pytest.raises(HessianError, match="non-finite"):
        hutch_plus_plus(lambda v: v * float("nan"), 10, 6, generator=torch.Generator())
    with pytest.raises(HessianError, match="at least 4 products"):
        xtrace(lambda v: v, 10, 3, generator=torch.Generator())


def _errors(matvec, dim: int, matvecs: int, exact: float, seeds: int) -> dict[str, float]:
    """Root mean square error of each estimator at ``matvecs`` products, over the same seeds."""
    errors: dict[str, list[float]] = {"hutchinson": [], "hutch++": [], "xtrace": []}
    for s in range(seeds):
        gens = [torch.Generator().manual_seed(s) for _ in range(3)]
        errors["hutchinson"].append(hutchinson(matvec, dim, matvecs, generator=gens[0]).mean())
        errors["hutch++"].append(hutch_plus_plus(matvec, dim, matvecs, generator=gens[1]).value)
        errors["xtrace"].append(xtrace(matvec, dim, matvecs, generator=gens[2]).value)
    return {k: float(np.sqrt(np.mean(np.square(np.array(v) - exact)))) for k, v in errors.items()}


@pytest.fixture(scope="module")
def trained_layer_norm_hessian(digits_probe, exact_hessian_fn) -> torch.Tensor:
    """The exact Hessian of the LayerNorm test MLP after 100 seeded SGD steps on digits."""
    model = normprobe.build_model("mlp", "layer", seed=0, depth=2, width=20, input_shape=64)
    model = model.double()
    x, y = digits_probe
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        i = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    chunks = list(zip(torch.tensor_split(x, 4), torch.tensor_split(y, 4)))
    return exact_hessian_fn(model, F.cross_entropy, chunks)


@pytest.mark.parametrize(
    ("matvecs", "xtrace_ratio", "hutchpp_ratio"), [(24, 0.8, 1.0), (48, 0.5, 0.6)]
)
def test_variance_reduction_beats_hutchinson_where_outliers_dominate(
    trained_layer_norm_hessian, matvecs, xtrace_ratio, hutchpp_ratio
) -> None:
    """RMS error over 30 seeds at the same products; the gain grows with the products (O(1/m))."""
    h = trained_layer_norm_hessian
    e = np.linalg.eigvalsh(h.numpy())
    top16 = np.sort(e**2)[::-1][:16].sum() / (e**2).sum()
    assert top16 > 0.9  # the regime the estimators are for
    rms = _errors(lambda v: h @ v, h.shape[0], matvecs, float(torch.trace(h)), seeds=30)
    assert rms["xtrace"] < xtrace_ratio * rms["hutchinson"], rms
    assert rms["hutch++"] < hutchpp_ratio * rms["hutchinson"], rms


def test_hessian_spectrum_hutch_plus_plus_against_the_exact_trace(exact_case) -> None:
    exact = float(torch.trace(exact_case.hessian))
    args = (exact_case.model, F.cross_entropy, (exact_case.x, exact_case.y))
    spec = hessian_spectrum(
        *args, what="trace", chunk_size=exact_case.chunk_size, trace_samples=24,
        trace_method="hutch++", seed=3,
    )  # fmt: skip
    assert spec.trace_method == "hutch++" and spec.matvecs["trace"] == 24
    # the same estimate as the pure function on the exact Hessian, seeded alike
    direct = hutch_plus_plus(
        lambda v: exact_case.hessian @ v, exact_case.hessian.shape[0], 24,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert spec.trace == pytest.approx(direct.value, rel=1e-8)
    assert spec.trace_low_rank == pytest.approx(direct.low_rank, rel=1e-8)
    assert abs(spec.trace - exact) <= 4 * spec.trace_stderr + 1e-9 * abs(exact)
    row = spec.to_frame().query("metric == 'trace'").iloc[0]
    assert row["value"] == pytest.approx(spec.trace) and row["samples"] == len(spec.trace_samples)
    with pytest.raises(HessianError, match="trace_method must be one of"):
        hessian_spectrum(*args, what="trace", trace_method="hutch")
    with pytest.raises(HessianError, match="trace_samples >= 4"):
        hessian_spectrum(*args, what="trace", trace_method="hutch++", trace_samples=3)
    spec = hessian_spectrum(
        *args, what="trace", chunk_size=exact_case.chunk_size, trace_samples=24,
        trace_method="xtrace", seed=3,
    )  # fmt: skip
    direct = xtrace(
        lambda v: exact_case.hessian @ v, exact_case.hessian.shape[0], 24,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert spec.trace_method == "xtrace" and spec.matvecs["trace"] == 24
    assert spec.trace == pytest.approx(direct.value, rel=1e-8) and spec.trace_low_rank == 0.0
    np.testing.assert_allclose(spec.trace_samples, direct.samples, rtol=1e-7)
