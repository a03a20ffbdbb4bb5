"""The lean train-mode batch norm of the Hessian's forward pass, against torch's in float64.

Same loss and gradient bits, Hessian-vector products equal to rounding,
and the whole Hessian equal to the exact one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normprobe
import normprobe.hessian.batchnorm as lean
from normprobe.hessian import HessianOperator, hessian_spectrum
from normprobe.hessian.batchnorm import LeanBatchNorm, batch_norm_train


@pytest.mark.parametrize("shape", [(16, 5), (5, 4, 7), (6, 3, 4, 4)])
def test_gradient_is_torchs_and_the_second_derivative_matches_to_rounding(shape) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(shape[1], dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randn(*shape, dtype=torch.float64, generator=gen)
    vs = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in (x, w, b)]
    results = []
    for norm in (lambda x, w, b: F.batch_norm(x, None, None, w, b, True), batch_norm_train):
        out = norm(x, w, b)
        loss = ((torch.tanh(out) * target) ** 2).sum()
        grads = torch.autograd.grad(loss, (x, w, b), create_graph=True)
        hv = torch.autograd.grad(grads, (x, w, b), vs)
        results.append((out.detach(), [g.detach() for g in grads], hv))
    (out0, g0, h0), (out1, g1, h1) = results
    assert torch.equal(out0, out1)
    assert all(torch.equal(a, c) for a, c in zip(g0, g1))
    for a, c in zip(h0, h1):
        assert float((a - c).abs().max()) <= 1e-14 * float(a.abs().max())


def test_only_large_train_mode_calls_with_an_affine_are_routed() -> None:
    seen = []
    original = lean.batch_norm_train

    def spy(*args, **kwargs):
        seen.append(args[0].shape)
        return original(*args, **kwargs)

    big = torch.randn(2, lean.LEAN_MIN_ELEMENTS // 2, dtype=torch.float64)
    w, b = (
        torch.ones(big.shape[1], dtype=torch.float64),
        torch.zeros(big.shape[1], dtype=torch.float64),
    )
    lean.batch_norm_train = spy
    try:
        with LeanBatchNorm():
            F.batch_norm(big, None, None, w, b, True)
            F.batch_norm(big[:, :8], None, None, w[:8], b[:8], True)  # small: torch's
            F.batch_norm(big, None, None, None, None, True)  # no affine: torch's
            F.batch_norm(
                big,
                torch.zeros(big.shape[1], dtype=torch.float64),
                torch.ones(big.shape[1], dtype=torch.float64),
                w,
                b,
                False,
            )  # eval
    finally:
        lean.batch_norm_train = original
    assert seen == [big.shape]


@pytest.fixture(scope="module")
def conv_bn():
    """A small BatchNorm CNN whose first two norms see >= 2**16 elements per call."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=gen)
    return model, x, y


def test_operator_products_match_torchs_batch_norm_in_float64(conv_bn) -> None:
    model, x, y = conv_bn
    assert x.numel() // x.shape[1] * 8 >= lean.LEAN_MIN_ELEMENTS
    native = HessianOperator(model, F.cross_entropy, (x, y), chunk_size=32)
    native.lean_batch_norm = False
    ours = HessianOperator(model, F.cross_entropy, (x, y), chunk_size=32)
    vs = torch.randn(3, ours.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with native, ours:
        a = torch.stack([native.matvec(v) for v in vs])
        b = torch.stack([ours.matvec(v) for v in vs])
        assert torch.equal(native.gradient(), ours.gradient())
        assert native.loss() == ours.loss()
        block = ours.matmat(vs)  # batched (or one at a time where torch cannot batch)
    assert float((a - b).abs().max()) <= 1e-13 * float(a.abs().max())
    assert float((block - b).abs().max()) <= 1e-13 * float(b.abs().max())


def test_the_whole_hessian_is_the_exact_one(monkeypatch, exact_case) -> None:
    if exact_case.norm != "batch":
        pytest.skip("batch norm only")
    monkeypatch.setattr(lean, "LEAN_MIN_ELEMENTS", 0)  # route the small MLP's norms too
    spec = hessian_spectrum(
        exact_case.model,
        F.cross_entropy,
        exact_case.chunks,
        what="top",
        k=3,
        tol=1e-10,
    )
    top = exact_case.eigenvalues[::-1][:3]
    np.testing.assert_allclose(spec.top_eigenvalues, top, rtol=1e-8)
    with HessianOperator(exact_case.model, F.cross_entropy, exact_case.chunks) as op:
        dense = torch.stack([op.matvec(e) for e in torch.eye(op.dim, dtype=torch.float64)[:50]])
    assert float((dense - exact_case.hessian[:50]).abs().max()) <= 1e-10 * float(
        exact_case.hessian.abs().max()
    )


def test_a_zoo_wrn_keeps_its_gradient_bits() -> None:
    model = normprobe.build_model(
        "wrn", "batch", seed=0, depth=10, widen=1, input_shape=(1, 16, 16)
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 16, 16, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    native = HessianOperator(model, F.cross_entropy, (x, y))
    native.lean_batch_norm = False
    ours = HessianOperator(model, F.cross_entropy, (x, y))
    v = torch.randn(ours.dim, generator=gen)
    with native, ours:
        assert torch.equal(native.gradient(), ours.gradient())
        a, b = native.matvec(v), ours.matvec(v)
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())  # float32 rounding
