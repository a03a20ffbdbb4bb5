"""Normalizers that torch implements must match torch: forward, input gradient, running stats."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from normprobe import norms

torch.set_default_dtype(torch.float32)

SHAPES = {"dense": (16, 12), "conv": (6, 12, 5, 5)}


def _input(kind: str, seed: int = 0, shift: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(SHAPES[kind], generator=g) * 2 + shift).requires_grad_(True)


def _randomize_affine(*modules: nn.Module) -> None:
    """Give gamma/beta non-trivial, identical values so the affine part is tested too."""
    g = torch.Generator().manual_seed(123)
    w = torch.rand(12, generator=g) + 0.5
    b = torch.randn(12, generator=g)
    for m in modules:
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)


def _forward_and_grad(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    g = torch.Generator().manual_seed(7)
    (y * torch.randn(y.shape, generator=g)).sum().backward()
    return y.detach(), x.grad.detach()


def _assert_same(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    y1, g1 = _forward_and_grad(ours, x)
    y2, g2 = _forward_and_grad(ref, x)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_batch_matches_torch_batchnorm(kind: str) -> None:
    ours = norms.BatchNorm(12)
    ref = nn.BatchNorm1d(12) if kind == "dense" else nn.BatchNorm2d(12)
    _randomize_affine(ours, ref)
    for step in range(3):  # three training steps: running stats must follow exactly
        _assert_same(ours, ref, _input(kind, seed=step, shift=step))
        for m in (ours, ref):
            m.zero_grad()
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=0, atol=0)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    ours.eval(), ref.eval()
    _assert_same(ours, ref, _input(kind, seed=10))


def test_batch_state_dict_loads_from_torch_batchnorm() -> None:
    ref = nn.BatchNorm2d(12)
    ref(_input("conv"))
    ours = norms.BatchNorm(12)
    ours.load_state_dict(ref.state_dict())
    ours.eval(), ref.eval()
    x = _input("conv", seed=3)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layer_matches_groupnorm_one_group(kind: str, mode: str) -> None:
    ours, ref = norms.LayerNorm(12), nn.GroupNorm(1, 12)
    _randomize_affine(ours, ref)
    ours.train(mode == "train"), ref.train(mode == "train")
    _assert_same(ours, ref, _input(kind))


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("groups", [2, 3, 4])
def test_group_matches_torch_groupnorm(kind: str, groups: int) -> None:
    ours, ref = norms.GroupNorm(12, groups=groups), nn.GroupNorm(groups, 12)
    _randomize_affine(ours, ref)
    _assert_same(ours, ref, _input(kind))
    ours.eval(), ref.eval()
    _assert_same(ours, ref, _input(kind, seed=4))


def test_group_default_is_min_32_c_when_it_divides() -> None:
    conv = norms.build("group", nn.Conv2d(3, 64, 3))
    assert conv.norm.groups == 32
    conv = norms.build("group", nn.Conv2d(3, 16, 3))
    assert conv.norm.groups == 16
    # dense layers keep at least two channels per group
    dense = norms.build("group", nn.Linear(3, 16))
    assert dense.norm.groups == 8


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_instance_matches_torch_instancenorm(mode: str) -> None:
    ours, ref = norms.InstanceNorm(12), nn.InstanceNorm2d(12, affine=True)
    _randomize_affine(ours, ref)
    ours.train(mode == "train"), ref.train(mode == "train")
    _assert_same(ours, ref, _input("conv"))


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_weight_matches_torch_weight_norm(kind: str) -> None:
    def affine() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(12, 9) if kind == "dense" else nn.Conv2d(12, 9, 3, padding=1)

    ours = norms.build("weight", affine())
    ref = weight_norm(affine(), name="weight", dim=0)
    x = _input(kind)
    for mode in (True, False):
        ours.train(mode), ref.train(mode)
        y1, g1 = _forward_and_grad(ours, x)
        y2, g2 = _forward_and_grad(ref, x)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    p1 = dict(ours.affine.named_parameters())
    p2 = dict(ref.named_parameters())
    assert p1.keys() == p2.keys()
    for key in p1:
        torch.testing.assert_close(p1[key].grad, p2[key].grad, rtol=0, atol=0)
    # weight norm has no activation normalization and keeps the bias
    assert isinstance(ours.norm, nn.Identity) and ours.affine.bias is not None


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_batch_train_uses_eval_batch_statistics(kind: str) -> None:
    ours, ref = (
        norms.BatchTrainNorm(12),
        nn.BatchNorm2d(12) if kind == "conv" else nn.BatchNorm1d(12),
    )
    _randomize_affine(ours, ref)
    for step in range(3):
        _assert_same(ours, ref, _input(kind, seed=step, shift=step))
    ours.eval()
    ref.train()  # the reference: torch BN in train mode normalizes with batch statistics
    before = ours.running_mean.clone(), ours.running_var.clone(), ours.num_batches_tracked.clone()
    x = _input(kind, seed=11, shift=3.0)
    y_ours = ours(x)
    y_ref = ref(x)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-6)
    # eval mode never touches the running statistics
    for a, b in zip(before, (ours.running_mean, ours.running_var, ours.num_batches_tracked)):
        assert torch.equal(a, b)
    # and differs from BatchNorm's eval mode, which uses running statistics
    ref.eval()
    assert not torch.allclose(y_ours, ref(x), atol=1e-3)
