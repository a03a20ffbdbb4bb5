"""Gradient correlation, gradient norms and growth rate against hand computations."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normprobe
from normprobe.probes import (
    Probe,
    ProbeError,
    gradient_correlation,
    gradient_norms,
    gradient_statistics,
    growth_rate,
)


def _tiny() -> tuple[nn.Module, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (4,), (2, 4), (2,)]
    w1, b1, w2, b2 = (torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p, v in zip(net.parameters(), (w1, b1, w2, b2)):
            p.copy_(v)
    return net, [w1, b1, w2, b2]


def _hand_gradients(
    weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor]:
    """d mean cross-entropy / d (W1, b1, W2, b2) of relu(x W1^T + b1) W2^T + b2, by the chain rule."""
    w1, b1, w2, b2 = weights
    z1 = x @ w1.T + b1
    h1 = torch.relu(z1)
    out = h1 @ w2.T + b2
    d_out = (torch.softmax(out, dim=1) - F.one_hot(y, 2).double()) / x.shape[0]
    d_z1 = (d_out @ w2) * (z1 > 0)
    return [d_z1.T @ x, d_z1.sum(0), d_out.T @ h1, d_out.sum(0)]


def _batch(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 2, (n,), generator=g
    )


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


def test_gradient_norms_match_a_hand_computation() -> None:
    net, weights = _tiny()
    x, y = _batch(1)
    dw1, _, dw2, _ = _hand_gradients(weights, x, y)
    frame = gradient_norms(net, F.cross_entropy, (x, y))
    norms = frame[frame.metric == "grad_norm"]
    ratios = frame[frame.metric == "grad_norm_ratio"]
    assert norms.layer.tolist() == ["0", "2"] and norms.depth.tolist() == [1, 2]
    assert norms.value.tolist() == pytest.approx([float(dw1.norm()), float(dw2.norm())], abs=1e-12)
    assert ratios.value.tolist() == pytest.approx([float(dw1.norm() / dw2.norm()), 1.0], abs=1e-12)
    assert frame.columns[:4].tolist() == ["layer", "depth", "metric", "value"]
    assert frame["shape"].tolist() == ["4x3", "4x3", "2x4", "2x4"]
    assert all(p.grad is None for p in net.parameters())


def test_gradient_correlation_matches_a_hand_computation() -> None:
    net, weights = _tiny()
    (xa, ya), (xb, yb) = _batch(1), _batch(2)
    ga, gb = _hand_gradients(weights, xa, ya), _hand_gradients(weights, xb, yb)
    expected = [
        _cos(torch.cat([ga[0].flatten(), ga[1]]), torch.cat([gb[0].flatten(), gb[1]])),
        _cos(torch.cat([ga[2].flatten(), ga[3]]), torch.cat([gb[2].flatten(), gb[3]])),
    ]
    frame = gradient_correlation(net, F.cross_entropy, (xa, ya), (xb, yb))
    assert frame.layer.tolist() == ["0", "2"] and set(frame.metric) == {"grad_corr"}
    assert frame.value.tolist() == pytest.approx(expected, abs=1e-12)
    same = gradient_correlation(net, F.cross_entropy, (xa, ya), (xa, ya))
    assert same.value.tolist() == pytest.approx([1.0, 1.0])


def test_weight_norm_layers_report_the_gradient_of_the_effective_weight() -> None:
    net, weights = _tiny()
    net[0] = nn.utils.parametrizations.weight_norm(net[0])  # same effective W1
    x, y = _batch(1)
    dw1 = _hand_gradients(weights, x, y)[0]
    frame = gradient_norms(net, F.cross_entropy, (x, y))
    assert frame.module_type.tolist()[0] == "ParametrizedLinear"
    assert frame.value.iloc[0] == pytest.approx(float(dw1.norm()), abs=1e-12)


def test_balanced_layers_report_the_gradient_of_the_balanced_weight() -> None:
    model = normprobe.build_model("mlp", "balanced", seed=0, depth=2, width=8, input_shape=5)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 5, generator=g) + 0.1, torch.randint(0, 10, (16,), generator=g)
    # reference: dL/dW'' = dL/dz^T x for z = x W''^T, from hooks on a copy of the model
    ref = copy.deepcopy(model)
    seen: dict[str, torch.Tensor] = {}
    ref.blocks[1].affine.register_forward_hook(lambda m, a, z: seen.update(x=a[0], z=z))
    z_loss = F.cross_entropy(ref(x), y)
    dz, raw = torch.autograd.grad(z_loss, [seen["z"], ref.blocks[1].affine.weight])
    expected = (dz.T @ seen["x"]).detach()
    frame = gradient_norms(model, F.cross_entropy, (x, y))
    got = frame.query("layer == 'blocks.1.affine' and metric == 'grad_norm'").value.item()
    assert got == pytest.approx(float(expected.norm()), rel=1e-5)
    # ... which is not the gradient of the raw parameter the balanced weight is made from
    assert not math.isclose(float(raw.norm()), got, rel_tol=1e-3)


def test_a_reused_module_is_one_row_whose_gradient_sums_its_uses() -> None:
    torch.manual_seed(0)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 4)
            self.shared = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
            return self.head(torch.tanh(self.shared(h)))

    model = Shared()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    (expected,) = torch.autograd.grad(F.cross_entropy(model(x), y), [model.shared.weight])
    frame = gradient_norms(model, F.cross_entropy, (x, y))
    norms = frame[frame.metric == "grad_norm"]
    assert norms.layer.tolist() == ["inp", "shared", "head"]
    assert norms.depth.tolist() == [1, 2, 3] and norms.calls.tolist() == [1, 2, 1]
    assert norms.value.iloc[1] == pytest.approx(float(expected.norm()), rel=1e-6)


def test_growth_rate_sign_convention() -> None:
    exploding = pd.DataFrame(
        {"depth": [1, 2, 3, 4], "metric": "grad_norm", "value": [8.0, 4, 2, 1]}
    )
    vanishing = exploding.assign(value=[1.0, 2, 4, 8])
    assert growth_rate(exploding) == pytest.approx(2.0)  # largest gradients at the input: > 1
    assert growth_rate(vanishing) == pytest.approx(0.5)
    noisy = exploding.assign(value=[8.0, 5, 2, 1])
    slope = torch.linalg.lstsq(
        torch.tensor([[1.0, d] for d in range(1, 5)], dtype=torch.float64),
        torch.tensor([8.0, 5, 2, 1], dtype=torch.float64).log()[:, None],
    ).solution[1, 0]
    assert growth_rate(noisy) == pytest.approx(math.exp(-float(slope)))


def test_batchnorm_gradients_explode_towards_the_input_and_layernorm_ones_do_not() -> None:
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    rates = {}
    for norm in ("batch", "layer"):
        model = normprobe.build_model("mlp", norm, seed=0, depth=8, width=64, input_shape=16)
        rates[norm] = growth_rate(gradient_norms(model, F.cross_entropy, (x, y)))
    assert rates["batch"] > 1.05 and rates["layer"] < 1.0, rates


def test_growth_rate_errors() -> None:
    with pytest.raises(ProbeError, match="no rows with metric 'grad_norm'"):
        growth_rate(pd.DataFrame({"depth": [1], "metric": ["grad_corr"], "value": [1.0]}))
    with pytest.raises(ProbeError, match="missing"):
        growth_rate(pd.DataFrame({"depth": [1]}))
    two = pd.DataFrame({"depth": [1, 2, 1, 2], "metric": "grad_norm", "value": [1.0, 2, 3, 4]})
    with pytest.raises(ProbeError, match="groupby"):
        growth_rate(two)
    with pytest.raises(ProbeError, match="finite positive"):
        growth_rate(two.iloc[:2].assign(value=[0.0, 1.0]))


def test_gradient_probe_errors() -> None:
    net, _ = _tiny()
    x, y = _batch(1)
    with pytest.raises(ProbeError, match=r"loss_fn must return the mean loss as a scalar.*\(8,\)"):
        gradient_norms(net, lambda o, t: F.cross_entropy(o, t, reduction="none"), (x, y))
    with pytest.raises(ProbeError, match="does not depend on the model"):
        gradient_norms(net, lambda o, t: F.cross_entropy(o, t).detach(), (x, y))
    with pytest.raises(ProbeError, match=r"\(inputs, targets\) pair"):
        gradient_norms(net, F.cross_entropy, x)  # type: ignore[arg-type]
    with pytest.raises(ProbeError, match="has no weight tensor"):
        gradient_norms(net, F.cross_entropy, (x, y), layers=["1"])


def test_frozen_parameters_still_get_probed_and_stay_frozen() -> None:
    net, weights = _tiny()
    net.requires_grad_(False)
    x, y = _batch(1)
    frame = gradient_norms(net, F.cross_entropy, (x, y))
    assert frame.value.iloc[0] == pytest.approx(float(_hand_gradients(weights, x, y)[0].norm()))
    assert not any(p.requires_grad for p in net.parameters())


def test_probe_exposes_the_applied_weights_for_new_gradient_probes() -> None:
    net, _ = _tiny()
    net[0] = nn.utils.parametrizations.weight_norm(net[0])
    x, y = _batch(1)
    with Probe(net, capture="weights") as p:
        loss = F.cross_entropy(net(x), y)
        w = p.weights["0"]["weight"]
        (grad,) = torch.autograd.grad(loss, [w])
    assert w.grad_fn is not None and grad.shape == (4, 3)
    with pytest.raises(ProbeError, match="capture='outputs'"):
        _ = p.activations


@pytest.mark.parametrize("norm", ["batch", "weight"])
def test_gradient_statistics_equal_the_two_separate_probes(norm: str) -> None:
    ds = normprobe.load_dataset("digits")
    model = normprobe.build_model("mlp", norm, seed=0, depth=3, width=16, input_shape=64)
    a = ds.train.x[:32], ds.train.y[:32]
    b = ds.train.x[32:64], ds.train.y[32:64]
    both = gradient_statistics(model, F.cross_entropy, a, b)
    corr = gradient_correlation(model, F.cross_entropy, a, b)
    norms = gradient_norms(model, F.cross_entropy, a)
    pd.testing.assert_frame_equal(
        both.reset_index(drop=True), pd.concat([corr, norms], ignore_index=True)
    )


class _FrozenFeatures(nn.Module):
    """A feature layer run under torch.no_grad (a frozen extractor), then a trained head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = torch.relu(self.features(x))
        return self.head(h)


def test_a_layer_run_with_autograd_off_gets_no_zero_gradient_row() -> None:
    """Autograd gives such a layer no gradient at all: a zero would be a wrong value, so the
    probes leave it out and say why; named explicitly, it is refused."""
    model = _FrozenFeatures().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,))
    other = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,))
    norms = gradient_norms(model, F.cross_entropy, (x, y))
    assert norms["layer"].unique().tolist() == ["head"]
    rule = norms["layer_rule"].iloc[0]
    assert rule.endswith(
        "ran with autograd off (torch.no_grad or a reentrant checkpoint) (no gradient row): "
        "features"
    )
    h = torch.relu(model.features(x)).detach()
    loss = F.cross_entropy(model.head(h), y)
    expected = torch.autograd.grad(loss, model.head.weight)[0].norm()
    assert norms.query("metric == 'grad_norm'")["value"].item() == pytest.approx(float(expected))
    corr = gradient_correlation(model, F.cross_entropy, (x, y), other)
    assert corr["layer"].tolist() == ["head"]
    with pytest.raises(ProbeError, match=r"'features'.* ran with autograd off .*leave them out"):
        gradient_norms(model, F.cross_entropy, (x, y), layers=["features", "head"])
    hessian = normprobe.hessian
    with pytest.raises(hessian.HessianError, match=r"runs features with autograd off"):
        hessian.HessianOperator(model, F.cross_entropy, (x, y)).matvec(torch.ones(26))
    op = hessian.HessianOperator(model, F.cross_entropy, (x, y), params="head")
    assert op.dim == 10 and op.matvec(torch.ones(10, dtype=torch.float64)).abs().sum() > 0


class _AuxHead(nn.Module):
    """A body, the head the loss uses and an auxiliary head it never uses (returned second, run
    last). ``joined``: the aux head's output is added to the logits when the batch's first input
    is positive, so the loss reaches it on some batches only."""

    def __init__(self, joined: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.aux = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 5)
        self.joined = joined

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.body(x))
        logits, aux = self.head(h), self.aux(h)
        if self.joined and x[0, 0] > 0:
            logits = logits + aux[:, :2]
        return logits, aux


def _aux_batches() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Two batches, the first with a positive first input, the second with a negative one."""
    a, b = _batch(1), _batch(2)
    a[0][0, 0], b[0][0, 0] = 1.0, -1.0
    return a, b


def _param_grads(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], names: list[str]
) -> list[torch.Tensor]:
    """Plain torch: each named layer's gradient of the loss on ``model(x)[0]``, weight then bias."""
    loss = F.cross_entropy(model(batch[0])[0], batch[1])
    modules = [model.get_submodule(n) for n in names]
    grads = torch.autograd.grad(loss, [p for m in modules for p in (m.weight, m.bias)])
    return [torch.cat([w.reshape(-1), b]) for w, b in zip(grads[::2], grads[1::2])]


def test_a_layer_the_loss_has_no_gradient_path_to_gets_no_zero_row() -> None:
    """An aux head the loss never uses (output=0) used to get grad_norm 0.0 and, run last, be
    the layer every grad_norm_ratio divides by (all inf, its own NaN, its grad_corr NaN); autograd
    gives it no gradient at all, so it gets no row, as a layer run with autograd off, and the
    layer rule says why."""
    model = _AuxHead().double()
    a, b = _aux_batches()
    norms = gradient_norms(model, F.cross_entropy, a, output=0)
    assert norms["layer"].unique().tolist() == ["body", "head"]
    assert norms["depth"].unique().tolist() == [1, 2]
    rule = norms["layer_rule"].iloc[0]
    assert rule.endswith("; no gradient path from the loss (no row): aux")
    loss = F.cross_entropy(model(a[0])[0], a[1])
    grads = torch.autograd.grad(loss, [model.body.weight, model.head.weight])
    expected = torch.stack([g.norm() for g in grads])
    ratios = norms.query("metric == 'grad_norm_ratio'")["value"].tolist()
    assert all(math.isfinite(r) for r in ratios)
    assert ratios == pytest.approx((expected / expected[-1]).tolist(), rel=1e-12)
    values = norms.query("metric == 'grad_norm'")["value"].tolist()
    assert values == pytest.approx(expected.tolist(), rel=1e-12)

    corr = gradient_correlation(model, F.cross_entropy, a, b, output=0)
    assert corr["layer"].tolist() == ["body", "head"] and corr["depth"].tolist() == [1, 2]
    assert (corr["layer_rule"] == rule).all()
    pairs = zip(_param_grads(model, a, ["body", "head"]), _param_grads(model, b, ["body", "head"]))
    assert corr["value"].tolist() == pytest.approx([_cos(p, q) for p, q in pairs], rel=1e-12)
    both = gradient_statistics(model, F.cross_entropy, a, b, output=0)
    pd.testing.assert_frame_equal(
        both.reset_index(drop=True), pd.concat([corr, norms], ignore_index=True)
    )

    # the aux head as the prediction: the loss reaches it and not the head; depths skip the head
    aux = gradient_norms(model, F.cross_entropy, (a[0], a[1] + 2), output=1)
    assert aux["layer"].unique().tolist() == ["body", "aux"]
    assert aux["depth"].unique().tolist() == [1, 2]
    assert aux["layer_rule"].iloc[0].endswith("; no gradient path from the loss (no row): head")


def test_a_named_layer_the_loss_has_no_gradient_path_to_is_refused() -> None:
    model = _AuxHead().double()
    a, b = _aux_batches()
    refused = r"'aux'.* no gradient path from the loss.*leave (it|them) out of layers"
    with pytest.raises(ProbeError, match=refused):
        gradient_norms(model, F.cross_entropy, a, layers=["body", "aux"], output=0)
    with pytest.raises(ProbeError, match=refused):
        gradient_correlation(model, F.cross_entropy, a, b, layers=["aux", "head"], output=0)
    nothing = r"no gradient path from the loss to any selected layer \(aux\)"
    with pytest.raises(ProbeError, match=nothing):
        gradient_norms(model, F.cross_entropy, a, layers=r"aux", output=0)
    with pytest.raises(ProbeError, match=nothing):
        gradient_statistics(model, F.cross_entropy, a, b, layers=r"a.x", output=0)


class _DeadBranch(nn.Module):
    """A layer whose ReLU is dead (bias -100) on a branch beside the body's output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.dead, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        with torch.no_grad():
            self.dead.bias.fill_(-100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        return self.head(h + torch.relu(self.dead(h)))


def test_a_dead_relu_layer_keeps_its_zero_gradient_row() -> None:
    """A dead layer is in the loss's graph (autograd gives it a zero gradient, not none): its
    zero is a true value and stays."""
    model = _DeadBranch().double()
    a, b = _aux_batches()
    norms = gradient_norms(model, F.cross_entropy, a)
    assert norms["layer"].unique().tolist() == ["body", "dead", "head"]
    assert norms["depth"].unique().tolist() == [1, 2, 3]
    assert "no gradient path" not in norms["layer_rule"].iloc[0]
    values = norms.query("metric == 'grad_norm'")["value"].tolist()
    ratios = norms.query("metric == 'grad_norm_ratio'")["value"].tolist()
    assert values[1] == 0.0 and values[0] > 0 and values[2] > 0
    assert ratios[1] == 0.0 and ratios[2] == 1.0
    corr = gradient_correlation(model, F.cross_entropy, a, b)
    assert corr["layer"].tolist() == ["body", "dead", "head"]


def test_the_two_batch_probes_leave_out_a_layer_either_batch_does_not_reach() -> None:
    """grad_corr pairs the two batches' layers: a layer the loss reaches on one batch only is
    left out of both (and stated once), with depths counted without it."""
    model = _AuxHead(joined=True).double()
    a, b = _aux_batches()  # the loss reaches the aux head on a, not on b
    assert gradient_norms(model, F.cross_entropy, a, output=0)["layer"].unique().tolist() == [
        "body",
        "head",
        "aux",
    ]
    named = gradient_correlation(model, F.cross_entropy, a, b, layers=["body", "head"], output=0)
    for first, second in [(a, b), (b, a)]:
        corr = gradient_correlation(model, F.cross_entropy, first, second, output=0)
        assert corr["layer"].tolist() == ["body", "head"] and corr["depth"].tolist() == [1, 2]
        rule = corr["layer_rule"].iloc[0]
        assert rule.endswith("; no gradient path from the loss (no row): aux")
        assert rule.count("aux") == 1
        if first is a:
            pd.testing.assert_frame_equal(
                corr.drop(columns="layer_rule"), named.drop(columns="layer_rule")
            )
        both = gradient_statistics(model, F.cross_entropy, first, second, output=0)
        assert both["layer"].unique().tolist() == ["body", "head"]
        assert both["value"].map(math.isfinite).all()
        assert (both["layer_rule"] == rule).all()
    with pytest.raises(ProbeError, match=r"no gradient path from the loss to any selected layer"):
        gradient_correlation(model, F.cross_entropy, a, b, layers=r"aux", output=0)


class _Bag(nn.Module):
    """Token ids -> an embedding (dense or sparse gradients), a bag of them, a Linear head."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8, sparse=sparse)
        self.bag = nn.EmbeddingBag(20, 8, mode="mean", sparse=sparse)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids).mean(1) + self.bag(ids)))


def test_embeddings_with_sparse_gradients_measure_as_dense_ones() -> None:
    """sparse=True used to end in torch's NotImplementedError (no norm of a sparse tensor) and
    "reshape is not implemented for sparse tensors" (Hessian); it changes how the gradient is
    stored, not its values, so every measurement equals the dense model's, bit for bit."""
    g = torch.Generator().manual_seed(1)
    a = (torch.randint(0, 20, (16, 5), generator=g), torch.randint(0, 3, (16,), generator=g))
    b = (torch.randint(0, 20, (16, 5), generator=g), torch.randint(0, 3, (16,), generator=g))
    sparse, dense = _Bag(sparse=True), _Bag(sparse=False)
    for net in (sparse, dense):  # gradients a sparse optimizer (SparseAdam) would take
        F.cross_entropy(net(a[0]), a[1]).backward()
    grads_before = sparse.embed.weight.grad.clone()
    assert grads_before.is_sparse

    def measured(net: nn.Module) -> tuple:
        stats = gradient_statistics(net, F.cross_entropy, a, b, embeddings=True)
        # nn.EmbeddingBag has no second derivative (dense or sparse): its weight is left out
        spectrum = normprobe.hessian_spectrum(
            net, F.cross_entropy, a, what=("top", "trace"), k=3, trace_samples=4,
            params=["embed.weight", "head.weight", "head.bias"],
        )  # fmt: skip
        return stats, spectrum.top_eigenvalues, spectrum.trace

    (s_stats, s_top, s_trace), (d_stats, d_top, d_trace) = measured(sparse), measured(dense)
    pd.testing.assert_frame_equal(s_stats, d_stats)
    assert set(s_stats.layer) == {"embed", "bag", "head"}
    assert s_top.tolist() == d_top.tolist() and s_trace == d_trace
    # the flags and the sparse gradients are as they were
    assert sparse.embed.sparse and sparse.bag.sparse
    assert torch.equal(sparse.embed.weight.grad.to_dense(), grads_before.to_dense())
    assert sparse.embed.weight.grad.is_sparse
    with pytest.raises(
        normprobe.hessian.HessianError,
        match=r"^torch has no second derivative for '_embedding_bag_backward', which the "
        r"gradient's graph runs \(nn.EmbeddingBag's: an nn.Embedding followed by .mean\(1\)",
    ):
        normprobe.hessian_spectrum(sparse, F.cross_entropy, a, what="top", k=2)
    assert sparse.embed.sparse and sparse.bag.sparse


def test_layers_pruned_by_torch_are_measured_at_the_weight_they_apply() -> None:
    """torch.nn.utils.prune moves a layer's parameter to ``weight_orig`` and applies
    ``weight_orig * weight_mask`` as ``weight``: such layers dropped out of the gradient
    probes' rows (listed only in the layer rule as "weight_orig, bias: not a weight"). They
    are weight layers: measured at the weight they apply, exact against autograd, frozen
    when ``weight_orig`` is."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, 5),
    )  # fmt: skip
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    prune.random_unstructured(net[3], "weight", amount=0.3)
    prune.l1_unstructured(net[3], "weight", amount=0.3)  # two methods: a PruningContainer
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 20, generator=g), torch.randint(0, 5, (64,), generator=g)
    x2, y2 = torch.randn(64, 20, generator=g), torch.randint(0, 5, (64,), generator=g)
    norms = gradient_norms(net, F.cross_entropy, (x, y))
    rows = norms.query("metric == 'grad_norm'")
    assert rows["layer"].tolist() == ["0", "3", "5"]
    assert "not a weight" not in rows["layer_rule"].iloc[0]
    loss = F.cross_entropy(net(x), y)  # the pass computes the weights the layers apply
    exact = torch.autograd.grad(loss, [net[0].weight, net[3].weight, net[5].weight])
    assert rows["value"].tolist() == pytest.approx([float(t.norm()) for t in exact], rel=1e-6)
    corr = gradient_correlation(net, F.cross_entropy, (x, y), (x2, y2))
    assert corr["layer"].tolist() == ["0", "3", "5"]
    net[3].weight_orig.requires_grad_(False)
    frozen = gradient_norms(net, F.cross_entropy, (x, y), frozen=True).query("metric == 'grad_norm'")
    assert frozen["frozen"].tolist() == [False, True, False]
    assert "3 (frozen)" in gradient_norms(net, F.cross_entropy, (x, y), frozen=False)["layer_rule"][0]
    assert not net[3].weight_orig.requires_grad  # put back as found
    # the Hessian is over weight_orig: zero at the entries the mask holds out
    op = normprobe.hessian.HessianOperator(net, F.cross_entropy, (x, y), params="0.weight_orig")
    held_out = (net[0].weight_mask == 0).reshape(-1).float()
    assert op.names == ["0.weight_orig"] and float(held_out.sum()) > 0
    product = op.matvec(torch.randn(op.dim, generator=g) * held_out)
    assert float(product.abs().max()) == 0.0
    product = op.matvec(1.0 - held_out).reshape(net[0].weight_mask.shape)
    assert float(product[net[0].weight_mask == 0].abs().max()) == 0.0


def test_a_type_or_regex_selection_leaves_out_the_modules_without_a_weight_and_says_so() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 12), nn.LayerNorm(12, elementwise_affine=False), nn.ReLU(),
        nn.Linear(12, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 3),
    )  # fmt: skip
    batch = torch.randn(20, 6), torch.randint(0, 3, (20,))
    loss = nn.functional.cross_entropy
    for layers, rule in ((nn.LayerNorm, "type: LayerNorm"), (r"[14]", "regex: [14]")):
        frame = gradient_norms(net, loss, batch, layers=layers)
        assert set(frame.layer) == {"4"}
        assert frame.layer_rule.iloc[0] == f"{rule}; left out: 1 (no weight)"
        out = net[:4](batch[0])
        weight = net[4].weight
        expected = torch.autograd.grad(loss(net[4:](out), batch[1]), weight)[0].norm()
        assert frame.value.iloc[0] == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ProbeError, match=r"layer '1' \(LayerNorm\) has no weight tensor"):
        gradient_norms(net, loss, batch, layers=["1", "4"])
    with pytest.raises(ProbeError, match=r"only modules without a weight tensor \(1\)"):
        gradient_norms(net, loss, batch, layers=r"1")


def test_when_the_rule_takes_no_layer_the_message_offers_only_the_options_that_help() -> None:
    torch.manual_seed(0)
    batch = torch.randn(8, 4), torch.randint(0, 3, (8,))
    hooked = nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 3)))
    with pytest.raises(ProbeError) as caught:
        gradient_norms(hooked, nn.functional.cross_entropy, batch)
    assert "0 (bias, weight_orig: not a weight)" in str(caught.value)
    assert "pass " not in str(caught.value) and "name the layers with layers=[...]" in str(
        caught.value
    )
    named = gradient_norms(hooked, nn.functional.cross_entropy, batch, layers=["0"])
    assert named.layer.tolist() == ["0", "0"]
    frozen = nn.Sequential(nn.Linear(4, 3)).requires_grad_(False)
    with pytest.raises(ProbeError, match=r"; pass frozen=True, or name the layers"):
        gradient_norms(frozen, nn.functional.cross_entropy, batch, frozen=False)
