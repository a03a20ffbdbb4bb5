"""The Hessian engine on a language model's loss: a tiny transformer against its exact Hessian.

The loss is the mean next-token cross-entropy over every token of every
window (``normprobe.training.loss_for``); the probe set is cut into chunks of
windows, so ``H = sum_c (n_c / n) H_c`` is the Hessian of the mean over all
tokens (every window has T tokens). Exact Hessian from conftest.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import normprobe
from normprobe.hessian import HessianConvergenceWarning, hessian_spectrum
from normprobe.state import preserved
from normprobe.training import loss_for

K = 8  # vocabulary
T = 4  # context
CASES = [("layer", "pre"), ("prelayer", "pre"), ("layer", "post")]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request, exact_hessian_fn):
    norm, placement = request.param
    model = normprobe.build_model(
        "transformer",
        norm,
        seed=0,
        num_classes=K,
        context=T,
        depth=1,
        width=4,
        heads=2,
        mlp_ratio=2,
        placement=placement,
    ).double()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, K, (24, T + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    chunks = list(zip(x.split(8), y.split(8)))
    hessian = exact_hessian_fn(model, loss_for(model), chunks)
    return model, x, y, np.linalg.eigvalsh(hessian.numpy())


def test_top_eigenvalues_trace_and_outlier_ratio_match_the_exact_hessian(case) -> None:
    model, x, y, exact = case
    assert 200 <= len(exact) <= 400  # a few hundred parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error", HessianConvergenceWarning)
        spec = hessian_spectrum(
            model,
            loss_for(model),
            (x, y),
            n_samples=None,
            chunk_size=8,
            k=6,
            num_classes=4,
            steps=30,
            num_vectors=1,
            trace_samples=50,
            seed=0,
        )
    assert spec.dim == len(exact) and spec.num_samples == 24 and spec.num_chunks == 3
    top = exact[::-1][:6]
    np.testing.assert_allclose(spec.top_eigenvalues, top, rtol=1e-6)
    assert spec.outlier_ratio == pytest.approx(top[0] / top[3], rel=1e-6)
    spread = exact[-1] - exact[0]
    assert spec.smallest_eigenvalue == pytest.approx(exact[0], abs=1e-6 * spread)
    assert abs(spec.trace - exact.sum()) <= 3 * spec.trace_stderr
    nodes = np.concatenate(spec.nodes)
    assert nodes.max() <= exact[-1] + 1e-9 and nodes.min() >= exact[0] - 1e-9


def test_the_model_is_left_as_found_and_the_default_k_is_the_vocabulary(case) -> None:
    model, x, y, _ = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with preserved(model):
        spec = hessian_spectrum(model, loss_for(model), (x, y), what="top", n_samples=None, k=2)
    # with classes on the last axis, the output width is the vocabulary, not the sequence length
    assert spec.num_classes == K
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value), key
