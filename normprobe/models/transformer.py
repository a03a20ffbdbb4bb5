"""A small decoder-only Transformer language model with the zoo's normalizers (Rao & Sohl-Dickstein 2020, sec. 7, LM1B).

Tokens (bytes, ``num_classes = 256``) and learned positions are embedded into
a residual stream ``x`` of shape ``(N, T, D)``; ``depth`` blocks each add a
causal self-attention sublayer and an MLP sublayer (``D -> mlp_ratio * D ->
D`` with GELU); a linear head gives next-token scores ``(N, T, num_classes)``.

Every normalizer is the zoo's own module, applied per token: the block views
the stream as ``(N * T, D)``, so "per example" statistics (``layer``,
``rms``, ``group``, ``prelayer``) are per token and never mix positions.
``placement`` puts them where the two usual Transformers do:

- ``pre`` (GPT-2, Xiong et al. 2020): ``x + f(norm(x))`` for each sublayer
  ``f``, and a final ``norm`` before the head. Normalizers that need the
  affine op (``prelayer``, ``preregnorm``, ``weight``, ``scaled-weight``)
  take the place of that norm by wrapping the affine op that reads the
  normalized stream (the attention's ``qkv``, the MLP's ``fc1``, the
  ``head``), as :func:`normprobe.norms.build` wraps any affine op: for the
  paper's PreLayerNorm (Rao & Sohl-Dickstein 2020, sec. 3.1 and 7: "replacing Layer Norm with
  Pre-Normalization") that is ``W(x - mean x) / std`` per token, the input
  centred and the output divided by its own standard deviation.
- ``post`` (Vaswani et al. 2017): ``norm(x + f(x))`` after each sublayer, no
  final norm. Only normalizers that act on an activation alone fit here.

``none`` is the same model in both placements (``x + f(x)``). Normalizers
with statistics over the batch (``batch``, ``batch-train``, ``bmlv``,
``lmbv``, ``batch-renorm``, ``weight-meanbn``, ``balanced``) and ``instance``
(statistics over the time axis) are refused: over a batch of sequences their
statistics take in later positions, so an earlier position's output would
depend on later tokens and the causal mask would no longer hold.
``regnorm``/``preregnorm`` normalize per token and fit; their penalty is a
batch mean over all tokens, a training loss term that the outputs never see.

Module names: ``embed``, ``pos``, ``blocks.{i}`` with ``norm1``/``norm2``
(the block's normalizers, Identity where the normalizer wraps an affine op),
``attn.qkv`` and ``attn.out``, ``mlp.fc1``, ``mlp.act`` and ``mlp.fc2`` (each
affine op a :class:`normprobe.norms.NormedAffine`), then ``norm_f`` and
``head``. The probes' default layers are the ``mlp.act`` modules, whose
outputs are ``(N, T, mlp_ratio * D)``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from normprobe import norms
from normprobe.errors import ModelError
from normprobe.models.common import he_init_, make_activation

__all__ = ["Transformer", "sequence_normalizers", "sequence_problem"]

Placement = Literal["pre", "post"]
PLACEMENTS: tuple[str, ...] = ("pre", "post")


def sequence_problem(norm: str, placement: str = "pre") -> str | None:
    """Why normalizer ``norm`` cannot be used in the transformer with ``placement`` ("it ..."), or None."""
    s = norms.spec(norm)
    if s.batch_stats or s.name == "balanced":
        what = (
            "sums the input over the batch to balance its weights"
            if s.name == "balanced"
            else "normalizes with statistics over the batch"
        )
        return (
            f"it {what}; over a batch of sequences (N, T, D) that means over the batch "
            f"and time axes, so each position's output would depend on the batch's other "
            f"sequences and on later tokens (in a causal model the causal mask would no longer "
            f"hold; a padded time axis would need masked statistics)"
        )
    if not s.dense:
        return (
            "it normalizes each channel over the spatial axes, here the time axis, so "
            "each position's output would depend on later tokens (in a causal model the causal "
            "mask would no longer hold)"
        )
    if placement == "post" and s.name != "none" and s.standalone is None:
        return (
            "it needs the affine op it wraps (its input or weight), but placement "
            "'post' normalizes the residual sum x + f(x), which no affine op produces; use "
            "placement 'pre'"
        )
    return None


def sequence_normalizers(placement: str = "pre") -> list[str]:
    """The normalizers the transformer takes with ``placement``, in registry order."""
    return [n for n in norms.normalizers() if sequence_problem(n, placement) is None]


def _per_token(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module`` applied to ``x`` (N, T, C) viewed as (N * T, C): every token an example."""
    n, t, c = x.shape
    return module(x.reshape(n * t, c)).reshape(n, t, -1)


class _Builder:
    """Builds each block's normalizers and affine ops for one normalizer and placement."""

    def __init__(self, norm: str, placement: str, options: dict[str, Any]) -> None:
        self.spec = norms.spec(norm)
        self.placement = placement
        self.options = options
        # normalizers that act on the stream itself (layer, rms, ...); the others wrap affine ops
        self.on_stream = self.spec.name != "none" and self.spec.standalone is not None

    def stream_norm(self, channels: int, name: str) -> nn.Module:
        """The normalizer of the residual stream at ``name`` (Identity if it wraps affine ops)."""
        if not self.on_stream:
            return nn.Identity()
        # norms.build gives the zoo's defaults and option checks; only its normalizer is kept,
        # and the throwaway affine op draws from a forked random state
        with torch.random.fork_rng(devices=[]):
            layer = norms.build(
                self.spec.name,
                nn.Linear(channels, channels, bias=False),
                layer_name=name,
                **self.options,
            )
        norm = layer.norm
        norm.layer_name = name
        return norm

    def reader(
        self, affine: nn.Linear, name: str, nonlinearity: str = "linear"
    ) -> norms.NormedAffine:
        """An affine op that reads the residual stream: wrapped by the normalizer in ``pre``.

        ``nonlinearity``: what follows it ("relu" for ``fc1`` before a ReLU),
        for the normalizers whose scale depends on it (scaled weight norm).
        """
        wraps = not self.on_stream and self.spec.name != "none" and self.placement == "pre"
        if not wraps:
            return self.plain(affine, name)
        return norms.build(
            self.spec.name,
            affine,
            nonlinearity="relu" if nonlinearity == "relu" else "linear",
            layer_name=name,
            **self.options,
        )

    @staticmethod
    def plain(affine: nn.Linear, name: str) -> norms.NormedAffine:
        return norms.build("none", affine, layer_name=name)


class Attention(nn.Module):
    """Causal multi-head self-attention: ``qkv`` (D -> 3D), softmax over earlier positions, ``out``.

    Written with an explicit mask (scores of later positions set to -inf
    before the softmax, so their weights are exactly 0) rather than a fused
    kernel, so that the Hessian's double backward runs through it.
    """

    def __init__(self, width: int, heads: int, builder: _Builder, name: str) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = builder.reader(he_init_(nn.Linear(width, 3 * width), "linear"), f"{name}.qkv")
        self.out = builder.plain(he_init_(nn.Linear(width, width), "linear"), f"{name}.out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.heads
        qkv = _per_token(self.qkv, x).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (N, H, T, d / H)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // h)  # (N, H, T, T)
        later = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(later, float("-inf")).softmax(dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(n, t, d)
        return _per_token(self.out, mixed)


class FeedForward(nn.Module):
    """``fc2(act(fc1(x)))`` per token, ``D -> mlp_ratio * D -> D``."""

    def __init__(
        self, width: int, hidden: int, activation: str, builder: _Builder, name: str
    ) -> None:
        super().__init__()
        fc1 = he_init_(nn.Linear(width, hidden), activation)
        self.fc1 = builder.reader(fc1, f"{name}.fc1", nonlinearity=activation)
        self.act = make_activation(activation)
        self.fc2 = builder.plain(he_init_(nn.Linear(hidden, width), "linear"), f"{name}.fc2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_token(self.fc2, self.act(_per_token(self.fc1, x)))


class Block(nn.Module):
    """One Transformer block: attention then MLP, each with a residual connection."""

    def __init__(
        self,
        width: int,
        heads: int,
        hidden: int,
        activation: str,
        builder: _Builder,
        name: str,
    ) -> None:
        super().__init__()
        self.placement = builder.placement
        self.norm1 = builder.stream_norm(width, f"{name}.norm1")
        self.attn = Attention(width, heads, builder, f"{name}.attn")
        self.norm2 = builder.stream_norm(width, f"{name}.norm2")
        self.mlp = FeedForward(width, hidden, activation, builder, f"{name}.mlp")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "pre":
            x = x + self.attn(_per_token(self.norm1, x))
            return x + self.mlp(_per_token(self.norm2, x))
        x = _per_token(self.norm1, x + self.attn(x))
        return _per_token(self.norm2, x + self.mlp(x))


class Transformer(nn.Module):
    """Decoder-only Transformer language model: token ids (N, T) -> next-token scores (N, T, K).

    ``num_classes`` is the vocabulary (256 bytes for the ``text`` dataset),
    ``context`` the longest sequence (default: the data's window,
    ``input_shape[0]``), ``depth`` the number of blocks, ``width`` the model
    width D, ``heads`` the attention heads (dividing D), ``mlp_ratio`` the MLP
    widening and ``placement`` ``"pre"`` or ``"post"`` (module docstring).
    Token and position embeddings are N(0, 1), so the stream starts at unit
    scale per coordinate as the zoo's standardized inputs do; affine ops
    are fan-in initialized (He for ``fc1`` before a ReLU, LeCun otherwise),
    biases zero. Deterministic: no dropout.

    ``classes_last = True`` tells the training loop and the probes' loss
    that the scores have the classes on the last axis
    (:func:`normprobe.training.cross_entropy`).

    >>> model = Transformer("layer", num_classes=256, context=16, depth=2, width=32, heads=4)
    >>> model(torch.randint(0, 256, (3, 16))).shape
    torch.Size([3, 16, 256])
    """

    classes_last = True
    #: the probes' default layers: the MLPs' activation modules, as the Transformer figure
    #: reads them (representation_layers="blocks" would read the residual stream)
    representation_layers = "activations"

    def __init__(
        self,
        norm: str = "layer",
        *,
        num_classes: int = 256,
        context: int | None = None,
        input_shape: int | tuple[int, ...] | list[int] | None = None,
        depth: int = 2,
        width: int = 64,
        heads: int = 4,
        mlp_ratio: int = 4,
        placement: Placement = "pre",
        activation: str = "gelu",
        norm_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        window = _window(input_shape)
        if context is None:
            context = window if window is not None else 64
        for key, value in (
            ("num_classes", num_classes),
            ("context", context),
            ("depth", depth),
            ("width", width),
            ("heads", heads),
            ("mlp_ratio", mlp_ratio),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(
                    f"transformer option {key} must be a positive integer, got {value!r}"
                )
        if width % heads:
            raise ModelError(
                f"transformer width {width} is not divisible by heads {heads}; each head takes "
                f"width / heads channels: choose heads among the divisors of {width}"
            )
        if placement not in PLACEMENTS:
            raise ModelError(
                f"transformer placement must be 'pre' (x + f(norm(x)), final norm before the "
                f"head) or 'post' (norm(x + f(x))), got {placement!r}"
            )
        if window is not None and window > context:
            raise ModelError(
                f"transformer context {context} is shorter than the data's windows of {window} "
                f"tokens; set the model option context >= {window}, or a data window <= {context}"
            )
        problem = sequence_problem(norm, placement)
        if problem is not None:
            raise ModelError(
                f"normalizer {norms.spec(norm).name!r} does not fit the transformer: {problem}; "
                f"normalizers for placement {placement!r}: "
                f"{', '.join(sequence_normalizers(placement))}"
            )
        self.norm_name = norms.spec(norm).name
        self.num_classes, self.context, self.depth = num_classes, context, depth
        self.width, self.heads, self.placement = width, heads, placement
        builder = _Builder(norm, placement, dict(norm_options or {}))
        self.embed = nn.Embedding(num_classes, width)
        self.pos = nn.Embedding(context, width)
        nn.init.normal_(self.embed.weight)
        nn.init.normal_(self.pos.weight)
        self.blocks = nn.Sequential(
            *(
                Block(width, heads, mlp_ratio * width, activation, builder, f"blocks.{i}")
                for i in range(depth)
            )
        )
        self.norm_f = builder.stream_norm(width, "norm_f") if placement == "pre" else nn.Identity()
        self.head = builder.reader(he_init_(nn.Linear(width, num_classes), "linear"), "head")
        norms.label_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
            raise ModelError(
                f"transformer takes token ids of shape (N, T) as integers, got "
                f"{str(x.dtype).replace('torch.', '')} of shape {tuple(x.shape)}; use a token "
                f"dataset such as data: {{name: text}}"
            )
        t = x.shape[1]
        if t > self.context:
            raise ModelError(
                f"transformer got sequences of {t} tokens but its context is {self.context}; "
                f"build it with context >= {t} or feed windows of at most {self.context} tokens"
            )
        positions = torch.arange(t, device=x.device)
        h = self.blocks(self.embed(x) + self.pos(positions))  # (N, T, D)
        return _per_token(self.head, _per_token(self.norm_f, h))  # (N, T, K)


def _window(input_shape: int | tuple[int, ...] | list[int] | None) -> int | None:
    if input_shape is None:
        return None
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    if len(shape) != 1 or not all(isinstance(d, int) and d >= 1 for d in shape):
        raise ModelError(
            f"transformer takes token windows: input_shape must be (T,), got {input_shape!r}; "
            f"use a token dataset such as data: {{name: text}}"
        )
    return shape[0]
