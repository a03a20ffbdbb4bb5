"""The transformer language model: causal mask for every normalizer it takes, placements, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normprobe
from normprobe import norms
from normprobe.errors import ModelError
from normprobe.models.transformer import sequence_normalizers, sequence_problem
from normprobe.training import cross_entropy

T = 8
KW = dict(num_classes=16, context=T, depth=2, width=8, heads=2, mlp_ratio=2)
APPLICABLE = [(n, "pre") for n in sequence_normalizers("pre")] + [
    (n, "post") for n in sequence_normalizers("post") if n != "none"
]
REFUSED = [n for n in normprobe.normalizers() if n not in sequence_normalizers("pre")]


def _model(norm: str, placement: str = "pre", **kw: object) -> nn.Module:
    return normprobe.build_model(
        "transformer", norm, seed=0, placement=placement, **{**KW, **kw}
    ).double()


def test_the_normalizers_that_apply_and_those_that_do_not() -> None:
    assert sequence_normalizers("pre") == [
        "none",
        "layer",
        "group",
        "weight",
        "scaled-weight",
        "prelayer",
        "regnorm",
        "preregnorm",
        "rms",
    ]
    assert sequence_normalizers("post") == ["none", "layer", "group", "regnorm", "rms"]
    # every normalizer with batch statistics is refused, and instance norm (time-axis statistics)
    assert {n for n in normprobe.normalizers() if norms.spec(n).batch_stats} <= set(REFUSED)
    assert {"balanced", "instance"} <= set(REFUSED)


@pytest.mark.parametrize("norm", REFUSED)
def test_a_refused_normalizer_says_which_and_why_at_build_time(norm: str) -> None:
    with pytest.raises(ModelError) as err:
        normprobe.build_model("transformer", norm, **KW)
    message = str(err.value)
    assert repr(norm) in message and "causal mask" in message and "later tokens" in message
    assert "none, layer, group" in message  # the ones that apply
    assert "\n" not in message


def test_post_placement_needs_a_normalizer_of_the_activation() -> None:
    for norm in ("prelayer", "preregnorm", "weight", "scaled-weight"):
        assert "placement 'pre'" in sequence_problem(norm, "post")
        with pytest.raises(ModelError, match=r"residual sum x \+ f\(x\).*use placement 'pre'"):
            normprobe.build_model("transformer", norm, placement="post", **KW)


@pytest.mark.parametrize(("norm", "placement"), APPLICABLE)
@pytest.mark.parametrize("mode", ["train", "eval"])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_changing_a_later_token_never_changes_an_earlier_position(
    norm: str, placement: str, mode: str, data: st.DataObject
) -> None:
    model = _model(norm, placement)
    model.train(mode == "train")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    t = data.draw(st.integers(0, T - 2), label="last unchanged position")
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, KW["num_classes"], (3, T), generator=g)
    changed = x.clone()
    later = torch.randint(1, KW["num_classes"], (3, T - 1 - t), generator=g)
    changed[:, t + 1 :] = (x[:, t + 1 :] + later) % KW["num_classes"]  # every later token new
    with torch.no_grad():
        out, out_changed = model(x), model(changed)
    assert torch.equal(out[:, : t + 1], out_changed[:, : t + 1]), (norm, placement, mode, t)
    assert not torch.equal(out[:, t + 1 :], out_changed[:, t + 1 :])  # later positions do see it


def test_attention_equals_torch_causal_scaled_dot_product_attention() -> None:
    model = _model("layer")
    attn = model.blocks[0].attn
    x = torch.randn(3, T, KW["width"], dtype=torch.float64)
    n, t, d, h = 3, T, KW["width"], KW["heads"]
    q, k, v = attn.qkv(x.reshape(n * t, d)).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = attn.out(ref.transpose(1, 2).reshape(n * t, d)).reshape(n, t, d)
    torch.testing.assert_close(attn(x), ref, rtol=1e-12, atol=1e-12)


def test_pre_and_post_layer_norm_blocks_match_a_hand_written_reference() -> None:
    x = torch.randn(2, T, KW["width"], dtype=torch.float64)
    ln = nn.LayerNorm(KW["width"], dtype=torch.float64)  # gain 1, shift 0: the zoo's init
    for placement in ("pre", "post"):
        block = _model("layer", placement).blocks[0]
        assert type(block.norm1) is norms.LayerNorm and type(block.norm2) is norms.LayerNorm
        if placement == "pre":
            h = x + block.attn(ln(x))
            ref = h + block.mlp(ln(h))
        else:
            h = ln(x + block.attn(x))
            ref = ln(h + block.mlp(h))
        torch.testing.assert_close(block(x), ref, rtol=1e-12, atol=1e-12)


def test_prelayer_centres_the_input_of_each_reading_affine_op_and_divides_by_its_std() -> None:
    model = _model("prelayer")
    block = model.blocks[0]
    assert isinstance(block.norm1, nn.Identity) and isinstance(model.norm_f, nn.Identity)
    for layer in (block.attn.qkv, block.mlp.fc1, model.head):
        assert layer.norm_name == "prelayer" and layer.affine.bias is None
    assert block.attn.out.norm_name == "none" and block.mlp.fc2.norm_name == "none"
    x = torch.randn(2 * T, KW["width"], dtype=torch.float64)  # tokens as examples
    w = block.attn.qkv.affine.weight
    z = (x - x.mean(dim=1, keepdim=True)) @ w.T
    ref = z / torch.sqrt(z.var(dim=1, correction=0, keepdim=True) + 1e-5)
    torch.testing.assert_close(block.attn.qkv(x), ref, rtol=1e-12, atol=1e-12)


def test_none_is_the_same_model_in_both_placements_and_every_norm_starts_alike() -> None:
    x = torch.randint(0, KW["num_classes"], (2, T))
    pre, post = _model("none", "pre"), _model("none", "post")
    assert torch.equal(pre(x), post(x))
    # the throwaway affine op inside stream_norm draws no random numbers: same embeddings
    assert torch.equal(_model("layer").embed.weight, _model("rms").embed.weight)


@pytest.mark.parametrize(("norm", "placement"), APPLICABLE)
def test_every_applicable_normalizer_trains_a_few_steps(norm: str, placement: str) -> None:
    model = normprobe.build_model("transformer", norm, seed=0, placement=placement, **KW)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, KW["num_classes"], (8, T + 1), generator=g)
    losses = []
    for _ in range(6):
        loss = cross_entropy(model(x[:, :-1]), x[:, 1:], classes_last=True)
        loss = loss + 0.1 * norms.regularization(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


def test_regnorm_penalty_is_over_every_token() -> None:
    model = _model("regnorm")
    model(torch.randint(0, KW["num_classes"], (3, T)))
    penalties = norms.penalties(model)
    assert set(penalties) == {"blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1"} | {
        "blocks.1.norm2",
        "norm_f",
    }


def test_options_and_bad_input_are_one_line_errors() -> None:
    with pytest.raises(ModelError, match=r"context 4 is shorter than the data's windows of 8"):
        normprobe.build_model("transformer", "layer", **{**KW, "context": 4}, input_shape=(8,))
    model = normprobe.build_model(
        "transformer", "layer", input_shape=(8,), **{**KW, "context": None}
    )
    assert model.context == 8
    with pytest.raises(ModelError, match=r"got sequences of 9 tokens but its context is 8"):
        model(torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ModelError, match=r"token ids of shape \(N, T\).*data: \{name: text\}"):
        model(torch.randn(2, 8))
    with pytest.raises(ModelError, match=r"width 8 is not divisible by heads 3"):
        normprobe.build_model("transformer", "layer", **{**KW, "heads": 3})
    with pytest.raises(ModelError, match=r"placement must be 'pre'.*or 'post'"):
        normprobe.build_model("transformer", "layer", **{**KW, "placement": "middle"})
    with pytest.raises(ModelError, match=r"input_shape must be \(T,\)"):
        normprobe.build_model("transformer", "layer", **KW, input_shape=(1, 8, 8))
    with pytest.raises(ModelError, match=r"option depth must be a positive integer"):
        normprobe.build_model("transformer", "layer", **{**KW, "depth": 0})


def test_norm_options_reach_every_normalizer() -> None:
    model = _model("group", norm_options={"groups": 2})
    assert model.blocks[0].norm1.groups == 2 and model.norm_f.groups == 2
    default = _model("group")  # the zoo's dense default: at least two channels per group
    assert default.blocks[0].norm1.groups == 4
