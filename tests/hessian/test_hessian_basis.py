"""The Lanczos basis in hessian_spectrum: float32 above 100k parameters, breakdowns, memory.

Regression for the silent float32 stop (every run above about 84k
parameters ended after one Lanczos step), the warning a real early stop
now raises, and the memory check that refuses a basis that cannot fit.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from normprobe.hessian import (
    BasisMemoryError,
    HessianConvergenceWarning,
    HessianError,
    basis_bytes,
    check_basis_fits,
    hessian_spectrum,
    lanczos_basis,
)

F = nn.functional


@pytest.fixture(scope="module")
def wide_mlp() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A float64 MLP of 112,010 parameters and 64 random samples of 64 features, 10 classes."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 300), nn.Tanh(), nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 10)
    ).double()
    x = torch.randn(64, 64, dtype=torch.float64)
    y = torch.randint(0, 10, (64,))
    return model, (x, y)


def test_float32_density_above_100k_parameters_takes_every_step(wide_mlp) -> None:
    model, data = wide_mlp
    dim = sum(p.numel() for p in model.parameters())
    assert dim > 100_000
    runs = {}
    for dtype, basis_dtype in (
        (torch.float64, None),
        (torch.float32, None),
        (torch.float64, torch.float32),
    ):
        runs[dtype, basis_dtype] = spec = hessian_spectrum(
            model, F.cross_entropy, data, what="density", steps=12, num_vectors=2,
            dtype=dtype, basis_dtype=basis_dtype, n_samples=None,
        )  # fmt: skip
        assert spec.lanczos_steps == [12, 12] and spec.breakdown == [False, False]
        assert not spec.messages
    ref = runs[torch.float64, None]
    for key in ((torch.float32, None), (torch.float64, torch.float32)):
        spec = runs[key]
        for n_ref, w_ref, n, w in zip(ref.nodes, ref.weights, spec.nodes, spec.weights):
            # the converged top node and the measure's first moments at float32 accuracy
            assert n.max() == pytest.approx(n_ref.max(), rel=1e-4)
            for p in (1, 2, 3):
                scale = np.abs(n_ref).max() ** p
                assert abs((w * n**p).sum() - (w_ref * n_ref**p).sum()) <= 1e-4 * scale


def test_float32_basis_of_a_float32_model_matches_the_float64_basis(wide_mlp) -> None:
    model, data = wide_mlp
    model32 = copy.deepcopy(model).float()
    data32 = (data[0].float(), data[1])
    specs = [
        hessian_spectrum(
            model32,
            F.cross_entropy,
            data32,
            what="density",
            steps=12,
            num_vectors=1,
            basis_dtype=basis_dtype,
            n_samples=None,
        )  # fmt: skip
        for basis_dtype in (torch.float64, None)
    ]
    # a float32 model's products are float32: its basis is too, unless asked otherwise
    assert (specs[0].basis_dtype, specs[1].basis_dtype) == ("float64", "float32")
    np.testing.assert_allclose(specs[1].nodes[0].max(), specs[0].nodes[0].max(), rtol=1e-4)


def test_a_float32_models_default_basis_is_as_close_to_float64_as_a_float64_basis(wide_mlp):
    """The default basis of a float32 model, against the same model in float64 (the truth).

    Wasserstein-1 distance of the quadratures over the spectral scale, both
    on float32 products: float64 basis 2.1e-9, float32 basis 3.0e-9 (2.6e-8
    when its projections were summed in float32 by BLAS).
    """
    model, data = wide_mlp
    kwargs = {"what": "density", "steps": 20, "num_vectors": 1, "n_samples": None}
    truth = hessian_spectrum(model, F.cross_entropy, data, **kwargs)
    scale = np.abs(truth.nodes[0]).max()
    model32, data32 = copy.deepcopy(model).float(), (data[0].float(), data[1])
    errors = {}
    for basis_dtype in (torch.float64, None):
        spec = hessian_spectrum(model32, F.cross_entropy, data32, **kwargs, basis_dtype=basis_dtype)
        n, w, n_ref, w_ref = spec.nodes[0], spec.weights[0], truth.nodes[0], truth.weights[0]
        errors[spec.basis_dtype] = scipy.stats.wasserstein_distance(n, n_ref, w, w_ref) / scale
        assert abs(n.max() - n_ref.max()) <= 1e-7 * scale
    assert set(errors) == {"float64", "float32"}  # None: a float32 model's basis is float32
    assert errors["float32"] <= 1e-8
    assert errors["float32"] <= 2 * errors["float64"] + 1e-9


def test_a_breakdown_is_reported_and_warned() -> None:
    """A linear least-squares model on inputs of rank 2: three distinct Hessian eigenvalues."""
    torch.manual_seed(0)
    model = nn.Linear(50, 4, bias=False).double()
    basis = torch.randn(2, 50, dtype=torch.float64)
    x = torch.randn(128, 2, dtype=torch.float64) @ basis
    y = torch.zeros(128, 4, dtype=torch.float64)
    with pytest.warns(HessianConvergenceWarning, match="stopped after 3 of 20 steps"):
        spec = hessian_spectrum(
            model, F.mse_loss, (x, y), what="density", steps=20, num_vectors=2, n_samples=None
        )
    assert spec.lanczos_steps == [3, 3] and spec.breakdown == [True, True]
    assert len(spec.messages) == 2 and "breakdown" in spec.messages[0]
    # H = (2 / (N K)) I_4 (x) X^T X: eigenvalues 0 and the two of (2 / (N K)) X^T X
    gram = (2 / (128 * 4)) * (x.T @ x)
    exact = np.sort(np.linalg.eigvalsh(gram.numpy()))[-2:]
    np.testing.assert_allclose(np.sort(spec.nodes[0])[1:], exact, rtol=1e-10)
    assert abs(np.sort(spec.nodes[0])[0]) < 1e-10


def test_a_basis_that_cannot_fit_is_refused_with_the_numbers(wide_mlp) -> None:
    model, data = wide_mlp
    need = basis_bytes(100, 112_010, torch.float64)
    assert need == 100 * 112_010 * 8
    with pytest.raises(BasisMemoryError, match=r"needs 0\.08 GiB .* basis_dtype=torch\.float32"):
        check_basis_fits(100, 112_010, torch.float64, budget=need // 4)
    assert check_basis_fits(100, 112_010, torch.float32, budget=need // 2) == need // 2
    # the real check: far more steps than any machine holds for this model (a budget of
    # products that lets them through, so that the memory check is the one to refuse)
    with pytest.raises(BasisMemoryError, match="the Lanczos basis needs"):
        hessian_spectrum(
            model, F.cross_entropy, data, what="density", steps=10**7, max_matvecs=10**8
        )


def test_hessian_spectrum_with_a_memory_mapped_basis_gives_the_same_bits(wide_mlp, tmp_path):
    model, data = wide_mlp
    args = (model, F.cross_entropy, data)
    # one start vector at a time in both (a mapped basis is never run in lockstep)
    kwargs = {"what": "density", "steps": 8, "num_vectors": 2, "n_samples": None, "batched": False}
    plain = hessian_spectrum(*args, **kwargs)
    mapped = hessian_spectrum(*args, **kwargs, basis_path=tmp_path / "basis.bin")
    for n1, n2 in zip(plain.nodes, mapped.nodes):
        np.testing.assert_array_equal(n1, n2)
    assert not (tmp_path / "basis.bin").exists()
    (tmp_path / "taken").write_text("")
    with pytest.raises(HessianError, match="exists"):
        with lanczos_basis(2, 3, torch.float64, path=tmp_path / "taken"):
            pass
    with pytest.raises(HessianError, match="basis_dtype must be"):
        hessian_spectrum(*args, **kwargs, basis_dtype=torch.float16)


def test_partial_reorthogonalization_in_hessian_spectrum_matches_full(wide_mlp) -> None:
    model, data = wide_mlp
    kwargs = {"what": "density", "steps": 30, "num_vectors": 2, "n_samples": None}
    full = hessian_spectrum(model, F.cross_entropy, data, **kwargs)
    part = hessian_spectrum(model, F.cross_entropy, data, **kwargs, reorthogonalize="partial")
    for n1, w1, n2, w2 in zip(full.nodes, full.weights, part.nodes, part.weights):
        np.testing.assert_allclose(n2, n1, atol=1e-10 * np.abs(n1).max())
        np.testing.assert_allclose(w2, w1, atol=1e-10)
    with pytest.raises(HessianError, match="reorthogonalize must be"):
        hessian_spectrum(model, F.cross_entropy, data, **kwargs, reorthogonalize="some")


def test_the_spectrum_records_how_its_basis_was_kept(wide_mlp) -> None:
    model, data = wide_mlp
    kwargs = {"what": "density", "steps": 4, "num_vectors": 1, "n_samples": None}
    default = hessian_spectrum(model, F.cross_entropy, data, **kwargs)
    assert (default.basis_dtype, default.reorthogonalize) == ("float64", "full")
    chosen = hessian_spectrum(
        model, F.cross_entropy, data, **kwargs, basis_dtype=torch.float32, reorthogonalize="partial"
    )
    assert (chosen.basis_dtype, chosen.reorthogonalize) == ("float32", "partial")


_TOP_K_PEAK = """
import resource, sys, torch
torch.set_num_threads(1)
from normprobe.hessian import extreme_eigenpairs
from normprobe.hessian.basis import top_k_cost
dtype = getattr(torch, sys.argv[1])
dim = 1_000_000
d = torch.cat([torch.arange(20, 0, -1, dtype=dtype), torch.rand(dim - 20, dtype=dtype)])
tol = 1e-8 if dtype == torch.float64 else 1e-5
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
top = extreme_eigenpairs(d.mul, dim, 10, generator=torch.Generator().manual_seed(0), tol=tol, dtype=dtype)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
assert top.converged.all(), top.values
assert (abs(top.values - torch.arange(20, 10, -1).numpy()) <= 20 * tol).all(), top.values
print(after - before, top_k_cost(dim, 10, dtype)[1])
"""


@pytest.fixture(scope="module")
def top_k_peaks() -> dict[str, tuple[int, int]]:
    """Per dtype, (measured, estimated) bytes of ``_TOP_K_PEAK``, each in a process of its own
    (the peak is the process's), both at once: one thread each on two cores."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    procs = {
        dtype: subprocess.Popen(
            [sys.executable, "-c", _TOP_K_PEAK, dtype],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for dtype in ("float64", "float32")
    }
    peaks = {}
    for dtype, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        measured, estimated = out.split()
        peaks[dtype] = int(measured), int(estimated)
    return peaks


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_top_k_memory_estimate_covers_what_arpack_takes(dtype, top_k_peaks) -> None:
    """``top_k_cost`` is what the refusal and the config check go by: it must not fall short,
    in float64 and in float32 (a float32 model's default, whose eigenvalues are then refined
    in float64 from their residuals' products).

    ARPACK's Lanczos vectors alone (what it counted before) were 36% of the peak; a 50M-parameter
    top-10 that the estimate let through was killed for memory at 24 GB.
    """
    measured, estimated = top_k_peaks[dtype]
    itemsize = 8 if dtype == "float64" else 4
    assert estimated == (21 + 6 + 20) * 1_000_000 * itemsize
    assert measured <= 1.1 * estimated, (measured, estimated)


def test_the_config_check_sizes_arpack_in_the_dtype_it_runs_in(monkeypatch) -> None:
    """A float32 model's ARPACK keeps float32 vectors (hessian.dtype float64 or not): the check
    lets through what fits in float32 and refuses a float64 model of the same size."""
    import normprobe.hessian.basis as basis
    from normprobe.checks import check_hessian_size
    from normprobe.config import ConfigError, parse_config
    from normprobe.hessian.basis import BASIS_SHARE, top_k_cost

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    dim = sum(p.numel() for p in model.parameters())
    need32 = top_k_cost(dim, 10, torch.float32)[1]
    assert top_k_cost(dim, 10, torch.float64)[1] == 2 * need32
    # room for 1.5x the float32 vectors: float32 fits, float64 does not
    monkeypatch.setattr(
        basis, "available_bytes", lambda device=None: int(1.5 * need32 / BASIS_SHARE)
    )
    config64, config32 = (
        parse_config(
            {
                "model": {"name": "mlp"},
                "hessian": {
                    "enabled": True,
                    "schedule": [0],
                    "pieces": ["top"],
                    "top_k": 10,
                    "dtype": dtype,
                },
            }
        )  # fmt: skip
        for dtype in ("float64", "float32")
    )
    check_hessian_size(config64, model)  # float32 products: float32 vectors
    check_hessian_size(config32, model)
    model64 = copy.deepcopy(model).double()
    check_hessian_size(config32, model64)  # float32 Lanczos: float32 vectors
    with pytest.raises(ConfigError, match="hessian.top_k: 10 eigenvalues of a Hessian of dim"):
        check_hessian_size(config64, model64)
