"""swap_norms in sequence models: LayerNorm/RMSNorm over the last axis, per token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normprobe
from normprobe.errors import NormalizerError
from normprobe.models.swap import PerToken, norm_kind, swap_norms


class LlamaRMSNorm(nn.Module):
    """Hugging Face's RMSNorm, by its look: a gain per feature, no normalized_shape."""

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * x * torch.rsqrt(var + self.variance_epsilon)


class TinyLM(nn.Module):
    def __init__(self, norm: type[nn.Module], d: int = 8, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = norm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.norm(h))


def test_layer_for_a_layernorm_is_the_same_function_per_token() -> None:
    torch.manual_seed(0)
    model = TinyLM(nn.LayerNorm).double().eval()
    ids = torch.randint(0, 11, (3, 7))
    before = model(ids)
    assert normprobe.swap_norms(model, "layer") == ["norm"]
    assert isinstance(model.norm, PerToken)
    torch.testing.assert_close(model(ids), before, rtol=1e-12, atol=1e-12)


def test_rms_for_a_third_party_rmsnorm_is_the_same_function() -> None:
    torch.manual_seed(0)
    model = TinyLM(LlamaRMSNorm).double().eval()
    ids = torch.randint(0, 11, (3, 7))
    before = model(ids)
    assert norm_kind(model.norm) == "last"
    assert normprobe.swap_norms(model, "rms") == ["norm"]
    torch.testing.assert_close(model(ids), before, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", ["none", "layer", "rms", "group", "regnorm"])
def test_every_per_token_normalizer_swaps_into_a_transformer(norm: str) -> None:
    torch.manual_seed(0)
    model = TinyLM(nn.LayerNorm)
    options = {"groups": 2} if norm == "group" else {}
    normprobe.swap_norms(model, norm, **options)
    ids = torch.randint(0, 11, (4, 5))
    out = model(ids)
    assert out.shape == (4, 5, 11) and torch.isfinite(out).all()
    # per token: a token's output does not depend on another example's tokens
    other = ids.clone()
    other[1:] = torch.randint(0, 11, (3, 5))
    torch.testing.assert_close(model(other)[0], out[0])


@pytest.mark.parametrize(
    "norm", ["batch", "batch-renorm", "bmlv", "lmbv", "batch-train", "instance"]
)
def test_normalizers_that_mix_tokens_are_refused_with_the_reason(norm: str) -> None:
    model = TinyLM(nn.LayerNorm)
    with pytest.raises(NormalizerError, match=r"cannot replace the last-axis.*norm.*causal mask"):
        normprobe.swap_norms(model, norm)
    assert isinstance(model.norm, nn.LayerNorm)  # nothing was swapped
    with pytest.raises(NormalizerError, match="needs the affine op's input or weight"):
        normprobe.swap_norms(model, "prelayer")


def test_hugging_face_gpt2_layer_swap_is_the_same_function_and_probes_run() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 16, (2, 6))
    before = model(ids).logits
    swapped = normprobe.swap_norms(model, "layer")
    assert swapped == ["transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1",
                       "transformer.h.1.ln_2", "transformer.ln_f"]  # fmt: skip
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-12, atol=1e-12)
    with pytest.raises(NormalizerError, match="were swapped already"):  # said, not a silent no-op
        normprobe.swap_norms(model, "rms")
    fresh = transformers.GPT2LMHeadModel(config)
    assert len(normprobe.swap_norms(fresh, "rms")) == 5
    frame = normprobe.gradient_norms(
        fresh, lambda out, y: F.cross_entropy(out.transpose(1, 2), y), (ids[:, :-1], ids[:, 1:])
    )
    assert frame["value"].notna().all()


def test_swapping_a_model_without_normalization_layers_is_an_error() -> None:
    with pytest.raises(NormalizerError, match="has no normalization layer to swap"):
        normprobe.swap_norms(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), "layer")
    lm = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 10))
    assert normprobe.swap_norms(lm, "rms") == ["1"]
    # a second swap finds only the swapped layer: said, not silently nothing
    with pytest.raises(NormalizerError, match="were swapped already"):
        normprobe.swap_norms(lm, "layer")


class _ChannelsFirst(nn.LayerNorm):
    """ConvNeXt's LayerNorm with data_format="channels_first": over axis 1 of (N, C, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.data_format = "channels_first"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class _Permuted(nn.LayerNorm):
    """timm's LayerNorm2d: the channels moved last, normalized, moved back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _InFloat32(nn.LayerNorm):
    """A LayerNorm that computes in float32 (CLIP's): the last axis, as torch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


@pytest.mark.parametrize("layer", [_ChannelsFirst, _Permuted])
def test_a_layernorm_subclass_over_another_axis_is_refused_not_swapped(layer) -> None:
    """Applied per token, the new normalizer would normalize the last axis (W of an image)
    where the layer normalized the channels: refused before anything is replaced."""
    net = nn.Sequential(nn.Conv2d(3, 8, 1), layer(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    before = [type(m) for m in net]
    with pytest.raises(NormalizerError, match=r"layer '1' \(_\w+.*\) does not normalize the "
                       r"last axis of its input"):  # fmt: skip
        swap_norms(net, "rms")
    assert [type(m) for m in net] == before  # nothing replaced


def test_a_layernorm_subclass_over_the_last_axis_is_swapped() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), _InFloat32(8), nn.Linear(8, 3))
    assert swap_norms(net, "layer") == ["1"]
    reference = nn.Sequential(net[0], nn.LayerNorm(8), net[2])
    x = torch.randn(5, 7, 4)
    torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-6)
