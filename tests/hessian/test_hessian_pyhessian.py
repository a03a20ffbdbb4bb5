"""Cross-check with PyHessian 0.1 (a test dependency) on the same model in eval mode.

PyHessian forces ``model.eval()`` and takes the Hessian over one batch; our
``norm_mode="eval"`` over chunks is the same operator (running statistics do
not depend on the chunking). PyHessian writes graph-carrying ``.grad``
tensors into the model and draws from torch's global generator, so it gets a
copy of the model and a forked RNG. Its random vectors use the default
dtype, so float64 is made the default while it runs.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import normprobe
from normprobe.hessian import hessian_spectrum

pyhessian = pytest.importorskip("pyhessian")

F = nn.functional


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_top_eigenvalue_and_trace_agree_with_pyhessian(digits_probe) -> None:
    x, y = digits_probe
    model = normprobe.build_model("mlp", "batch", seed=0, depth=2, width=20, input_shape=64)
    model = model.double()
    with torch.no_grad():  # running statistics that differ from the defaults
        for chunk in torch.tensor_split(x, 4):
            model(chunk)
    ours = hessian_spectrum(
        model,
        F.cross_entropy,
        (x, y),
        what=("top", "trace"),
        norm_mode="eval",
        k=1,
        trace_samples=100,
    )
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_default_dtype(torch.float64)
        try:
            theirs = pyhessian.hessian(
                copy.deepcopy(model), F.cross_entropy, data=(x, y), cuda=False
            )
            top, _ = theirs.eigenvalues(top_n=1, maxIter=1000, tol=1e-6)
            samples = np.asarray(theirs.trace(maxIter=100, tol=1e-3))
        finally:
            torch.set_default_dtype(default)
    assert ours.top.all_converged
    # power iteration to a relative change of 1e-6 per step: within 1e-4 of the truth here
    assert top[0] == pytest.approx(ours.top_eigenvalues[0], rel=1e-4)
    their_err = samples.std(ddof=1) / math.sqrt(len(samples))
    combined = math.hypot(ours.trace_stderr, their_err)
    assert abs(ours.trace - samples.mean()) <= 3 * combined
