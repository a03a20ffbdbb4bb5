"""Microbatch ("ghost batch") statistics (norm_batch) and BalNorm's stat_fraction.

References: torch.nn.BatchNorm run on each microbatch separately, and, for the
other normalizers, the plain layer (norm_batch=None) applied group by group
from the same state; the running statistics must be the average over groups
of what each group's plain layer would have stored (a linear EMA from a
shared start makes that the mean of the references' buffers).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normprobe import norms
from normprobe.errors import NormalizerError
from normprobe.models.mlp import MLP
from normprobe.norms.balanced import balanced_weight

GHOST = ["batch", "batch-train", "bmlv", "lmbv", "batch-renorm", "weight-meanbn"]
PER_EXAMPLE = ["none", "layer", "group", "rms", "weight", "scaled-weight", "prelayer"]


def _affine(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    affine = nn.Linear(5, 6) if kind == "dense" else nn.Conv2d(3, 4, 3, padding=1)
    return affine.double()


def _input(kind: str, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 5) if kind == "dense" else (n, 3, 5, 5)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).requires_grad_()


def _build(name: str, kind: str, seed: int = 0, **options) -> nn.Module:
    layer = norms.build(name, _affine(kind, seed), layer_name="blk", **options).double()
    _randomize_state(layer)
    return layer


def _randomize_state(layer: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics, so the checks mean something."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in layer.norm.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (name == "weight"))
        for name, b in layer.norm.named_buffers():
            if name in ("running_mean",):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype))
            elif name in ("running_var", "running_std"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)
    if isinstance(layer.norm, norms.BatchRenorm):
        # well into the relaxed schedule, so r and d are not the identity
        layer.norm.total_steps.fill_(100)
        layer.norm.num_batches_tracked.fill_(60)


def _buffers(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.norm.named_buffers()}


def _plain_groupwise(layer: nn.Module, x: torch.Tensor, g: int, train: bool):
    """Each microbatch through its own copy of the plain layer (norm_batch None)."""
    outs, copies = [], []
    for xg in x.split(g):
        ref = copy.deepcopy(layer)
        ref.norm.norm_batch = None
        ref.train(train)
        outs.append(ref(xg))
        copies.append(ref)
    return torch.cat(outs), copies


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_batch_equals_torch_batchnorm_on_each_microbatch(kind: str) -> None:
    n, g = 12, 4
    layer = _build("batch", kind, norm_batch=g)
    x = _input(kind, n)
    z = layer.affine(x)
    start = _buffers(layer)
    out = layer.norm(z)
    torch_cls = nn.BatchNorm1d if kind == "dense" else nn.BatchNorm2d
    refs, ref_out = [], []
    for zg in z.split(g):
        bn = torch_cls(z.shape[1], dtype=torch.float64)
        bn.load_state_dict(
            {
                **{k: v for k, v in start.items()},
                "weight": layer.norm.weight.detach(),
                "bias": layer.norm.bias.detach(),
            }
        )
        ref_out.append(bn(zg))
        refs.append(bn)
    ref = torch.cat(ref_out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    up = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * up).sum(), x, retain_graph=True)
    (ref_grad,) = torch.autograd.grad((ref * up).sum(), x)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    # running stats: mean of group means, mean of the groups' unbiased variances
    for name in ("running_mean", "running_var"):
        expected = torch.stack([getattr(bn, name) for bn in refs]).mean(dim=0)
        torch.testing.assert_close(getattr(layer.norm, name), expected, rtol=1e-12, atol=1e-12)
    assert int(layer.norm.num_batches_tracked) == int(start["num_batches_tracked"]) + 1
    # eval mode is unchanged: running statistics, any batch size
    layer.eval()
    plain = copy.deepcopy(layer)
    plain.norm.norm_batch = None
    x5 = _input(kind, 5, seed=3)
    assert torch.equal(layer(x5), plain(x5))


@pytest.mark.parametrize("name", GHOST)
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_microbatches_equal_the_plain_layer_group_by_group(name: str, kind: str) -> None:
    n, g = 12, 3
    layer = _build(name, kind, norm_batch=g)
    x = _input(kind, n)
    out = layer(x)
    ref, copies = _plain_groupwise(_build(name, kind), x, g, train=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    if name != "batch-renorm":  # unclipped r, d make renorm (z - mu) / sigma whatever the group
        assert not torch.allclose(out, _build(name, kind)(x))  # microbatches change the result
    up = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * up).sum(), x, retain_graph=True)
    (ref_grad,) = torch.autograd.grad((ref * up).sum(), x)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-10)
    for key, value in layer.norm.named_buffers():
        if key == "num_batches_tracked":
            assert int(value) == int(copies[0].norm.num_batches_tracked)  # one step per forward
        elif key.startswith("running"):
            expected = torch.stack([dict(c.norm.named_buffers())[key] for c in copies]).mean(0)
            torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)


def test_batch_renorm_clips_r_and_d_per_group_against_the_shared_moving_stats() -> None:
    n, g = 8, 4
    layer = _build("batch-renorm", "dense", norm_batch=g)
    with torch.no_grad():
        x = _input("dense", n)
        x[g:] = x[g:] * 5 + 3  # the second group is far from the moving statistics
    z = layer.affine(x).detach()
    norm = layer.norm
    mu, sigma = norm.running_mean.clone(), norm.running_std.clone()
    r_max, d_max = norm.clip_limits()
    assert r_max > 1 and d_max > 0
    out = norm(z)
    expected = []
    for zg in z.split(g):
        var_b, mean_b = torch.var_mean(zg, dim=0, correction=0)
        sigma_b = torch.sqrt(var_b + norm.eps)
        r = (sigma_b / sigma).clamp(1 / r_max, r_max)
        d = ((mean_b - mu) / sigma).clamp(-d_max, d_max)
        expected.append(((zg - mean_b) / sigma_b * r + d) * norm.weight + norm.bias)
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-12, atol=1e-12)
    # r and d really are clipped for the far group
    var_b, mean_b = torch.var_mean(z[g:], dim=0, correction=0)
    assert ((mean_b - mu) / sigma).abs().max() > d_max or (var_b.sqrt() / sigma).max() > r_max


@pytest.mark.parametrize("name", ["batch-train"])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_batch_train_uses_microbatches_in_eval_mode_too(name: str, kind: str) -> None:
    layer = _build(name, kind, norm_batch=4).eval()
    x = _input(kind, 8)
    before = _buffers(layer)
    ref, _ = _plain_groupwise(_build(name, kind), x, 4, train=False)
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(before[k], v) for k, v in layer.norm.named_buffers())


@pytest.mark.parametrize("name", [*GHOST, "regnorm", "preregnorm", "balanced"])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_norm_batch_equal_to_the_batch_is_the_plain_layer_bit_for_bit(name: str, kind: str) -> None:
    n = 6
    ghost, plain = _build(name, kind, norm_batch=n), _build(name, kind)
    x = _input(kind, n)
    out, ref = ghost(x), plain(x)
    assert torch.equal(out, ref)
    up = torch.randn_like(out)
    assert torch.equal(*(torch.autograd.grad((o * up).sum(), x)[0] for o in (out, ref)))
    for (k, a), (_, b) in zip(ghost.norm.named_buffers(), plain.norm.named_buffers()):
        assert torch.equal(a, b), k
    if name in ("regnorm", "preregnorm"):
        assert torch.equal(ghost.norm.penalty, plain.norm.penalty)


@pytest.mark.parametrize("name", ["regnorm", "preregnorm"])
def test_regnorm_penalty_is_the_mean_of_the_group_penalties(name: str) -> None:
    layer = _build(name, "conv", norm_batch=2)
    x = _input("conv", 6)
    out = layer(x)
    ref, copies = _plain_groupwise(_build(name, "conv"), x, 2, train=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)  # the normalization is per example
    expected = torch.stack([c.norm.penalty for c in copies]).mean()
    torch.testing.assert_close(layer.norm.penalty, expected, rtol=1e-12, atol=1e-14)
    # eval mode: the whole batch, any size
    layer.eval()
    plain = _build(name, "conv").eval()
    x7 = _input("conv", 7)
    layer(x7), plain(x7)
    assert torch.equal(layer.norm.penalty, plain.norm.penalty)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_balanced_microbatches_equal_the_plain_layer_group_by_group(kind: str) -> None:
    x = (_input(kind, 8).detach().abs() + 0.1).requires_grad_()
    layer = _build("balanced", kind, norm_batch=4)
    out = layer(x)
    ref, copies = _plain_groupwise(_build("balanced", kind), x, 4, train=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, _build("balanced", kind)(x))
    up = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * up).sum(), x, retain_graph=True)
    (ref_grad,) = torch.autograd.grad((ref * up).sum(), x)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-10)
    expected = torch.stack([c.norm.running_input_sum for c in copies]).mean(0)
    torch.testing.assert_close(layer.norm.running_input_sum, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_balanced_stat_fraction_uses_only_the_first_examples(kind: str) -> None:
    n = 8
    layer = _build("balanced", kind, stat_fraction=0.25)
    x = _input(kind, n).detach().abs() + 0.1
    w1 = layer.effective_weight(x)
    sums1 = layer.norm.running_input_sum.clone()
    # the statistics are (N / k) times the sums of the first k = 2 examples
    v = x[:2].sum(dim=(0, *range(2, x.dim()))) * (n / 2)
    r = n * layer._outputs_per_example(x)
    torch.testing.assert_close(w1, balanced_weight(layer.affine.weight, v, r), rtol=1e-12, atol=0)
    # changing the other examples changes neither the weight nor the running sums
    layer2 = _build("balanced", kind, stat_fraction=0.25)
    x2 = x.clone()
    x2[2:] = x2[2:] * 3 + 1
    assert torch.equal(layer2.effective_weight(x2), w1)
    assert torch.equal(layer2.norm.running_input_sum, sums1)
    # ... but changing the first quarter does
    x3 = x.clone()
    x3[:2] *= 2
    assert not torch.equal(_build("balanced", kind, stat_fraction=0.25).effective_weight(x3), w1)
    # and the weight is applied to every example
    out = layer(x2)
    assert out.shape[0] == n and torch.isfinite(out).all()
    # the default fraction is the whole batch, bit for bit
    full, plain = _build("balanced", kind, stat_fraction=1.0), _build("balanced", kind)
    assert torch.equal(full(x), plain(x))


@pytest.mark.parametrize("bad", [0, 0.0, -0.25, 1.5, True, "half"])
def test_balanced_stat_fraction_outside_zero_one_is_an_error(bad) -> None:
    with pytest.raises(NormalizerError, match=r"stat_fraction.*\(0, 1\]"):
        norms.build("balanced", nn.Linear(4, 3), layer_name="blocks.2", stat_fraction=bad)


@pytest.mark.parametrize("name", [*GHOST, "regnorm", "balanced"])
def test_batch_not_a_multiple_of_norm_batch_names_the_layer_and_the_fix(name: str) -> None:
    layer = _build(name, "dense", norm_batch=4)
    with pytest.raises(NormalizerError, match=r"'blk.*norm_batch=4.*batch of 10.*multiple of 4"):
        layer(_input("dense", 10).detach().abs())


@pytest.mark.parametrize("bad", [1, 0, -4, 2.5, True, "4"])
@pytest.mark.parametrize("name", ["batch", "batch-renorm", "balanced", "layer"])
def test_norm_batch_below_two_or_not_an_int_is_an_error(name: str, bad) -> None:
    with pytest.raises(NormalizerError, match=r"layer 'blocks.1'.*norm_batch.*integer >= 2"):
        norms.build(name, nn.Linear(4, 3), layer_name="blocks.1", norm_batch=bad)


@pytest.mark.parametrize("name", ["batch", "bmlv", "lmbv", "batch-renorm", "weight-meanbn"])
def test_eval_mode_ignores_norm_batch(name: str) -> None:
    ghost, plain = _build(name, "dense", norm_batch=4).eval(), _build(name, "dense").eval()
    x = _input("dense", 7)
    assert torch.equal(ghost(x), plain(x))


@pytest.mark.parametrize("name", PER_EXAMPLE)
def test_normalizers_without_batch_statistics_drop_norm_batch(name: str) -> None:
    assert "norm_batch" not in norms.options(name)
    layer = _build(name, "conv", norm_batch=4)
    plain = _build(name, "conv")
    x = _input("conv", 6)  # not a multiple of 4: nothing is split
    assert torch.equal(layer(x), plain(x))


def test_every_batch_statistic_normalizer_takes_norm_batch() -> None:
    for name in norms.normalizers():
        if norms.spec(name).batch_stats:
            assert "norm_batch" in norms.options(name), name
    assert "stat_fraction" in norms.options("balanced")


def test_one_norm_options_serves_every_normalizer_of_an_mlp() -> None:
    x = torch.rand(8, 6) + 0.1
    for name in norms.normalizers():
        if name == "instance":
            continue  # conv only
        model = MLP(
            name, input_shape=6, num_classes=3, depth=2, width=8, norm_options={"norm_batch": 4}
        )
        assert model(x).shape == (8, 3), name


def test_balanced_on_an_all_zero_input_gives_zeros_not_nan() -> None:
    # one example per statistics group (norm_batch 4, quarter statistics) that a ReLU
    # zeroed entirely: every input sum is 0, and 0/0 used to give NaN
    layer = norms.build(
        "balanced", nn.Linear(6, 5), nn.ReLU(), layer_name="l", norm_batch=4, stat_fraction=0.25
    )
    layer.train()
    x = torch.rand(8, 6, generator=torch.Generator().manual_seed(0))
    x[:4] = 0.0  # the first microbatch's statistics example (and the rest) is all zeros
    x.requires_grad_(True)
    out = layer(x)
    assert torch.isfinite(out).all() and torch.equal(out[:4], torch.zeros(4, 5))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    assert torch.isfinite(x.grad).all()
    # away from zero the guard changes nothing
    w, v = torch.randn(5, 6), torch.rand(6) + 0.1
    assert torch.isfinite(balanced_weight(w, v, 8.0)).all()
    assert torch.isfinite(balanced_weight(w, torch.zeros(6), 8.0)).all()
