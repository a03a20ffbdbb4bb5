"""Representation correlation against hand computations, and on models normprobe did not build."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normprobe.probes import ProbeError, representation_correlation
from normprobe.probes.signal import mean_offdiagonal_cosine, pearson


def _tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 2-layer float64 network and its weights, to compute the expected values by hand."""
    g = torch.Generator().manual_seed(0)
    w1, b1 = (
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        torch.randn(4, generator=g, dtype=torch.float64),
    )
    w2, b2 = (
        torch.randn(2, 4, generator=g, dtype=torch.float64),
        torch.randn(2, generator=g, dtype=torch.float64),
    )
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        (
            net[0].weight.copy_(w1),
            net[0].bias.copy_(b1),
            net[2].weight.copy_(w2),
            net[2].bias.copy_(b2),
        )
    return net, w1, b1, w2, b2


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def _within(h: torch.Tensor) -> float:
    h = h.reshape(h.shape[0], -1)
    sim = F.cosine_similarity(h[:, None, :], h[None, :, :], dim=-1)
    n = h.shape[0]
    return float(sim[~torch.eye(n, dtype=torch.bool)].mean())


def _values(frame) -> dict[str, float]:
    return dict(zip(frame.layer, frame.value))


def test_noise_pairing_matches_a_hand_computation() -> None:
    net, w1, b1, w2, b2 = _tiny()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    frame = representation_correlation(net, x, layers=["0", "1", "2"], seed=5)

    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x2 = x + 0.3 * x.std(correction=0) * eps
    z, z2 = x @ w1.T + b1, x2 @ w1.T + b1
    h, h2 = torch.relu(z), torch.relu(z2)
    out, out2 = h @ w2.T + b2, h2 @ w2.T + b2
    expected = {"input": _corr(x, x2), "0": _corr(z, z2), "1": _corr(h, h2), "2": _corr(out, out2)}
    assert _values(frame) == pytest.approx(expected, abs=1e-12)
    assert frame.depth.tolist() == [0, 1, 2, 3]
    assert set(frame.metric) == {"repr_corr_noise"} and set(frame.pairing) == {"noise"}
    assert frame.columns[:4].tolist() == ["layer", "depth", "metric", "value"]
    assert frame["shape"].tolist() == ["3", "4", "4", "2"]


def test_noise_scale_and_seed_change_the_second_batch() -> None:
    net, *_ = _tiny()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    base = representation_correlation(net, x, seed=0)
    assert representation_correlation(net, x, seed=0).equals(base)
    assert not representation_correlation(net, x, seed=1).value.equals(base.value)
    same = representation_correlation(net, x, noise_scale=0.0)
    assert same.value.tolist() == pytest.approx([1.0, 1.0])


def test_noise_drawn_as_the_input_itself_is_refused() -> None:
    """``torch.manual_seed(0); x = torch.randn(...)`` draws the very numbers of the probe's
    noise at seed 0: X' was 1.3 X and every layer of the BatchNorm net read a correlation of 1."""
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(
        ProbeError,
        match=r"noise, drawn from a torch.Generator seeded with 0, is the input itself "
        r"\(correlation 1.0000 over its first 512 entries\).*torch.manual_seed\(0\).*give the "
        r"probe another seed",
    ):
        representation_correlation(net, x)
    # another seed, or the rows in another order: the noisy copy
    for y, seed in ((x, 1), (3 * x.double() + 1, 1), (x.flip(0), 0)):
        frame = representation_correlation(net, y, seed=seed)
        assert frame.value.iloc[0] == pytest.approx(1 / (1 + 0.3**2) ** 0.5, abs=0.03)
        assert (frame.value < 0.999).all()
    torch.manual_seed(0)  # float64 noise is another stream: inputs drawn from it, scaled, shifted
    x64 = 3 * torch.randn(64, 8, dtype=torch.float64) + 1
    with pytest.raises(ProbeError, match="is the input itself"):
        representation_correlation(net.double(), x64)
    # images in channels-last memory: compared in the same (logical) order as the noise
    torch.manual_seed(0)
    images = torch.randn(16, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ProbeError, match="over its first 768 entries"):
        representation_correlation(conv, images)
    # from 32 entries on (the odds of 0.9 by chance: below 1e-11); fewer cannot tell
    torch.manual_seed(0)
    with pytest.raises(ProbeError, match="over its first 32 entries"):
        representation_correlation(net.float(), torch.randn(4, 8))
    torch.manual_seed(0)
    assert len(representation_correlation(net, torch.randn(3, 8))) == 2
    # noise_scale 0 (X' = X by request) passes
    unperturbed = representation_correlation(net.float(), x, noise_scale=0.0)
    assert unperturbed.value.tolist() == pytest.approx([1.0] * 2)


def test_independent_and_within_pairings_match_hand_computations() -> None:
    net, w1, b1, *_ = _tiny()
    g = torch.Generator().manual_seed(2)
    x, x_other = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    h, h_other = torch.relu(x @ w1.T + b1), torch.relu(x_other @ w1.T + b1)

    frame = representation_correlation(net, x, pairing="independent", x_other=x_other)
    assert _values(frame) == pytest.approx({"input": _corr(x, x_other), "1": _corr(h, h_other)})
    assert set(frame.metric) == {"repr_corr_independent"}

    # an (x, y) batch would put y into the model as a second input: refused, not dropped
    with pytest.raises(ProbeError, match=r"cannot take the inputs, a tuple of 2 tensors"):
        representation_correlation(net, (x, torch.zeros(7)), pairing="within")
    frame = representation_correlation(net, x, pairing="within")
    assert _values(frame) == pytest.approx({"input": _within(x), "1": _within(h)})
    assert set(frame.metric) == {"repr_cos_within"}


def test_pure_math_against_torch() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    assert float(pearson(a, b)) == pytest.approx(_corr(a, b), abs=1e-12)
    h = torch.randn(9, 2, 3, generator=g, dtype=torch.float64)
    h[4] = 0.0  # a zero row has cosine 0 with every other row, as in F.cosine_similarity
    assert float(mean_offdiagonal_cosine(h)) == pytest.approx(_within(h), abs=1e-12)
    assert torch.isnan(pearson(torch.ones(4), torch.randn(4, generator=g)))


def test_each_batch_uses_its_own_batch_statistics_and_running_stats_are_untouched() -> None:
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(2.0)
    x, x_other = torch.randn(2, 16, 3, generator=g)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        h, h_other = reference(x), reference(x_other)  # train mode: each batch its own stats
    frame = representation_correlation(model, x, pairing="independent", x_other=x_other)
    assert _values(frame)["2"] == pytest.approx(_corr(h, h_other), abs=1e-6)
    assert torch.equal(model[1].running_mean, torch.full((6,), 0.5))
    assert int(model[1].num_batches_tracked) == 0

    # eval mode: the running statistics normalize both batches
    reference.eval()
    with torch.no_grad():
        reference[1].running_mean.fill_(0.5), reference[1].running_var.fill_(2.0)
        h, h_other = reference(x), reference(x_other)
    frame = representation_correlation(
        model, x, pairing="independent", x_other=x_other, mode="eval"
    )
    assert _values(frame)["2"] == pytest.approx(_corr(h, h_other), abs=1e-6)
    assert set(frame["mode"]) == {"eval"} and model.training


def test_pairing_errors_are_clear() -> None:
    net, *_ = _tiny()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ProbeError, match="unknown pairing 'noisy'; choose 'noise'"):
        representation_correlation(net, x, pairing="noisy")  # type: ignore[arg-type]
    with pytest.raises(ProbeError, match="pass the second one as x_other="):
        representation_correlation(net, x, pairing="independent")
    with pytest.raises(
        ProbeError, match=r"x_other must have the shape of x, \(4, 3\), got \(5, 3\)"
    ):
        representation_correlation(net, x, pairing="independent", x_other=torch.randn(5, 3))
    with pytest.raises(ProbeError, match="x_other equals x"):
        representation_correlation(net, x, pairing="independent", x_other=x.clone())
    with pytest.raises(ProbeError, match="only used with pairing='independent'"):
        representation_correlation(net, x, x_other=x + 1)
    with pytest.raises(ProbeError, match="noise_scale must be a finite number >= 0"):
        representation_correlation(net, x, noise_scale=-1.0)
    with pytest.raises(ProbeError, match="at least 2 examples"):
        representation_correlation(net, x[:1], pairing="within")
    with pytest.raises(ProbeError, match="floating-point inputs"):
        representation_correlation(
            nn.Sequential(nn.Embedding(5, 3), nn.ReLU()), torch.tensor([[1, 2], [3, 4]])
        )


# --------------------------------------------------------------------------- other models


class Block(nn.Module):
    """A residual block with GroupNorm that uses one ReLU module twice (as torchvision does)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(2, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(2, c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        out += x
        return self.relu(out)


class ResCNN(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.GroupNorm(2, c), nn.ReLU())
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def test_residual_cnn_with_groupnorm_and_a_reused_relu() -> None:
    torch.manual_seed(0)
    model = ResCNN()
    x = torch.randn(6, 1, 8, 8)
    # the default: the stem's activation and the blocks' outputs (after the residual add)
    default = representation_correlation(model, x)
    assert default.layer.tolist() == ["input", "stem.2", "blocks.0", "blocks.1"]
    assert default["layer_rule"].iloc[0].startswith("blocks:")
    # the ReLU modules by type: the reused one is recorded once per call
    frame = representation_correlation(model, x, layers=nn.ReLU)
    assert frame.layer.tolist() == [
        "input",
        "stem.2",
        "blocks.0.relu",
        "blocks.0.relu#2",
        "blocks.1.relu",
        "blocks.1.relu#2",
    ]
    assert frame.depth.tolist() == list(range(6)) and frame.call.tolist() == [1, 1, 1, 2, 1, 2]
    assert set(frame["shape"][1:]) == {"4x8x8"}
    # by hand: the second call of blocks.0.relu is the block's output
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    x2 = x + 0.3 * x.std(correction=0) * eps
    with torch.no_grad():
        h, h2 = model.blocks[0](model.stem(x)), model.blocks[0](model.stem(x2))
    assert _values(frame)["blocks.0.relu#2"] == pytest.approx(_corr(h, h2), abs=1e-5)
    within = representation_correlation(model, x, pairing="within", layers=nn.ReLU)
    assert _values(within)["blocks.0.relu#2"] == pytest.approx(_within(h), abs=1e-5)
    # the block's output is the same tensor as its second ReLU call's
    assert _values(default)["blocks.0"] == _values(frame)["blocks.0.relu#2"]


def _encoder() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformer_encoder_representations_of_shape_n_t_d(mode: str) -> None:
    enc = _encoder()
    x = torch.randn(4, 5, 16)
    state = torch.get_rng_state()
    frame = representation_correlation(enc, x, mode=mode)
    assert torch.equal(torch.get_rng_state(), state)
    # no activation modules (F.relu): the default takes the blocks, the residual stream
    assert frame.layer.tolist() == ["input", "layers.0", "layers.1"]
    assert frame["layer_rule"].iloc[0].startswith("blocks:")
    assert set(frame["shape"][1:]) == {"5x16"}
    assert frame.value.between(-1, 1).all()
    # reproducible (attention dropout in train mode runs on a seeded, forked random state)
    assert representation_correlation(enc, x, mode=mode).equals(frame)
    if mode == "eval":  # hooks keep torch's fused fast path from skipping the submodules
        enc.eval()
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        x2 = x + 0.3 * x.std(correction=0) * eps
        with torch.no_grad():
            h, h2 = enc(x), enc(x2)
        enc.train()
        assert _values(frame)["layers.1"] == pytest.approx(_corr(h, h2), abs=1e-5)
    within = representation_correlation(enc, x, pairing="within", mode=mode)
    assert within.value.between(-1, 1).all()


class _GeluBlock(nn.Module):
    """A pre-LN transformer-style block whose MLP has an ``nn.GELU`` module."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln(x))


def test_a_transformer_with_gelu_modules_defaults_to_the_residual_stream() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_GeluBlock(8), _GeluBlock(8))
    x = torch.randn(4, 3, 8)
    frame = representation_correlation(model, x)
    # the blocks' outputs, not the GELU outputs inside their MLPs
    assert frame.layer.tolist() == ["input", "0", "1"]
    with torch.no_grad():
        h, h2 = model(x), model(x + 1.0)
    moved = representation_correlation(model, x, x_other=x + 1.0, pairing="independent")
    assert _values(moved)["1"] == pytest.approx(_corr(h, h2), abs=1e-6)


class _NonNegativeInputs(nn.Module):
    """A layer that checks its inputs on every call, as balanced normalization does on its first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x < 0).any():
            warnings.warn("_NonNegativeInputs got negative inputs", UserWarning, stacklevel=2)
        return x


def test_a_warning_from_the_noise_pass_says_it_comes_from_the_perturbed_inputs() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(_NonNegativeInputs(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.rand(64, 16)
    x[:, :4] = 0.0  # never lit: the noisy copy makes some of these negative
    found = copy.deepcopy(net.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        representation_correlation(net, x, pairing="independent", x_other=torch.rand(64, 16))
        assert not caught  # two unperturbed non-negative batches: nothing to say
        representation_correlation(net, x, pairing="noise", noise_scale=0.3, seed=1)
    assert len(caught) == 1 and caught[0].category is UserWarning
    message = str(caught[0].message)
    assert message.startswith("_NonNegativeInputs got negative inputs")
    assert "the representation probe's noise pass" in message and "X + 0.3 * std(X)" in message
    assert "pairing 'independent'" in message
    # the caller's filters still decide: once per message by default, and "error" raises the
    # layer's own warning in the pass, the model put back
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("default")
        for _ in range(2):
            representation_correlation(net, x, pairing="noise", noise_scale=0.3, seed=2)
    assert len(again) == 1 and "noise pass" in str(again[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(UserWarning, match="_NonNegativeInputs got negative inputs"):
            representation_correlation(net, x, pairing="noise", noise_scale=0.3, seed=1)
    assert all(torch.equal(a, found[k]) for k, a in net.state_dict().items())
    assert net.training and all(p.grad is None for p in net.parameters())
    assert warnings.showwarning is not None and "noise" not in repr(warnings.showwarning)


def test_a_warning_shown_by_another_thread_during_the_noise_pass_is_left_alone() -> None:
    import threading

    said: list[str] = []

    class _Elsewhere(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if (x < 0).any():  # the noise pass: another thread warns meanwhile
                worker = threading.Thread(
                    target=lambda: warnings.warn("from another thread", UserWarning, stacklevel=1)
                )
                worker.start()
                worker.join()
            return x

    net = nn.Sequential(_Elsewhere(), nn.Linear(16, 3), nn.ReLU())
    x = torch.rand(64, 16)
    x[:, :4] = 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        representation_correlation(net, x, pairing="noise", noise_scale=0.3, seed=1)
        said = [str(w.message) for w in caught]
    assert said == ["from another thread"]


def test_noise_pass_blocks_left_out_of_order_leave_no_note_behind() -> None:
    """Two passes whose blocks end out of order (two threads measuring at once): the wrapper
    the second block puts back only passes warnings through."""
    from normprobe.probes.signal import _said_of_the_noise_pass

    before, shown = warnings.showwarning, []
    warnings.showwarning = lambda message, *rest: shown.append(str(message))
    try:
        first, second = _said_of_the_noise_pass(0.3), _said_of_the_noise_pass(0.3)
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)  # puts back the first block's wrapper
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("after both passes", UserWarning, stacklevel=1)
        assert shown == ["after both passes"]
    finally:
        warnings.showwarning = before


def test_the_noise_pairing_leaves_a_floating_point_mask_as_it_is() -> None:
    """A float attention_mask beside float inputs_embeds is not a feature: the noisy pass
    gets the same mask, and only inputs_embeds is perturbed."""

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.act = nn.Linear(4, 4), nn.ReLU()

        def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor):
            return self.act(self.lin(inputs_embeds) * attention_mask[..., None])

    torch.manual_seed(0)
    model = Masked()
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0.0
    x = {"inputs_embeds": torch.randn(3, 5, 4), "attention_mask": mask}
    seen: list[dict[str, torch.Tensor]] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append({k: v.clone() for k, v in kwargs.items()}),
        with_kwargs=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the padding is said; not what this test checks
        representation_correlation(model, x)
    assert len(seen) == 2
    assert torch.equal(seen[0]["attention_mask"], mask)
    assert torch.equal(seen[1]["attention_mask"], mask)
    assert not torch.equal(seen[1]["inputs_embeds"], x["inputs_embeds"])
