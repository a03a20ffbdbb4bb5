"""hessian_spectrum against the exact eigendecomposition of small networks' full Hessians.

The networks: MLPs (2 hidden layers of 20 units, 1,970 parameters) with
BatchNorm in train mode (per-chunk batch statistics) or LayerNorm, on 512
digits samples in 4 chunks of 128, float64; exact Hessian from conftest.py.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse.linalg
import scipy.stats
import torch
from torch import nn

import normprobe
from normprobe.hessian import (
    DENSITY_WIDTH_FRACTION,
    HessianConvergenceWarning,
    HessianError,
    HessianOperator,
    hessian_spectrum,
)

F = nn.functional


@pytest.fixture(scope="module")
def spectrum64(exact_case):
    """The full spectrum in float64 (SLQ m=80, n_v=4), computed once per network."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", HessianConvergenceWarning)
        return hessian_spectrum(
            exact_case.model,
            F.cross_entropy,
            (exact_case.x, exact_case.y),
            chunk_size=exact_case.chunk_size,
            steps=80,
            num_vectors=4,
            trace_samples=64,
            seed=0,
        )


def test_top10_in_float64_to_1e_minus_6(exact_case, spectrum64) -> None:
    exact = exact_case.eigenvalues[::-1][:10]
    top = spectrum64.top_eigenvalues
    assert spectrum64.top.all_converged
    np.testing.assert_allclose(top, exact, rtol=1e-6)
    # the evidence is honest: each eigenvalue is within its residual of the exact one
    assert (np.abs(top - exact) <= spectrum64.top.residuals[:10] + 1e-12).all()
    assert spectrum64.num_classes == 10
    assert spectrum64.outlier_ratio == pytest.approx(exact[0] / exact[9], rel=1e-6)


def test_top10_in_float32_to_1e_minus_3(exact_case) -> None:
    model32 = copy.deepcopy(exact_case.model).float()
    spec = hessian_spectrum(
        model32,
        F.cross_entropy,
        (exact_case.x.float(), exact_case.y),
        what="top",
        chunk_size=exact_case.chunk_size,
        dtype=torch.float32,
    )
    assert spec.top.all_converged and spec.model_dtype == "float32" and spec.dtype == "float32"
    np.testing.assert_allclose(spec.top_eigenvalues, exact_case.eigenvalues[::-1][:10], rtol=1e-3)


def test_a_float32_models_arpack_keeps_float32_vectors_at_float64s_accuracy(
    exact_case, monkeypatch
) -> None:
    """ARPACK's vectors follow the SLQ basis's dtype (float32 for float32 products, unless
    basis_dtype says otherwise); its eigenvalues, refined in float64, are as close to the exact
    ones as with float64 vectors: within the float32 model's own rounding (measured 3-6e-8)."""
    model32 = copy.deepcopy(exact_case.model).float()
    seen = []
    real = scipy.sparse.linalg.eigsh

    def eigsh(op, *args, **kwargs):
        seen.append(op.dtype)
        return real(op, *args, **kwargs)

    monkeypatch.setattr(scipy.sparse.linalg, "eigsh", eigsh)
    exact = exact_case.eigenvalues
    for basis, kept in ((None, np.float32), (torch.float64, np.float64)):
        seen.clear()
        spec = hessian_spectrum(
            model32, F.cross_entropy, (exact_case.x.float(), exact_case.y),
            what=("top", "smallest"), chunk_size=exact_case.chunk_size, basis_dtype=basis,
        )  # fmt: skip
        assert seen == [kept, kept] and spec.basis_dtype == np.dtype(kept).name
        assert spec.top.all_converged and spec.smallest.all_converged
        np.testing.assert_allclose(spec.top_eigenvalues, exact[::-1][:10], rtol=3e-7)
        assert spec.smallest_eigenvalue == pytest.approx(exact[0], abs=1e-7 * exact_case.spread)


@pytest.mark.parametrize("batched", [False, True])
def test_a_float32_models_density_hands_the_operator_float32_vectors_same_bits(
    exact_case, monkeypatch, batched
) -> None:
    """SLQ gives the operator its own dtype (no float64 copy of each vector and product on the
    way): the nodes and weights are the bits of the float64 detour, one by one and in lockstep."""
    import normprobe.hessian.spectrum as spectrum_module

    model32 = copy.deepcopy(exact_case.model).float()
    seen: list[torch.dtype] = []
    for name in ("matvec", "matmat"):
        real = getattr(HessianOperator, name)

        def wrapped(self, v, real=real):
            seen.append(v.dtype)
            return real(self, v)

        monkeypatch.setattr(HessianOperator, name, wrapped)
    slq = spectrum_module.stochastic_lanczos_quadrature

    def detour(*args, **kwargs):  # every vector through the recurrence's float64, as before
        return slq(*args, **{**kwargs, "matvec_dtype": None})

    out = {}
    for how in ("handed", "detour"):
        if how == "detour":
            monkeypatch.setattr(spectrum_module, "stochastic_lanczos_quadrature", detour)
        seen.clear()
        out[how] = hessian_spectrum(
            model32, F.cross_entropy, (exact_case.x.float(), exact_case.y), what="density",
            chunk_size=exact_case.chunk_size, steps=30, num_vectors=3, batched=batched,
        )  # fmt: skip
        assert set(seen) == {torch.float32 if how == "handed" else torch.float64}
        assert batched or not out[how].batched["density"]  # layer norm's falls back to one by one
    for name in ("nodes", "weights", "ritz_residuals"):
        for a, b in zip(getattr(out["handed"], name), getattr(out["detour"], name)):
            np.testing.assert_array_equal(a, b)


def test_an_outlier_ratio_over_a_non_positive_lambda_k_is_nan_and_says_why() -> None:
    """lambda_1 / lambda_K is a ratio of positive curvatures: where lambda_K <= 0 (a Hessian
    with fewer than K positive eigenvalues, as a collapsed network's) it is NaN with a warning,
    never a division by zero or a negative "ratio"."""
    torch.manual_seed(0)
    net = nn.Linear(20, 4).double()  # 84 parameters: ARPACK, not the dense path
    data = torch.randn(64, 20, dtype=torch.float64), torch.zeros(64, dtype=torch.long)

    def concave(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # every eigenvalue < 0
        return -(out**2).mean()

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.simplefilter("error", RuntimeWarning)  # no numpy division warning
        spec = hessian_spectrum(net, concave, data, what="top", k=4, num_classes=4)
    assert spec.top.all_converged and (spec.top_eigenvalues < 0).all()
    assert np.isnan(spec.outlier_ratio)
    said = [str(w.message) for w in seen if issubclass(w.category, HessianConvergenceWarning)]
    assert len(said) == 1 and "outlier ratio not defined: lambda_4 = -" in said[0]
    row = spec.to_frame().query("metric == 'outlier_ratio'")
    assert len(row) == 1 and np.isnan(row["value"].iloc[0])
    # a zero lambda_K (exactly zero products: dead directions) gives NaN too, without a warning
    # from numpy; a positive one gives the ratio
    top = dataclasses.replace(spec.top, values=np.array([4.0, 2.0, 1.0, 0.0]))
    assert np.isnan(dataclasses.replace(spec, top=top).outlier_ratio)
    top = dataclasses.replace(spec.top, values=np.array([4.0, 2.0, 1.0, 0.5]))
    assert dataclasses.replace(spec, top=top).outlier_ratio == 8.0


def test_smallest_eigenvalue(exact_case, spectrum64) -> None:
    assert spectrum64.smallest.all_converged
    assert spectrum64.smallest_eigenvalue == pytest.approx(
        exact_case.eigenvalues[0], abs=1e-6 * exact_case.spread
    )


def test_slq_measure_is_close_to_the_exact_spectrum(exact_case, spectrum64) -> None:
    nodes = np.concatenate(spectrum64.nodes)
    weights = np.concatenate(spectrum64.weights) / len(spectrum64.nodes)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    distance = scipy.stats.wasserstein_distance(nodes, exact_case.eigenvalues, u_weights=weights)
    assert distance <= 0.005 * exact_case.spread
    assert spectrum64.lanczos_steps == [80] * 4 and spectrum64.breakdown == [False] * 4
    # Ritz values never leave the spectrum
    assert nodes.max() <= exact_case.eigenvalues[-1] + 1e-9
    assert nodes.min() >= exact_case.eigenvalues[0] - 1e-9


def test_trace_within_three_standard_errors(exact_case, spectrum64) -> None:
    exact = float(np.sum(exact_case.eigenvalues))
    assert len(spectrum64.trace_samples) == 64
    assert abs(spectrum64.trace - exact) <= 3 * spectrum64.trace_stderr
    # the first n_v probes are the SLQ start vectors, their v^T H v free from Lanczos
    alone = hessian_spectrum(
        exact_case.model,
        F.cross_entropy,
        (exact_case.x, exact_case.y),
        what="trace",
        chunk_size=exact_case.chunk_size,
        trace_samples=64,
    )
    np.testing.assert_allclose(alone.trace_samples, spectrum64.trace_samples, rtol=1e-9)
    assert alone.matvecs == {"trace": 64} and spectrum64.matvecs["trace"] == 60


def test_density_integrates_to_one_and_states_its_width(spectrum64) -> None:
    lo, hi = spectrum64.spectral_range
    frame = spectrum64.density()
    assert list(frame.columns) == ["eigenvalue", "density", "width"]
    width = frame["width"].iloc[0]
    assert width == pytest.approx(DENSITY_WIDTH_FRACTION * (hi - lo))
    assert np.trapezoid(frame["density"], frame["eigenvalue"]) == pytest.approx(1.0, abs=1e-6)
    # re-smoothing from the raw nodes and weights, on any grid and width
    grid = np.linspace(lo - 1, hi + 1, 5000)
    sharp = spectrum64.density(grid, width=width / 4)
    assert np.trapezoid(sharp["density"], grid) == pytest.approx(1.0, abs=1e-6)
    assert sharp["density"].max() > frame["density"].max()


def test_tidy_table(spectrum64) -> None:
    frame = spectrum64.to_frame()
    assert isinstance(frame, pd.DataFrame)
    counts = frame["metric"].value_counts()
    assert counts["eigenvalue"] == 10 and counts["slq_node"] == 4 * 80
    assert counts["trace"] == 1 and counts["trace_sample"] == 64
    assert counts["smallest_eigenvalue"] == 1 and counts["outlier_ratio"] == 1
    assert counts["weight_norm"] == len(spectrum64.weight_norms) == 8
    eig = frame[frame.metric == "eigenvalue"].sort_values("index")
    np.testing.assert_allclose(eig["value"], spectrum64.top_eigenvalues)
    assert eig["converged"].all() and (eig["residual"] <= eig["tolerance"]).all()
    assert {"norm_mode", "seed", "dtype", "num_samples", "params"} <= set(frame.columns)
    assert (frame["norm_mode"] == "train").all() and (frame["seed"] == 0).all()


def test_weight_norms_are_reported(exact_case, spectrum64) -> None:
    for name, p in exact_case.model.named_parameters():
        assert spectrum64.weight_norms[name] == pytest.approx(float(p.detach().norm()))


def test_model_left_exactly_as_found(exact_case, spectrum64) -> None:
    model = exact_case.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    hessian_spectrum(model, F.cross_entropy, (exact_case.x, exact_case.y), what="top", k=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == [m.training for m in model.modules()]
    assert all(p.grad is None for p in model.parameters())


def test_a_starved_solver_is_flagged_not_silently_wrong(exact_case) -> None:
    """hessian-eigenthings returned lambda_1 = 0.217 for a true 1.217; here that cannot pass."""
    with pytest.warns(HessianConvergenceWarning, match="Raise max_matvecs"):
        spec = hessian_spectrum(
            exact_case.model,
            F.cross_entropy,
            (exact_case.x, exact_case.y),
            what="top",
            max_matvecs=12,
            tol=1e-12,
        )
    assert not spec.top.converged.all()
    exact = exact_case.eigenvalues[::-1][: len(spec.top.values)]
    ok = spec.top.converged
    assert (np.abs(spec.top.values[ok] - exact[ok]) <= spec.top.residuals[ok] + 1e-12).all()
    frame = spec.to_frame()
    assert not frame.loc[frame.metric == "eigenvalue", "converged"].all()


def test_per_layer_spectrum_and_weight_scaling(exact_case) -> None:
    model = exact_case.model
    spec = hessian_spectrum(
        model, F.cross_entropy, (exact_case.x, exact_case.y), params="blocks.1", what="top", k=3
    )
    owners = [n for n, p in model.named_parameters() for _ in range(p.numel())]
    index = [i for i, n in enumerate(owners) if n.startswith("blocks.1.")]
    block = exact_case.hessian[index][:, index]
    exact = np.linalg.eigvalsh(block.numpy())[::-1][:3]
    np.testing.assert_allclose(spec.top_eigenvalues, exact, rtol=1e-6)
    assert spec.params == "blocks.1" and set(spec.weight_norms) == {
        "blocks.1.affine.weight",
        "blocks.1.norm.weight",
        "blocks.1.norm.bias",
    }
    scaled = hessian_spectrum(
        model,
        F.cross_entropy,
        (exact_case.x, exact_case.y),
        params="blocks.1.affine.weight",
        what="top",
        k=1,
        weight_scaled=True,
    )
    unscaled = hessian_spectrum(
        model,
        F.cross_entropy,
        (exact_case.x, exact_case.y),
        params="blocks.1.affine.weight",
        what="top",
        k=1,
    )
    w2 = scaled.weight_norms["blocks.1.affine.weight"] ** 2
    assert scaled.top_eigenvalues[0] == pytest.approx(w2 * unscaled.top_eigenvalues[0], rel=1e-6)


def test_scale_invariance_across_weight_scales() -> None:
    """A weight followed by BatchNorm: scaling it by c scales its Hessian block by 1/c^2."""
    ds = normprobe.load_dataset("digits")
    x, y = ds.train.x[:256].double(), ds.train.y[:256]
    model = normprobe.build_model("mlp", "batch", seed=0, depth=2, width=12, input_shape=64)
    model = model.double()
    kwargs = dict(params="blocks.0.affine.weight", what="top", k=2, chunk_size=256)
    before = hessian_spectrum(model, F.cross_entropy, (x, y), **kwargs)
    with torch.no_grad():
        model.blocks[0].affine.weight.mul_(3.0)
    after = hessian_spectrum(model, F.cross_entropy, (x, y), **kwargs)
    np.testing.assert_allclose(after.top_eigenvalues * 9.0, before.top_eigenvalues, rtol=1e-6)


def test_pieces_alone_and_argument_errors(exact_case) -> None:
    data = (exact_case.x, exact_case.y)
    spec = hessian_spectrum(exact_case.model, F.cross_entropy, data, what="smallest")
    assert spec.nodes is None and spec.top is None and spec.trace_samples is None
    assert spec.smallest.all_converged
    with pytest.raises(HessianError, match="without 'top'"):
        _ = spec.top_eigenvalues
    with pytest.raises(HessianError, match="what must name pieces"):
        hessian_spectrum(exact_case.model, F.cross_entropy, data, what="eigenvalues")
    with pytest.raises(HessianError, match="trace_samples"):
        hessian_spectrum(exact_case.model, F.cross_entropy, data, what="trace", trace_samples=1)
    with pytest.raises(HessianError, match="dtype"):
        hessian_spectrum(exact_case.model, F.cross_entropy, data, dtype=torch.float16)


def test_runs_beyond_max_matvecs_are_refused_before_any_product(exact_case, monkeypatch) -> None:
    """An absurd steps= (capped at the dimension, still thousands of products on a real
    model) is refused up front, as an absurd k is; at the bound it runs."""
    data = (exact_case.x, exact_case.y)
    products = []
    for name in ("matvec", "matmat"):
        original = getattr(HessianOperator, name)
        monkeypatch.setattr(
            HessianOperator,
            name,
            lambda self, v, original=original: products.append(1) or original(self, v),
        )
    with pytest.raises(HessianError, match=r"steps: 1000000 Lanczos steps .* use steps <= 10\b"):
        hessian_spectrum(exact_case.model, F.cross_entropy, data, what="density",
                         steps=10**6, max_matvecs=10)  # fmt: skip
    with pytest.raises(HessianError, match=r"trace_samples: 12 samples .* <= 10\b"):
        hessian_spectrum(exact_case.model, F.cross_entropy, data, what="trace",
                         trace_samples=12, max_matvecs=10)  # fmt: skip
    assert products == []
    spec = hessian_spectrum(exact_case.model, F.cross_entropy, data, what=("density", "trace"),
                            steps=10, trace_samples=10, max_matvecs=10)  # fmt: skip
    assert set(spec.lanczos_steps) == {10} and len(spec.trace_samples) == 10


def test_probe_subset_is_seeded_and_sized(exact_case) -> None:
    x = torch.cat([exact_case.x, exact_case.x[:100]])
    y = torch.cat([exact_case.y, exact_case.y[:100]])
    a = hessian_spectrum(exact_case.model, F.cross_entropy, (x, y), what="trace", trace_samples=4)
    b = hessian_spectrum(exact_case.model, F.cross_entropy, (x, y), what="trace", trace_samples=4)
    assert a.num_samples == 512 and a.num_chunks == 4
    np.testing.assert_array_equal(a.trace_samples, b.trace_samples)
