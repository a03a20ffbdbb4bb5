"""Structural probes: batch dependence, train/eval gap and signal statistics, against exact answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normprobe
from normprobe.probes import ProbeError
from normprobe.probes.structure import (
    batch_dependence,
    relative_change,
    signal_statistics,
    train_eval_gap,
)

#: no statistics across the batch: the kept examples' outputs are bit-identical
BATCH_FREE = [
    "none",
    "layer",
    "group",
    "instance",
    "weight",
    "scaled-weight",
    "prelayer",
    "regnorm",
    "preregnorm",
    "rms",
]
#: statistics across the batch in train mode
BATCH_STATS = ["batch", "batch-train", "weight-meanbn", "bmlv", "lmbv", "batch-renorm", "balanced"]


def _wrn(norm: str) -> nn.Module:
    return normprobe.build_model(
        "wrn",
        norm,
        seed=0,
        depth=8,
        widen=1,
        base_channels=8,
        input_shape=(1, 8, 8),
        num_classes=10,
    )


def _batches(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.rand(n, 1, 8, 8, generator=g)


def test_the_zoo_is_split_into_the_two_lists() -> None:
    assert sorted(BATCH_FREE + BATCH_STATS) == sorted(normprobe.normalizers())


@pytest.mark.parametrize("norm", BATCH_FREE)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_dependence_is_exactly_zero_without_batch_statistics(norm: str, mode: str) -> None:
    x, other = _batches()
    frame = batch_dependence(_wrn(norm), x, other, mode=mode)
    assert len(frame) > 5 and frame["layer"].iloc[-1] == "output"
    assert (frame["value"] == 0.0).all(), frame[frame["value"] != 0]


@pytest.mark.parametrize("norm", BATCH_STATS)
def test_batch_dependence_is_positive_with_batch_statistics_in_train_mode(norm: str) -> None:
    x, other = _batches()
    frame = batch_dependence(_wrn(norm), x, other)
    assert (frame["value"] > 1e-4).all(), frame
    assert (frame["mode"] == "train").all()


@pytest.mark.parametrize("norm", [n for n in BATCH_STATS if n != "batch-train"])
def test_running_statistics_make_eval_mode_batch_free(norm: str) -> None:
    x, other = _batches()
    assert (batch_dependence(_wrn(norm), x, other, mode="eval")["value"] == 0.0).all()


def test_batch_train_uses_the_eval_batch_statistics_so_depends_on_the_batch_in_eval_mode() -> None:
    x, other = _batches()
    assert (batch_dependence(_wrn("batch-train"), x, other, mode="eval")["value"] > 1e-4).all()


def test_batch_dependence_equals_a_hand_computation_for_batchnorm() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x, other = torch.randn(10, 4), torch.randn(10, 4)
    frame = batch_dependence(net, x, other, keep=3)
    assert torch.equal(net[1].running_mean, torch.zeros(6))  # the probe never updated them
    mixed = torch.cat([x[:3], other[3:]])
    with torch.no_grad():
        h, h2 = net[:3](x)[:3].double(), net[:3](mixed)[:3].double()
        out, out2 = net(x)[:3].double(), net(mixed)[:3].double()
    assert frame["layer"].tolist() == ["2", "output"]
    expected = [float((h - h2).norm() / h.norm()), float((out - out2).norm() / out.norm())]
    assert frame["value"].tolist() == pytest.approx(expected, rel=1e-6)


def test_train_eval_gap_equals_a_hand_computation_and_is_zero_for_layernorm() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():  # some running statistics, as after training
        net(torch.randn(64, 4) * 2 + 1)
    x = torch.randn(12, 4)
    frame = train_eval_gap(net, x)
    with torch.no_grad():  # eval first: a train-mode pass would move the running statistics
        net.eval()
        evals = net(x).double()
        net.train()
        train = net(x).double()
    assert frame["layer"].iloc[-1] == "output" and (frame["mode"] == "train-eval").all()
    assert frame["value"].iloc[-1] == pytest.approx(
        float((train - evals).norm() / evals.norm()), rel=1e-6
    )
    net[1] = nn.LayerNorm(6)
    assert (train_eval_gap(net, x)["value"] == 0.0).all()


@pytest.mark.parametrize("norm", ["batch", "bmlv", "lmbv", "batch-renorm", "weight-meanbn"])
def test_train_eval_gap_is_positive_for_running_statistics(norm: str) -> None:
    x, _ = _batches()
    assert train_eval_gap(_wrn(norm), x)["value"].iloc[-1] > 1e-3


def test_signal_statistics_equal_the_moments_of_each_activation_input() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU())
    x = torch.randn(5, 2, 7, 7) + 0.5
    frame = signal_statistics(net, x)
    with torch.no_grad():
        z1 = net[0](x).double()
        z2 = net[2](net[1](net[0](x))).double()
    expected = []
    for z in (z1, z2):
        mean = z.mean(dim=(0, 2, 3))
        var = z.var(dim=(0, 2, 3), unbiased=False)
        expected += [float(mean.square().mean()), float(var.mean())]
    assert frame["layer"].tolist() == ["1", "1", "3", "3"]
    assert frame["metric"].tolist() == ["signal_sq_mean", "signal_var"] * 2
    assert frame["value"].tolist() == pytest.approx(expected, rel=1e-10)


def test_a_3d_input_has_its_channel_axis_given_never_guessed() -> None:
    """(N, T, D) in a transformer, (N, C, L) before a 1-D convolution: the same shape, other
    channels. Without channel_axis the probe refuses; with it, the moments are exact."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    x = torch.randn(8, 5, 4) + 0.3
    with pytest.raises(
        ProbeError, match=r"3-D input \(8, 5, 6\).*channel_axis=1 or channel_axis=-1"
    ):
        signal_statistics(seq, x)
    with torch.no_grad():
        z = seq[0](x).double()
    frame = signal_statistics(seq, x, channel_axis=-1)  # D: moments over N and T
    mean, var = z.mean(dim=(0, 1)), z.var(dim=(0, 1), unbiased=False)
    assert frame["value"].tolist() == pytest.approx(
        [float(mean.square().mean()), float(var.mean())], rel=1e-10
    )
    conv = nn.Sequential(nn.Conv1d(3, 2, 3), nn.ReLU())
    signal = torch.randn(8, 3, 10)
    with torch.no_grad():
        z = conv[0](signal).double()
    frame = signal_statistics(conv, signal, channel_axis=1)  # C: moments over N and L
    mean, var = z.mean(dim=(0, 2)), z.var(dim=(0, 2), unbiased=False)
    assert frame["value"].tolist() == pytest.approx(
        [float(mean.square().mean()), float(var.mean())], rel=1e-10
    )
    with pytest.raises(ProbeError, match="axis 0 is the batch"):
        signal_statistics(seq, x, channel_axis=0)
    with pytest.raises(ProbeError, match="axis 0 is the batch"):
        signal_statistics(seq, x, channel_axis=3)
    with pytest.raises(ProbeError, match="an integer"):
        signal_statistics(seq, x, channel_axis="last")


def test_batchnorm_pre_activations_are_centred_and_unit_scaled() -> None:
    x, _ = _batches(32)
    frame = signal_statistics(_wrn("batch"), x.flatten(1).reshape(32, 1, 8, 8))
    first = frame[frame["depth"] == 1].set_index("metric")["value"]
    assert first["signal_sq_mean"] < 1e-12 and first["signal_var"] == pytest.approx(1, abs=1e-3)


def test_relative_change() -> None:
    a = torch.tensor([1.0, 0.0])
    assert relative_change(a, a) == 0.0
    assert relative_change(a, torch.tensor([1.0, 1.0])) == 1.0
    assert relative_change(torch.zeros(2), torch.ones(2)) == float("inf")


def test_bad_input_says_what_is_wrong() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(8, 4)
    with pytest.raises(ProbeError, match="at least 2 examples"):
        batch_dependence(net, x[:1], x[:1])
    with pytest.raises(ProbeError, match="shape of x"):
        batch_dependence(net, x, torch.randn(6, 4))
    with pytest.raises(ProbeError, match="keep must be between 1 and 7"):
        batch_dependence(net, x, torch.randn(8, 4), keep=8)
    with pytest.raises(ProbeError, match="disjoint minibatch"):
        batch_dependence(net, x, x)
    with pytest.raises(ProbeError, match=r"\(N, C, \.\.\.\)"):
        signal_statistics(nn.Sequential(nn.Flatten(0), nn.ReLU()), x)
