"""Every probe leaves every normalizer's model exactly as it found it (docs/definitions.md, Probes)."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normprobe
from normprobe.probes import (
    Probe,
    ProbeError,
    batch_mean,
    gradient_correlation,
    gradient_norms,
    representation_correlation,
)
from normprobe.probes.structure import batch_dependence, signal_statistics, train_eval_gap


def _model(norm: str) -> tuple[nn.Module, tuple[int, ...]]:
    if norm == "instance":  # conv only
        shape = (1, 8, 8)
        kw = dict(depth=10, widen=1, base_channels=4, input_shape=shape, num_classes=3)
        return normprobe.build_model("wrn", norm, seed=0, **kw), shape
    return normprobe.build_model(
        "mlp", norm, seed=0, depth=3, width=16, input_shape=5, num_classes=3
    ), (5,)


def _state(model: nn.Module) -> dict[str, object]:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "grad_ids": {n: id(p.grad) for n, p in model.named_parameters()},
        "flags": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "penalties": {n: id(getattr(m, "penalty", None)) for n, m in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def _assert_same(before: dict, after: dict, where: str) -> None:
    assert before["tensors"].keys() == after["tensors"].keys(), where
    for k, v in before["tensors"].items():
        w = after["tensors"][k]
        assert v.dtype == w.dtype and torch.equal(v, w), (where, k)  # bit for bit
    for k, g in before["grads"].items():
        h = after["grads"][k]
        assert (g is None) == (h is None), (where, k)
        assert g is None or torch.equal(g, h), (where, k)
    for key in ("grad_ids", "flags", "requires_grad", "penalties", "hooks"):
        assert before[key] == after[key], (where, key)


def _probes(x: torch.Tensor, x_other: torch.Tensor, y: torch.Tensor) -> dict[str, Callable]:
    def user_probe(model: nn.Module) -> None:
        with Probe(model) as p, torch.no_grad():
            model(x)
            assert p.activations

    def batch_means(model: nn.Module) -> None:
        try:
            batch_mean(model, x)
            batch_mean(model, x, mode="eval")
        except ProbeError as err:  # none, weight, scaled-weight: nothing to measure
            assert "no normalization layers" in str(err)

    return {
        "batch_mean": batch_means,
        "noise": lambda m: representation_correlation(m, x),
        "independent": lambda m: representation_correlation(
            m, x, pairing="independent", x_other=x_other
        ),
        "within": lambda m: representation_correlation(m, x, pairing="within", mode="eval"),
        "grad_corr": lambda m: gradient_correlation(m, F.cross_entropy, (x, y), (x_other, y)),
        "grad_norms": lambda m: gradient_norms(m, F.cross_entropy, (x, y)),
        "grad_norms_eval": lambda m: gradient_norms(m, F.cross_entropy, (x, y), mode="eval"),
        "Probe": user_probe,
        "batch_dependence": lambda m: batch_dependence(m, x, x_other),
        "batch_dependence_eval": lambda m: batch_dependence(m, x, x_other, mode="eval"),
        "train_eval_gap": lambda m: train_eval_gap(m, x),
        "signal": lambda m: signal_statistics(m, x),
    }


@pytest.mark.parametrize("norm", normprobe.normalizers())
# the mixed flags below are a frozen layer, which the probes name (tested further down)
@pytest.mark.filterwarnings("ignore:mode='train' runs every module:UserWarning")
def test_every_probe_leaves_the_model_as_found(norm: str) -> None:
    model, shape = _model(norm)
    g = torch.Generator().manual_seed(0)
    # non-negative inputs, as balanced normalization assumes
    x, x_other = torch.rand(2, 8, *shape, generator=g) + 0.1
    y = torch.randint(0, 3, (8,), generator=g)
    # a training step's worth of state: running statistics moved, counters at 1, grads set ...
    F.cross_entropy(model(x * 2 + 1), y).backward()
    # ... some grads None, mixed train/eval flags, a frozen parameter
    model.blocks[0].zero_grad(set_to_none=True)
    model.blocks[1].eval()
    model.head.weight.requires_grad_(False)
    before = _state(model)
    grads = before["grads"].values()
    assert any(g is None for g in grads) and any(g is not None for g in grads)
    rng = torch.get_rng_state()
    for name, probe in _probes(x, x_other, y).items():
        probe(model)
        _assert_same(before, _state(model), f"{norm}, {name}")
    assert torch.equal(torch.get_rng_state(), rng)


def test_regnorm_penalty_of_the_last_training_pass_survives_a_probe() -> None:
    model, _ = _model("regnorm")
    x = torch.randn(8, 5)
    model(x)
    penalty = normprobe.norms.regularization(model)
    gradient_norms(model, F.cross_entropy, (x + 1, torch.zeros(8, dtype=torch.long)))
    assert torch.equal(normprobe.norms.regularization(model), penalty)


@pytest.mark.parametrize("norm", ["batch", "batch-renorm", "balanced", "weight-meanbn", "lmbv"])
def test_probe_passes_never_update_running_statistics_even_inside_the_block(norm: str) -> None:
    model, shape = _model(norm)
    x = torch.rand(8, *shape, generator=torch.Generator().manual_seed(0)) + 0.1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with Probe(model, mode="train") as p, torch.no_grad():
        first = model(x)
        model(x * 3)
        for k, v in model.state_dict().items():
            assert torch.equal(before[k], v), k
        # still the batch statistics of each pass (train mode), as in training
        assert torch.equal(model(x), first) and model.training and p.layers


def _transformer_cases() -> list[tuple[str, str]]:
    from normprobe.models.transformer import sequence_normalizers

    pre = [(n, "pre") for n in sequence_normalizers("pre")]
    return pre + [(n, "post") for n in sequence_normalizers("post") if n != "none"]


@pytest.mark.parametrize(("norm", "placement"), _transformer_cases())
def test_every_probe_leaves_a_transformer_as_found(norm: str, placement: str) -> None:
    from normprobe.training import loss_for

    model = normprobe.build_model(
        "transformer",
        norm,
        seed=0,
        num_classes=11,
        context=5,
        depth=2,
        width=8,
        heads=2,
        mlp_ratio=2,
        placement=placement,
    )
    g = torch.Generator().manual_seed(0)
    x, x_other, y = torch.randint(0, 11, (3, 6, 5), generator=g)
    loss_fn = loss_for(model)
    (loss_fn(model(x), y) + normprobe.norms.regularization(model)).backward()
    model.blocks[0].zero_grad(set_to_none=True)
    model.blocks[1].eval()
    model.blocks[1].attn.out.affine.weight.requires_grad_(False)
    before = _state(model)
    rng = torch.get_rng_state()
    probes = _probes(x, x_other, y)
    probes.pop("noise")  # token ids take no Gaussian noise (a clear error, tested elsewhere)
    probes["grad_corr"] = lambda m: gradient_correlation(m, loss_fn, (x, y), (x_other, y))
    probes["grad_norms"] = lambda m: gradient_norms(m, loss_fn, (x, y))
    probes["grad_norms_eval"] = lambda m: gradient_norms(m, loss_fn, (x, y), mode="eval")
    probes["signal"] = lambda m: signal_statistics(m, x, channel_axis=-1)  # (N, T, D) inputs

    def signal_refused(m: nn.Module) -> None:  # no axis for (N, T, D): refused mid-pass
        with pytest.raises(ProbeError, match="channel_axis"):
            signal_statistics(m, x)

    probes["signal_refused"] = signal_refused
    for name, probe in probes.items():
        probe(model)
        _assert_same(before, _state(model), f"transformer {norm} {placement}, {name}")
    assert torch.equal(torch.get_rng_state(), rng)


def test_batch_norm_frozen_in_a_training_model_is_said_not_silently_unfrozen() -> None:
    """A model trained with its batch norm held in eval mode (frozen for fine-tuning): the probes'
    and the Hessian's train mode run that layer on the batch's statistics, a network other than
    the one trained (the first layer's gradient norm 0.21 against the training step's 0.16);
    they now say so at the caller's line, and mode='eval' measures it as it trains."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        for _ in range(5):
            net(x + 2)  # running statistics away from the batch's
    net[1].eval()
    said = r"mode='train' runs every module in train mode, and the model \(in train mode\) holds 1 "
    for call in (
        lambda: gradient_norms(net, F.cross_entropy, (x, y)),
        lambda: representation_correlation(net, x, seed=1),
        lambda: normprobe.hessian_spectrum(net, F.cross_entropy, (x, y), what="top", k=1),
    ):
        with pytest.warns(UserWarning, match=said) as caught:
            call()
        assert {w.filename for w in caught} == {__file__}  # the caller's line, not normprobe's
    assert net.training and not net[1].training  # put back as found
    trained = torch.autograd.grad(F.cross_entropy(net(x), y), [net[0].weight, net[3].weight])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval mode, a model in eval mode, nothing frozen: no word
        frame = gradient_norms(net, F.cross_entropy, (x, y), mode="eval")
        gradient_norms(net.eval(), F.cross_entropy, (x, y))
        gradient_norms(net.train(), F.cross_entropy, (x, y))
    norms = frame.query("metric == 'grad_norm'").value.tolist()
    assert norms == pytest.approx([float(t.norm()) for t in trained], rel=1e-6)


class _Dropped(nn.Module):
    """An MLP whose dropout is ``how``: "functional" (``F.dropout`` at a fixed rate, which no
    module flag or rate attribute reaches), "module" (``nn.Dropout``), "rate" (``F.dropout``
    at the rate ``drop_rate``, as timm's heads), "undecided" (a number drawn in every pass
    that decides nothing) or "none"."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 3)
        self.drop = nn.Dropout(0.5) if how == "module" else nn.Identity()
        self.drop_rate = 0.5  # timm's name for the rate its heads pass to F.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "undecided" and self.training and float(torch.rand(())) < 0.0:
            return x  # Hugging Face's layer drop draws in every pass and, at rate 0, skips nothing
        h = torch.relu(self.fc1(x))
        h = F.dropout(h, 0.5, self.training) if self.how == "functional" else self.drop(h)
        h = torch.relu(self.fc2(h))
        if self.how == "rate":
            return self.fc3(F.dropout(h, self.drop_rate, self.training))
        h = F.dropout(h, 0.5, self.training) if self.how == "functional" else self.drop(h)
        return self.fc3(h)


def _dropped(how: str) -> nn.Module:
    torch.manual_seed(0)
    return _Dropped(how)


def test_random_draws_the_probes_cannot_switch_off_are_said() -> None:
    """A functional dropout at a fixed rate drew a fresh mask in each probe pass: the
    correlations read the masks' noise (a representation correlation of 0.51 and 0.17 at the
    last two layers against 0.97 without it), silently. The probes now say so at the caller's
    line, stay repeatable, leave the caller's random stream alone, and say nothing where the
    dropout is one they switch off, or off in eval mode, or where the numbers drawn decide
    nothing (Hugging Face's layer drop at rate 0); those equal the network without dropout."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    x2, y2 = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    layers = ["fc1", "fc2", "fc3"]
    calls = {
        "representation": lambda net, **kw: representation_correlation(
            net, x, layers=layers, seed=1, **kw
        ),
        "gradients": lambda net, **kw: gradient_correlation(
            net, F.cross_entropy, (x, y), (x2, y2), **kw
        ),
        "norms": lambda net, **kw: gradient_norms(net, F.cross_entropy, (x, y), **kw),
    }
    said = r"forward pass depends on random numbers .* each drew its own numbers, so the values"
    for name, call in calls.items():
        functional = _dropped("functional")
        stream = torch.random.get_rng_state()
        with pytest.warns(UserWarning, match=said) as caught:
            noisy = call(functional)
        assert {w.filename for w in caught} == {__file__}, name  # the caller's line
        assert torch.equal(torch.random.get_rng_state(), stream)  # the caller's stream, untouched
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once per model: a loop measures it every step
            pd.testing.assert_frame_equal(call(functional), noisy)  # seeded: repeatable
            # switched off, or off in eval mode: no word
            plain = call(_dropped("none"))
            pd.testing.assert_frame_equal(call(_dropped("module")), plain)
            pd.testing.assert_frame_equal(call(_dropped("undecided")), plain)
            rate = _dropped("rate")
            pd.testing.assert_frame_equal(call(rate), plain)  # its rate is 0 while measuring
            assert rate.drop_rate == 0.5  # and put back
            evaluated = call(functional, mode="eval")
            pd.testing.assert_frame_equal(evaluated, call(_dropped("none"), mode="eval"))
        assert not noisy["value"].equals(plain["value"]), name
    rep = calls["representation"](_dropped("none"))
    assert rep.set_index("layer").loc[["fc2", "fc3"], "value"].min() > 0.9
    # RReLU draws a slope per unit in training mode: measured at its mean slope, as in eval mode
    torch.manual_seed(0)
    rrelu = nn.Sequential(
        OrderedDict(fc1=nn.Linear(8, 16), act=nn.RReLU(), fc2=nn.Linear(16, 16), fc3=nn.Linear(16, 3))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for call in calls.values():
            pd.testing.assert_frame_equal(
                call(rrelu).drop(columns="mode"), call(rrelu, mode="eval").drop(columns="mode")
            )
    assert rrelu.act.training


class _Centring(nn.Module):
    """Subtracts a running mean it updates in every train-mode forward (an EMA codebook's or a
    call counter's kind of state): a pass changes the network the next pass runs."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("centre", torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.centre.mul_(0.5).add_(x.mean(dim=0), alpha=0.5)
        return x - self.centre


def _state_updating_nets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    centring = nn.Sequential(
        nn.Linear(5, 8), _Centring(8), nn.ReLU(), nn.Linear(8, 8), _Centring(8), nn.ReLU(),
        nn.Linear(8, 3),
    )  # fmt: skip
    spectral = nn.Sequential(
        nn.utils.spectral_norm(nn.Linear(5, 8)), nn.ReLU(),
        nn.utils.spectral_norm(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip
    return {"centring": centring, "spectral_norm (hooks)": spectral}


def _outputs(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, n=n: seen.__setitem__(n, out.detach()))
        for n, m in model.named_modules()
        if n in names
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def _r(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("kind", ["centring", "spectral_norm (hooks)"])
def test_every_pass_of_a_probe_sees_the_buffers_the_probe_found(kind: str) -> None:
    """Both passes of a probe run the same network: a forward that updates a buffer although
    the running statistics are frozen (spectral norm's power iteration, a running centre) has
    it put back before the next pass, and the model is left as found."""
    model = _state_updating_nets()[kind]
    model.train()
    x, x_other = torch.randn(32, 5), torch.randn(32, 5)
    before = _state(model)
    frame = representation_correlation(model, x, pairing="independent", x_other=x_other)
    _assert_same(before, _state(model), "representation")
    layers = [n for n in frame.layer if n != "input"]
    # reference: each batch through its own copy of the model as found
    first = _outputs(copy.deepcopy(model), x, layers)
    second = _outputs(copy.deepcopy(model), x_other, layers)
    one_after_the_other = copy.deepcopy(model)
    chained = _outputs(one_after_the_other, x, layers)
    chained_second = _outputs(one_after_the_other, x_other, layers)
    for name, value in zip(frame.layer[1:], frame.value[1:]):
        assert value == pytest.approx(_r(first[name], second[name]), abs=1e-6), name
    # the reference a pass-to-pass update would give differs: the test tells them apart
    assert any(
        abs(_r(chained[n], chained_second[n]) - _r(first[n], second[n])) > 1e-4 for n in layers
    )
    batch_a, batch_b = (x, torch.randint(0, 3, (32,))), (x_other, torch.randint(0, 3, (32,)))
    named = ["0", "2", "4"] if kind.startswith("spectral") else None
    grads = gradient_correlation(model, F.cross_entropy, batch_a, batch_b, layers=named)
    _assert_same(before, _state(model), "gradients")
    expected = []
    for xb, yb in (batch_a, batch_b):
        net = copy.deepcopy(model)
        applied: list[torch.Tensor] = []
        handles = [
            m.register_forward_hook(lambda m, _i, _o, a=applied: a.extend([m.weight, m.bias]))
            for n, m in net.named_modules()
            if n in list(grads.layer)
        ]
        loss = F.cross_entropy(net(xb), yb)
        for h in handles:
            h.remove()
        expected.append(torch.autograd.grad(loss, applied))
    for i, value in enumerate(grads.value):
        ga = torch.cat([g.flatten() for g in expected[0][2 * i : 2 * i + 2]]).double()
        gb = torch.cat([g.flatten() for g in expected[1][2 * i : 2 * i + 2]]).double()
        assert value == pytest.approx(float(ga @ gb / (ga.norm() * gb.norm())), abs=1e-6)
