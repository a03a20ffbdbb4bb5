"""Dense references for the Hessian engine's tests.

The exact Hessian is built column by column from Hessian-vector products by
forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``, vmapped
over the identity's columns): an independent route from the engine's double
backward. ``torch.func.hessian`` and ``jacrev(jacrev(f))`` are *not* used:
on torch 2.13 they return wrong, asymmetric Hessians for networks with
BatchNorm or LayerNorm. Every reference is checked for symmetry.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import normprobe
from normprobe.state import frozen_statistics, preserved

Batch = tuple[torch.Tensor, torch.Tensor]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run these tests with one torch thread, restoring the setting afterwards.

    The networks here are tiny, so a second thread gains little; but when
    another process keeps a core busy, torch's two OpenMP threads wait for
    each other at every parallel region and an HVP measured 240x slower
    (1.1 s instead of 4.6 ms for a 1,970-parameter MLP on 512 samples).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def exact_hessian(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunks: list[Batch],
    *,
    norm_mode: str = "train",
    names: list[str] | None = None,
) -> torch.Tensor:
    """``sum_c (n_c / n) H_c`` over ``chunks``, dense, float64, symmetric to rounding (checked)."""
    named = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    keys = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named]).double()
    total = sum(len(x) for x, _ in chunks)
    dim = flat.numel()
    hessian = torch.zeros(dim, dim, dtype=torch.float64)
    with preserved(model), frozen_statistics(model):
        model.train(norm_mode == "train")
        for x, y in chunks:

            def loss(w: torch.Tensor, x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                parts = torch.split(w.to(named[0][1].dtype), sizes)
                values = {k: t.view(s) for k, t, s in zip(keys, parts, shapes)}
                return loss_fn(functional_call(model, values, (x,)), y).double()

            def column(v: torch.Tensor, loss=loss) -> torch.Tensor:
                return jvp(grad(loss), (flat,), (v,))[1]

            eye = torch.eye(dim, dtype=torch.float64)
            with warnings.catch_warnings():  # torch's jvp decompositions use torch.jit.script
                warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated")
                hessian += len(x) / total * vmap(column, chunk_size=512)(eye)
    asymmetry = float((hessian - hessian.T).abs().max() / hessian.abs().max())
    assert asymmetry < 1e-12, f"reference Hessian not symmetric: {asymmetry:.2e}"
    return (hessian + hessian.T) / 2


@dataclass
class ExactCase:
    """A small network, its probe set and its exact Hessian."""

    norm: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    chunk_size: int
    hessian: torch.Tensor
    eigenvalues: np.ndarray  # ascending

    @property
    def chunks(self) -> list[Batch]:
        n = -(-len(self.x) // self.chunk_size)
        return list(zip(torch.tensor_split(self.x, n), torch.tensor_split(self.y, n)))

    @property
    def spread(self) -> float:
        return float(self.eigenvalues[-1] - self.eigenvalues[0])


@pytest.fixture(scope="session")
def digits_probe() -> Batch:
    """512 digits samples (flattened, 64 features), float64, a seeded subset."""
    ds = normprobe.load_dataset("digits")
    index = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(0))[:512]
    index = index.sort().values
    return ds.train.x[index].double(), ds.train.y[index]


@pytest.fixture(scope="session", params=["batch", "layer"])
def exact_case(request: pytest.FixtureRequest, digits_probe: Batch) -> ExactCase:
    """An MLP (2 hidden layers of 20, 1,970 parameters) with BatchNorm or LayerNorm, train mode."""
    norm = request.param
    model = normprobe.build_model("mlp", norm, seed=0, depth=2, width=20, input_shape=64)
    model = model.double()
    x, y = digits_probe
    case = ExactCase(norm, model, x, y, 128, torch.zeros(0), np.zeros(0))
    case.hessian = exact_hessian(model, nn.functional.cross_entropy, case.chunks)
    case.eigenvalues = np.linalg.eigvalsh(case.hessian.numpy())
    return case


@pytest.fixture(scope="session")
def exact_hessian_fn() -> Callable[..., torch.Tensor]:
    return exact_hessian
