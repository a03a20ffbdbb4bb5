"""``rms`` matches ``torch.nn.RMSNorm``: forward, input and gain gradients, dense, conv, sequence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normprobe import norms
from normprobe.errors import NormalizerError
from normprobe.models.swap import swap_norms

C = 12
SHAPES = {"dense": (16, C), "conv": (6, C, 5, 5), "sequence": (4, 7, C)}  # sequence: (N, T, D)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def _input(kind: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPES[kind], generator=g, dtype=dtype) * 2 + 0.5


def _pair(kind: str, dtype: torch.dtype, eps: float | None) -> tuple[nn.Module, nn.Module]:
    """Ours and torch's, with the same non-trivial gain (torch's repeated over (H, W) for conv)."""
    ours = norms.RMSNorm(C, eps=eps).to(dtype)
    shape = (C, 5, 5) if kind == "conv" else C
    ref = nn.RMSNorm(shape, eps=eps, dtype=dtype)
    gain = torch.rand(C, generator=torch.Generator().manual_seed(123), dtype=dtype) + 0.5
    with torch.no_grad():
        ours.weight.copy_(gain)
        ref.weight.copy_(gain.reshape(C, 1, 1).expand(C, 5, 5) if kind == "conv" else gain)
    return ours, ref


def _run(module: nn.Module, x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    if kind == "sequence" and isinstance(module, norms.RMSNorm):
        y = module(x.reshape(-1, C)).reshape(x.shape)  # per position: positions join the batch
    else:
        y = module(x)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    (y * weights).sum().backward()
    return y.detach(), x.grad.detach()


@pytest.mark.parametrize("kind", ["dense", "conv", "sequence"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("eps", [1e-5, None])
def test_rms_matches_torch_rmsnorm(
    kind: str, dtype: torch.dtype, mode: str, eps: float | None
) -> None:
    ours, ref = _pair(kind, dtype, eps)
    ours.train(mode == "train"), ref.train(mode == "train")
    x = _input(kind, dtype)
    y1, g1 = _run(ours, x, kind)
    y2, g2 = _run(ref, x, kind)
    assert y1.dtype == dtype
    torch.testing.assert_close(y1, y2, **TOL[dtype])
    torch.testing.assert_close(g1, g2, **TOL[dtype])
    ref_gain_grad = ref.weight.grad.sum(dim=(1, 2)) if kind == "conv" else ref.weight.grad
    torch.testing.assert_close(ours.weight.grad, ref_gain_grad, **TOL[dtype])


def test_eps_none_is_torch_default_machine_epsilon() -> None:
    # tiny inputs, where eps dominates mean(z^2): 1e-5 and the machine epsilon differ clearly
    x = torch.full((2, C), 1e-4, dtype=torch.float64)
    ref = nn.RMSNorm(C, dtype=torch.float64)  # eps=None: torch.finfo(float64).eps
    torch.testing.assert_close(norms.RMSNorm(C, eps=None).double()(x), ref(x))
    assert not torch.allclose(norms.RMSNorm(C).double()(x), ref(x))
    assert norms.RMSNorm(C).eps == 1e-5  # the eps of docs/definitions.md, as every other normalizer


def test_rms_divides_by_the_root_mean_square_without_centring() -> None:
    z = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=torch.float64)
    norm = norms.RMSNorm(4, eps=0.0).double()
    torch.testing.assert_close(norm(z), z / (50.0 / 4) ** 0.5)
    # scale invariant, not shift invariant (layer norm is both)
    torch.testing.assert_close(norm(3.0 * z), norm(z))
    assert not torch.allclose(norm(z + 1.0), norm(z))
    assert norm.bias is None and [n for n, _ in norm.named_parameters()] == ["weight"]


def test_conv_mean_is_over_channels_and_space() -> None:
    z = torch.randn(3, 4, 2, 5, dtype=torch.float64)
    out = norms.RMSNorm(4, eps=0.0).double()(z)
    expected = z / z.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
    torch.testing.assert_close(out, expected)


def test_built_layer_keeps_the_affine_bias_and_equals_linear_then_torch_rmsnorm() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(5, C)
    reference = nn.Sequential(nn.Linear(5, C), nn.RMSNorm(C, eps=1e-5), nn.ReLU())
    reference[0].load_state_dict(linear.state_dict())
    layer = norms.build("rms", linear, nn.ReLU(), layer_name="blocks.0")
    assert layer.affine.bias is not None  # rms neither centres nor shifts: the bias matters
    x = torch.randn(8, 5)
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-6)
    assert norms.spec("RMSNorm").name == "rms"
    assert norms.options("rms") == ["eps"]


def test_rms_options_and_shapes_fail_clearly() -> None:
    with pytest.raises(NormalizerError, match=r"eps must be a number in \[0, 1\) or None"):
        norms.RMSNorm(C, eps=-1.0)
    with pytest.raises(NormalizerError, match="no option 'groups'"):
        norms.build("rms", nn.Linear(3, C), groups=2)
    with pytest.raises(NormalizerError, match=r"expects input of shape \(N, 12, \.\.\.\)"):
        norms.RMSNorm(C)(torch.randn(4, 7, C))  # a sequence goes in as (N * T, D)


def test_rms_swaps_into_a_user_model() -> None:
    net = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU())
    assert swap_norms(net, "rms") == ["1"]
    assert isinstance(net[1], norms.RMSNorm)
    assert net(torch.randn(2, 3, 6, 6)).shape == (2, C, 4, 4)


def test_a_torch_rmsnorm_in_a_user_model_can_be_swapped_and_probed() -> None:
    from normprobe.probes import batch_mean

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, C), nn.RMSNorm(C), nn.ReLU(), nn.Linear(C, 3))
    x = torch.randn(8, 5)
    frame = batch_mean(net, x)  # channels of a torch RMSNorm are its normalized_shape axes
    assert frame["layer"].tolist() == ["1"]
    assert swap_norms(net, "layer") == ["1"]
    assert net(x).shape == (8, 3)
    seq = nn.Sequential(nn.Linear(5, C), nn.RMSNorm(C))
    swap_norms(seq, "rms")  # a sequence (N, T, D) is normalized per token
    x = torch.randn(2, 4, 5)
    expected = nn.RMSNorm(C, eps=1e-5)(seq[0](x))
    torch.testing.assert_close(seq(x), expected)
    batch = nn.Sequential(nn.Linear(5, C), nn.RMSNorm(C))
    swap_norms(batch, "batch")  # statistics over the batch: (N, D) only
    with pytest.raises(NormalizerError, match="was a RMSNorm over the last axis"):
        batch(torch.randn(2, 4, 5))
