"""The batch-mean probe against exact answers: RegNorm's own penalty and hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normprobe
from normprobe.norms import penalties
from normprobe.probes import ProbeError, batch_mean


def _mlp(norm: str, **options) -> nn.Module:
    return normprobe.build_model(
        "mlp", norm, seed=0, depth=4, width=16, input_shape=6, num_classes=3, norm_options=options
    )


def _x(n: int = 32) -> torch.Tensor:
    return torch.rand(n, 6, generator=torch.Generator().manual_seed(0)) * 2 + 0.5


@pytest.mark.parametrize("norm", ["regnorm", "preregnorm"])
@pytest.mark.parametrize("norm_batch", [None, 8])
def test_equals_the_penalty_regnorm_adds_to_the_loss(norm: str, norm_batch: int | None) -> None:
    model = _mlp(norm, **({"norm_batch": norm_batch} if norm_batch else {}))
    with torch.no_grad():  # a trained-looking affine: the probe must not see it
        for m in model.modules():
            if getattr(m, "is_normalizer", False):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
    x = _x()
    frame = batch_mean(model, x)
    model.train()
    model(x)
    expected = {name: float(p.detach()) for name, p in penalties(model).items()}
    assert dict(zip(frame["layer"], frame["value"])) == pytest.approx(expected, rel=1e-6)
    assert frame["depth"].tolist() == [1, 2, 3, 4] and set(frame["mode"]) == {"train"}


def test_layernorm_keeps_a_batch_mean_that_batch_norm_removes() -> None:
    x = _x()
    layer = batch_mean(_mlp("layer"), x)["value"]
    regnorm = batch_mean(_mlp("regnorm"), x)["value"]
    # the same normalization at init (torch fuses LayerNorm's affine: rounding differs)
    assert layer.tolist() == pytest.approx(regnorm.tolist(), rel=1e-5)
    assert layer.min() > 0.1
    assert batch_mean(_mlp("batch"), x)["value"].abs().max() < 1e-10


def test_eval_mode_uses_running_statistics() -> None:
    model = _mlp("batch")
    x = _x()
    model.train()
    with torch.no_grad():
        model(x * 3)  # running statistics of another distribution
    train = batch_mean(model, x)["value"]
    evaluated = batch_mean(model, x, mode="eval")
    assert train.abs().max() < 1e-10 and evaluated["value"].min() > 1e-4
    assert set(evaluated["mode"]) == {"eval"}


def test_torch_layernorm_on_sequences_by_hand() -> None:
    torch.manual_seed(0)
    norm = nn.LayerNorm(5)
    with torch.no_grad():
        norm.weight.fill_(3.0)
        norm.bias.fill_(-2.0)
    net = nn.Sequential(nn.Linear(4, 5), norm)
    x = torch.randn(6, 7, 4) + 1  # (N, T, D): channels are the last axis
    frame = batch_mean(net, x)
    z = net[0](x).detach()
    u = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, correction=0, keepdim=True) + 1e-5)
    expected = u.mean(dim=(0, 1)).square().mean()
    assert frame["layer"].tolist() == ["1"]
    assert frame["value"].iloc[0] == pytest.approx(expected.item(), rel=1e-5)


def test_a_reused_layer_gets_one_row_per_call_and_no_norm_layer_is_an_error() -> None:
    norm = nn.BatchNorm1d(4)
    lin = nn.Linear(4, 4)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.norm = lin, norm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.lin(self.norm(x)))

    frame = batch_mean(Twice(), torch.randn(8, 4))
    assert frame["layer"].tolist() == ["norm", "norm#2"] and frame["depth"].tolist() == [1, 2]
    with pytest.raises(ProbeError, match="no normalization layers"):
        batch_mean(nn.Sequential(nn.Linear(4, 2)), torch.randn(8, 4))
