"""Probe values of a badly scaled network: exact where float32's own sums overflow, and said
where the model's numbers are not finite.

Reference values are computed in float64 from the float32 tensors the model produced (its
layer outputs and autograd's gradients), so they are the exact answers to the float32 network.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from normprobe.probes import gradient_correlation, gradient_norms, representation_correlation
from normprobe.probes.signal import mean_offdiagonal_cosine, pearson


def _scaled_net(first: float, second: float) -> nn.Sequential:
    """An MLP whose second and third weights are multiplied by ``first`` and ``second``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        net[2].weight.mul_(first)
        net[4].weight.mul_(second)
    return net


def _batches() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    x, x2 = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    return (x, torch.randint(0, 4, (64,), generator=g)), (
        x2,
        torch.randint(0, 4, (64,), generator=g),
    )


def _outputs(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    hooks = [net[i].register_forward_hook(lambda m, a, o: out.append(o.detach())) for i in (1, 3)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return out


def _corr64(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double().flatten(), b.double().flatten()]))[0, 1])


def _grads(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    loss = nn.functional.cross_entropy(net(batch[0]), batch[1])
    weights = [net[i].weight for i in (0, 2, 4)]
    biases = [net[i].bias for i in (0, 2, 4)]
    grads = torch.autograd.grad(loss, weights + biases)
    return {str(i): (gw, gb) for i, gw, gb in zip((0, 2, 4), grads[:3], grads[3:], strict=True)}


def test_representation_correlation_is_exact_where_float32_sums_overflow() -> None:
    net = _scaled_net(1e19, 1.0)  # layer 3's outputs near 1e19: finite, their squares' sum not
    (x, _), (x2, _) = _batches()
    (h1, h3), (g1, g3) = _outputs(net, x), _outputs(net, x2)
    assert torch.isfinite(h3).all() and not math.isfinite(float(h3.square().sum()))
    assert math.isnan(pearson(h3, g3).item())  # what the plain float32 reduction gives
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: the model's numbers are finite
        frame = representation_correlation(net, x, pairing="independent", x_other=x2)
    values = dict(zip(frame.layer, frame.value))
    assert values["3"] == pytest.approx(_corr64(h3, g3), rel=1e-12, abs=0)
    # the values that did not overflow keep the bits of the plain float32 reduction
    assert values["1"] == pearson(h1, g1).double().item()
    assert values["input"] == pearson(x, x2).double().item()

    within = representation_correlation(net, x, pairing="within")
    rows = h3.double().reshape(64, -1)
    unit = rows / rows.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    expected = float((cos.sum() - cos.diagonal().sum()) / (64 * 63))
    assert math.isnan(mean_offdiagonal_cosine(h3).item())  # float32's row norms overflow
    assert dict(zip(within.layer, within.value))["3"] == pytest.approx(expected, rel=1e-12)


def test_non_finite_representations_are_said_by_layer() -> None:
    net = _scaled_net(1e38, 1.0)
    (x, _), (x2, _) = _batches()
    x, x2 = 1e3 * x, 1e3 * x2  # layer 3's outputs overflow to inf in the model itself
    h1, h3 = _outputs(net, x)
    assert not torch.isfinite(h3).all()
    with pytest.warns(UserWarning, match=r"representation of layer 3 holds NaN or infinite") as w:
        frame = representation_correlation(net, x, pairing="independent", x_other=x2)
    assert {r.filename for r in w} == {__file__}
    values = dict(zip(frame.layer, frame.value))
    assert math.isnan(values["3"]) and math.isfinite(values["1"])
    with pytest.warns(UserWarning, match=r"representation of layer 3 holds"):
        representation_correlation(net, x)  # the noise pairing, too


def test_gradient_norms_and_correlation_are_exact_where_float32_sums_overflow() -> None:
    net = _scaled_net(
        1e19, 1e19
    )  # the first layer's gradient near 1e36: finite, its norm's sum not
    a, b = _batches()
    ga, gb = _grads(net, a), _grads(net, b)
    assert torch.isfinite(ga["0"][0]).all() and math.isinf(ga["0"][0].norm().item())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        norms = gradient_norms(net, nn.functional.cross_entropy, a)
        corr = gradient_correlation(net, nn.functional.cross_entropy, a, b)
    by = {(r.layer, r.metric): r.value for r in norms.itertuples()}
    exact = {k: float(w.double().norm()) for k, (w, _) in ga.items()}
    assert by["0", "grad_norm"] == pytest.approx(exact["0"], rel=1e-12, abs=0)
    assert by["0", "grad_norm_ratio"] == pytest.approx(exact["0"] / exact["4"], rel=1e-6, abs=0)
    for k in ("2", "4"):  # no overflow: the plain float32 norm, bit for bit
        assert by[k, "grad_norm"] == ga[k][0].norm().double().item()

    def flat(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.double().flatten() for t in pair])

    cos = {r.layer: r.value for r in corr.itertuples()}
    u, v = flat(ga["0"]), flat(gb["0"])
    assert cos["0"] == pytest.approx(float(u @ v / (u.norm() * v.norm())), rel=1e-12, abs=0)
    assert all(math.isfinite(c) for c in cos.values())


def test_non_finite_gradients_are_said_by_layer() -> None:
    net = _scaled_net(1e19, 1e25)  # logits overflow: the loss and the gradients are not finite
    a, b = _batches()
    with pytest.warns(UserWarning, match=r"gradient of layers 0, 2, 4 holds NaN or infinite") as w:
        frame = gradient_norms(net, nn.functional.cross_entropy, a)
    assert {r.filename for r in w} == {__file__}
    assert not frame.value.map(math.isfinite).any()
    with pytest.warns(UserWarning, match=r"gradient of layers .* holds NaN or infinite"):
        gradient_correlation(net, nn.functional.cross_entropy, a, b)
