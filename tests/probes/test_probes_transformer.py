"""Every probe on a tiny transformer language model: (N, T, D) representations, per-token losses."""

from __future__ import annotations

import pytest
import torch

import normprobe
from normprobe.probes import (
    ProbeError,
    batch_mean,
    gradient_correlation,
    gradient_norms,
    representation_correlation,
)
from normprobe.probes.capture import Probe
from normprobe.probes.signal import pearson
from normprobe.training import loss_for

K, T = 16, 6


def _model(norm: str = "layer", placement: str = "pre"):
    return normprobe.build_model(
        "transformer",
        norm,
        seed=0,
        num_classes=K,
        context=T,
        depth=2,
        width=8,
        heads=2,
        mlp_ratio=2,
        placement=placement,
    )


def _batches():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, K, (2, 5, T + 1), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def test_representation_correlation_flattens_the_whole_minibatch() -> None:
    model = _model()
    (x, _), (x_other, _) = _batches()
    frame = representation_correlation(model, x, pairing="independent", x_other=x_other)
    assert frame["layer"].tolist() == ["input", "blocks.0.mlp.act", "blocks.1.mlp.act"]
    assert frame["shape"].tolist() == [str(T), f"{T}x16", f"{T}x16"]  # (T,) tokens, (T, 2D)
    # docs/definitions.md: pearson of vec h(X) and vec h(X'), the N x T x features entries all at once
    with Probe(model, layers=["blocks.1.mlp.act"]) as p, torch.no_grad():
        model(x)
        a = p.activations["blocks.1.mlp.act"]
        model(x_other)
        b = p.activations["blocks.1.mlp.act"]
    assert a.shape == (5, T, 16)
    assert frame["value"].iloc[-1] == pytest.approx(pearson(a, b).item(), rel=1e-6)
    # the residual stream after each block, by name
    stream = representation_correlation(
        model, x, pairing="independent", x_other=x_other, layers=r"blocks\.\d+"
    )
    assert stream["layer"].tolist() == ["input", "blocks.0", "blocks.1"]
    within = representation_correlation(model, x, pairing="within")
    assert len(within) == 3 and within["value"].between(-1, 1).all()
    with pytest.raises(ProbeError, match=r"floating-point inputs.*pairing='independent'"):
        representation_correlation(model, x)


def test_gradient_probes_find_every_affine_op_in_execution_order() -> None:
    model = _model("prelayer")
    a, b = _batches()
    loss_fn = loss_for(model)
    norms_frame = gradient_norms(model, loss_fn, a)
    ops = ("attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2")
    order = [f"blocks.{i}.{op}.affine" for i in range(2) for op in ops]
    layers = norms_frame[norms_frame["metric"] == "grad_norm"]["layer"].tolist()
    assert layers == [*order, "head.affine"]
    # the head's gradient norm equals a hand computation with the mean token cross-entropy
    x, y = a
    model.zero_grad()
    loss_fn(model(x), y).backward()
    head = norms_frame[(norms_frame["metric"] == "grad_norm") & (norms_frame["depth"] == 9)]
    assert head["value"].item() == pytest.approx(model.head.affine.weight.grad.norm().item())
    corr = gradient_correlation(model, loss_fn, a, b)
    assert corr["layer"].tolist() == layers and corr["value"].between(-1, 1).all()


def test_batch_mean_probe_sees_every_token_of_each_normalizer() -> None:
    model = _model("regnorm")
    x, _ = _batches()[0]
    frame = batch_mean(model, x)
    assert set(frame["layer"]) == {
        "blocks.0.norm1",
        "blocks.0.norm2",
        "blocks.1.norm1",
        "blocks.1.norm2",
        "norm_f",
    }
