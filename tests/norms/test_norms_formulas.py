"""Normalizers without a torch twin, against references written here from docs/definitions.md.

Each reference is plain tensor algebra in float64 with the axes spelled out,
so it shares no code with the package. Gradients are compared too: the
reference is differentiable, so the stopped gradients of Batch Renorm and
the batch-statistic paths are checked as well as the forward pass.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normprobe import norms

EPS = 1e-5
DT = torch.float64


def _x(kind: str, seed: int = 0, shift: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (10, 6) if kind == "dense" else (5, 6, 4, 3)
    return torch.randn(shape, generator=g, dtype=DT) * 1.5 + shift


def _B(z: torch.Tensor) -> tuple[int, ...]:
    return (0,) if z.dim() == 2 else (0, 2, 3)


def _F(z: torch.Tensor) -> tuple[int, ...]:
    return (1,) if z.dim() == 2 else (1, 2, 3)


def _cv(v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (z.dim() - 2)))


def _mean(z: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(z.shape[a] for a in axes)
    return z.sum(dim=axes, keepdim=True) / n


def _var(z: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    return _mean((z - _mean(z, axes)) ** 2, axes)


def _gamma_beta(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.copy_(torch.rand(6, generator=g, dtype=DT) + 0.5)
        module.bias.copy_(torch.randn(6, generator=g, dtype=DT))
    w = module.weight.detach() if module.weight is not None else torch.ones(6, dtype=DT)
    return w, module.bias.detach()


def _compare(module: nn.Module, reference, x: torch.Tensor) -> None:
    """Forward values and input gradients of module(x) and reference(x) agree."""
    x1 = x.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y1, y2 = module(x1), reference(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    w = torch.randn(y1.shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_bmlv(kind: str) -> None:
    m = norms.BMLVNorm(6).to(DT)
    gamma, beta = _gamma_beta(m)
    running = torch.zeros(6, dtype=DT)
    for step in range(3):
        x = _x(kind, step, shift=step)

        def ref(z):
            u = z - _mean(z, _B(z))
            return u / torch.sqrt(_var(u, _F(u)) + EPS) * _cv(gamma, z) + _cv(beta, z)

        _compare(m, ref, x)
        running = 0.9 * running + 0.1 * _mean(x, _B(x)).flatten()
    torch.testing.assert_close(m.running_mean, running)
    m.eval()
    x = _x(kind, 9)

    def ref_eval(z):
        u = z - _cv(running, z)
        return u / torch.sqrt(_var(u, _F(u)) + EPS) * _cv(gamma, z) + _cv(beta, z)

    _compare(m, ref_eval, x)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_lmbv(kind: str) -> None:
    m = norms.LMBVNorm(6).to(DT)
    gamma, beta = _gamma_beta(m)
    running = torch.ones(6, dtype=DT)
    for step in range(3):
        x = _x(kind, step, shift=step)

        def ref(z):
            u = z - _mean(z, _F(z))
            return u / torch.sqrt(_var(u, _B(u)) + EPS) * _cv(gamma, z) + _cv(beta, z)

        _compare(m, ref, x)
        u = x - _mean(x, _F(x))
        n = u.numel() // 6
        running = 0.9 * running + 0.1 * _var(u, _B(u)).flatten() * n / (n - 1)
    torch.testing.assert_close(m.running_var, running)
    m.eval()

    def ref_eval(z):
        u = z - _mean(z, _F(z))
        return u / torch.sqrt(_cv(running, z) + EPS) * _cv(gamma, z) + _cv(beta, z)

    _compare(m, ref_eval, _x(kind, 9))


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("name", ["prelayer", "preregnorm"])
def test_prelayer_and_preregnorm(kind: str, name: str) -> None:
    torch.manual_seed(0)
    affine = (nn.Linear(5, 6) if kind == "dense" else nn.Conv2d(5, 6, 3, padding=1)).to(DT)
    layer = norms.build(name, affine)
    gamma, beta = _gamma_beta(layer.norm)
    W = affine.weight.detach()
    b = affine.bias.detach() if affine.bias is not None else torch.zeros(6, dtype=DT)

    def ref(x):
        xc = x - _mean(x, _F(x))  # centred per example over (C, H, W)
        if kind == "dense":
            z = xc @ W.T + b
        else:
            z = torch.nn.functional.conv2d(xc, W, b, padding=1)
        u = z / torch.sqrt(_var(z, _F(z)) + EPS)  # no mean subtracted after A
        return u * _cv(gamma, z) + _cv(beta, z)

    g = torch.Generator().manual_seed(3)
    x = torch.randn((8, 5) if kind == "dense" else (4, 5, 4, 4), generator=g, dtype=DT) + 2.0
    for mode in (True, False):  # same in train and eval mode
        layer.train(mode)
        _compare(layer, ref, x)
    if name == "preregnorm":
        layer.train()
        z = layer.affine(layer.pre(x))
        u = z / torch.sqrt(_var(z, _F(z)) + EPS)
        layer(x)
        expected = (_mean(u, _B(u)).flatten() ** 2).mean()
        torch.testing.assert_close(layer.norm.penalty, expected)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_regnorm_forward_and_penalty(kind: str) -> None:
    m = norms.RegNorm(6).to(DT)
    gamma, beta = _gamma_beta(m)

    def ref(z):
        u = (z - _mean(z, _F(z))) / torch.sqrt(_var(z, _F(z)) + EPS)
        return u * _cv(gamma, z) + _cv(beta, z)

    x = _x(kind)
    _compare(m, ref, x)
    m(x)
    u = (x - _mean(x, _F(x))) / torch.sqrt(_var(x, _F(x)) + EPS)
    torch.testing.assert_close(m.penalty, (_mean(u, _B(u)).flatten() ** 2).mean())
    # the loss term is differentiable and pushes the batch means towards zero
    xg = x.clone().requires_grad_(True)
    m(xg)
    m.penalty.backward()
    assert xg.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_regnorm_penalty_zero_exactly_when_batch_means_are_zero(kind: str) -> None:
    m = norms.RegNorm(6).to(DT)
    a = _x(kind, 1)
    # pairs (a, -a): LayerNorm is odd, so every channel's batch mean of u is 0 (up to the
    # summation order of the reduction: exactly 0 for one pair, roundoff for several)
    m(torch.cat([a[:1], -a[:1]]))
    assert m.penalty.item() == 0.0
    m(torch.cat([a, -a]))
    assert m.penalty.item() < 1e-28
    # any example that breaks the symmetry makes some channel mean non-zero
    b = torch.cat([a, -a])
    b[0] = b[0] + 0.1 * torch.arange(b[0].numel(), dtype=DT).reshape(b[0].shape)
    m(b)
    u = (b - _mean(b, _F(b))) / torch.sqrt(_var(b, _F(b)) + EPS)
    assert _mean(u, _B(u)).abs().max() > 1e-3
    assert m.penalty.item() > 1e-6
    # norms.regularization sums the penalty of every RegNorm layer of a model
    model = nn.Sequential(norms.RegNorm(6).to(DT), norms.RegNorm(6).to(DT))
    model(b)
    total = norms.regularization(model)
    torch.testing.assert_close(total, model[0].penalty + model[1].penalty)


def _renorm_reference(z, mu, sigma, r_max, d_max):
    mean_b = _mean(z, _B(z))
    sigma_b = torch.sqrt(_var(z, _B(z)) + EPS)
    r = (sigma_b / _cv(sigma, z)).clamp(1 / r_max, r_max).detach()
    d = ((mean_b - _cv(mu, z)) / _cv(sigma, z)).clamp(-d_max, d_max).detach()
    return (z - mean_b) / sigma_b * r + d, mean_b.flatten().detach(), sigma_b.flatten().detach()


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_batch_renorm_against_reference_through_its_schedule(kind: str) -> None:
    total = 20
    m = norms.BatchRenorm(6, total_steps=total, r_max=3.0, d_max=5.0).to(DT)
    gamma, beta = _gamma_beta(m)
    mu, sigma = torch.zeros(6, dtype=DT), torch.ones(6, dtype=DT)
    for step in range(total + 2):
        # docs/definitions.md: pure BN for the first 10%, r_max reaches 3 at 50%, d_max 5 at 80%
        t = step
        r_max = 1.0 if t < 2 else min(3.0, 1.0 + 2.0 * (t - 2) / (10 - 2))
        d_max = 0.0 if t < 2 else min(5.0, 5.0 * (t - 2) / (16 - 2))
        assert m.clip_limits() == pytest.approx((r_max, d_max))
        x = _x(kind, step, shift=0.3 * step) * (1 + 0.1 * step)

        def ref(z, mu=mu, sigma=sigma, r_max=r_max, d_max=d_max):
            out, _, _ = _renorm_reference(z, mu, sigma, r_max, d_max)
            return out * _cv(gamma, z) + _cv(beta, z)

        _compare(m, ref, x)  # one forward pass: the moving averages update once, after use
        _, mean_b, sigma_b = _renorm_reference(x, mu, sigma, r_max, d_max)
        mu = mu + 0.01 * (mean_b - mu)
        sigma = sigma + 0.01 * (sigma_b - sigma)
        torch.testing.assert_close(m.running_mean, mu)
        torch.testing.assert_close(m.running_std, sigma)
        assert int(m.num_batches_tracked) == step + 1
    m.eval()

    def ref_eval(z):
        return (z - _cv(mu, z)) / _cv(sigma, z) * _cv(gamma, z) + _cv(beta, z)

    _compare(m, ref_eval, _x(kind, 50))


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_batch_renorm_with_rmax_1_dmax_0_is_batchnorm_in_train_mode(kind: str) -> None:
    renorm = norms.BatchRenorm(6, r_max=1.0, d_max=0.0).to(DT)
    bn = norms.BatchNorm(6).to(DT)
    for step in range(5):
        x = _x(kind, step, shift=2.0 * step)
        x1 = x.clone().requires_grad_(True)
        x2 = x.clone().requires_grad_(True)
        y1, y2 = renorm(x1), bn(x2)
        torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
        y1.pow(3).sum().backward()
        y2.pow(3).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-10)
    # eval mode uses the moving statistics, not the batch
    renorm.eval()
    x = _x(kind, 42, shift=-1.0)
    expected = (x - _cv(renorm.running_mean, x)) / _cv(renorm.running_std, x)
    torch.testing.assert_close(renorm(x), expected)
    assert not torch.allclose(renorm(x), bn.train()(x), atol=1e-3)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_weight_meanbn(kind: str) -> None:
    torch.manual_seed(0)
    affine = (nn.Linear(5, 6) if kind == "dense" else nn.Conv2d(5, 6, 3, padding=1)).to(DT)
    V = affine.weight.detach().clone()
    layer = norms.build("weight-meanbn", affine)
    assert layer.affine.bias is None  # the mean subtraction makes the bias redundant
    _, beta = _gamma_beta(layer.norm)
    g = torch.linalg.vector_norm(V.reshape(6, -1), dim=1)  # torch's init: g = ||V||

    def A(x):
        W = (
            g.reshape(-1, *([1] * (V.dim() - 1)))
            * V
            / torch.linalg.vector_norm(V.reshape(6, -1), dim=1).reshape(-1, *([1] * (V.dim() - 1)))
        )
        return x @ W.T if kind == "dense" else torch.nn.functional.conv2d(x, W, padding=1)

    x = torch.randn((8, 5) if kind == "dense" else (4, 5, 4, 4), dtype=DT) + 1.0

    def ref(x):
        z = A(x)
        return z - _mean(z, _B(z)) + _cv(beta, z)

    _compare(layer, ref, x)
    running = 0.1 * _mean(A(x), _B(x)).flatten()
    torch.testing.assert_close(layer.norm.running_mean, running)
    layer.eval()

    def ref_eval(x):
        z = A(x)
        return z - _cv(running, z) + _cv(beta, z)

    _compare(layer, ref_eval, x + 3)


@pytest.mark.parametrize("nonlinearity,gain", [("relu", 2.0), ("linear", 1.0)])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_scaled_weight_formula(kind: str, nonlinearity: str, gain: float) -> None:
    torch.manual_seed(0)
    affine = (nn.Linear(5, 7) if kind == "dense" else nn.Conv2d(5, 7, 3, padding=1)).to(DT)
    V = affine.weight.detach().clone()
    layer = norms.build("scaled-weight", affine, nonlinearity=nonlinearity)
    fan_in = 5 * (1 if kind == "dense" else 9)
    fan_out = 7 * (1 if kind == "dense" else 9)
    rows = torch.linalg.vector_norm(V.reshape(7, -1), dim=1).reshape(-1, *([1] * (V.dim() - 1)))
    W = math.sqrt(gain * fan_in / fan_out) * V / rows  # g = 1 at init
    torch.testing.assert_close(layer.affine.weight, W)
    assert torch.equal(layer.affine.bias, torch.zeros(7, dtype=DT))  # bias 0 at init
    g = layer.affine.parametrizations.weight.original0
    assert torch.equal(g, torch.ones_like(g))


def test_scaled_weight_preserves_input_norm_of_wide_relu_layer() -> None:
    """Arpit's lecture slides: E ||ReLU(sqrt(2 fan_in / fan_out) R u)||^2 = ||u||^2 for unit-norm rows R."""
    fan_in, fan_out, trials = 256, 1024, 40
    u = torch.randn(1, fan_in, generator=torch.Generator().manual_seed(1), dtype=DT)
    ratios = []
    for t in range(trials):
        torch.manual_seed(t)
        layer = norms.build("scaled-weight", nn.Linear(fan_in, fan_out).to(DT), nn.ReLU())
        v = layer(u)
        ratios.append((v.square().sum() / u.square().sum()).item())
    mean = sum(ratios) / trials
    assert mean == pytest.approx(1.0, abs=0.02)
    # plain weight norm with unit rows does not preserve it: fan_out / (2 fan_in) = 2
    torch.manual_seed(0)
    plain = nn.Linear(fan_in, fan_out).to(DT)
    with torch.no_grad():
        plain.weight /= plain.weight.norm(dim=1, keepdim=True)
        plain.bias.zero_()
    ratio = (torch.relu(plain(u)).square().sum() / u.square().sum()).item()
    assert ratio == pytest.approx(2.0, rel=0.15)


def _balanced_reference(W: torch.Tensor, v: torch.Tensor, r: float, single_pass: bool):
    """Defazio & Bottou 2018, sec. 4.1, index by index."""
    D, C = W.shape[:2]
    K = W[0, 0].numel()
    Wf = W.reshape(D, C, K)
    out = torch.empty_like(Wf)
    for d in range(D):
        num = sum(v[c] * Wf[d, c].sum() for c in range(C))
        b = -num / (K * v.sum())
        if single_pass:
            den = sum(
                v[c] * sum((Wf[d, c, j] + b) for j in range(K) if Wf[d, c, j] > 0) for c in range(C)
            )
        else:
            den = sum(
                v[c] * sum(torch.clamp(Wf[d, c, j] + b, min=0) for j in range(K)) for c in range(C)
            )
        out[d] = r / den * (Wf[d] + b)
    return out.reshape(W.shape)


@pytest.mark.parametrize("single_pass", [True, False])
@pytest.mark.parametrize("kind", ["dense", "conv", "strided"])
def test_balanced_weight_and_forward_against_reference(kind: str, single_pass: bool) -> None:
    torch.manual_seed(0)
    if kind == "dense":
        affine, x = nn.Linear(5, 6), torch.rand(8, 5, dtype=DT) + 0.1
    else:
        stride = 2 if kind == "strided" else 1
        affine, x = nn.Conv2d(5, 6, 3, stride=stride, padding=1), torch.rand(4, 5, 6, 6, dtype=DT)
    affine = affine.to(DT)
    layer = norms.build("balanced", affine, single_pass=single_pass)
    gamma, beta = _gamma_beta(layer.norm)
    W = layer.affine.weight.detach()
    if kind == "dense":
        v, r = x.sum(0), 8.0
    else:
        v = x.sum((0, 2, 3))
        h_out = 6 // stride
        r = 4.0 * h_out * h_out * stride**2

    def ref(x):
        vx = x.sum(0) if kind == "dense" else x.sum((0, 2, 3))
        Weff = _balanced_reference(W, vx, r, single_pass)
        if kind == "dense":
            z = x @ Weff.T
        else:
            z = torch.nn.functional.conv2d(x, Weff, stride=stride, padding=1)
        return z * _cv(gamma, z) + _cv(beta, z)

    torch.testing.assert_close(layer.effective_weight(x), _balanced_reference(W, v, r, single_pass))
    _compare(layer, ref, x)
    # eval mode: running per-example input sums (momentum 0.1 from an init of ones), updated
    # twice above (effective_weight and the forward pass in _compare); any eval batch size
    layer.eval()
    assert int(layer.norm.num_batches_tracked) == 2
    running = torch.ones(5, dtype=DT)
    for _ in range(2):
        running = 0.9 * running + 0.1 * v / x.shape[0]
    torch.testing.assert_close(layer.norm.running_input_sum, running)
    half = x[: x.shape[0] // 2]
    r_half = r / 2
    Weval = _balanced_reference(W, running * half.shape[0], r_half, single_pass)
    torch.testing.assert_close(layer.effective_weight(half), Weval)


def test_balanced_balances_positive_and_negative_contributions() -> None:
    """Defazio & Bottou 2018, figure 1: with positive inputs and cyclic padding, the positive and negative
    weights of each output channel contribute exactly +r and -r in total."""
    g = torch.Generator().manual_seed(0)
    N, C, D, H = 3, 4, 5, 6
    x = torch.rand(N, C, H, H, generator=g, dtype=DT) + 0.05
    conv = nn.Conv2d(C, D, 3, padding=1, padding_mode="circular", bias=False).to(DT)
    # magnitudes in [1, 1.2] with random signs: b_d is small, so no sign flips
    with torch.no_grad():
        mags = 1 + 0.2 * torch.rand(conv.weight.shape, generator=g, dtype=DT)
        signs = torch.randint(0, 2, conv.weight.shape, generator=g).to(DT) * 2 - 1
        conv.weight.copy_(mags * signs)
    r = N * H * H
    for single_pass in (True, False):
        layer = norms.build("balanced", conv, single_pass=single_pass, balance_signs=False)
        W = layer.effective_weight(x)
        assert torch.equal(torch.sign(W), torch.sign(conv.weight))
        pos = torch.nn.functional.conv2d(
            torch.nn.functional.pad(x, (1, 1, 1, 1), mode="circular"), W.clamp(min=0)
        ).sum((0, 2, 3))
        neg = torch.nn.functional.conv2d(
            torch.nn.functional.pad(x, (1, 1, 1, 1), mode="circular"), W.clamp(max=0)
        ).sum((0, 2, 3))
        torch.testing.assert_close(pos, torch.full((D,), float(r), dtype=DT))
        torch.testing.assert_close(neg, torch.full((D,), -float(r), dtype=DT))
        # and the layer's output has zero mean per channel, like BatchNorm
        out = layer.affine._conv_forward(x, W, None)
        torch.testing.assert_close(
            out.mean((0, 2, 3)), torch.zeros(D, dtype=DT), atol=1e-12, rtol=0
        )


def test_balanced_sign_init_leaves_no_single_signed_kernel() -> None:
    conv = nn.Conv2d(3, 8, 3)
    with torch.no_grad():
        conv.weight.abs_()  # every kernel all positive
    layer = norms.build("balanced", conv)
    k = layer.affine.weight.reshape(24, 9)
    assert ((k > 0).any(1) & (k < 0).any(1)).all()
    dense = nn.Linear(4, 3)
    with torch.no_grad():
        dense.weight.neg_().abs_().neg_()
    layer = norms.build("balanced", dense)
    w = layer.affine.weight
    assert ((w > 0).any(1) & (w < 0).any(1)).all()
