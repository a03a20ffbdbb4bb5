"""Swap the normalization layers of a user's model for a normprobe normalizer.

Two kinds of layer are recognised:

- **channel layers**, channels on axis 1: torch's ``BatchNorm``,
  ``GroupNorm`` and ``InstanceNorm``. Each is replaced by the normalizer
  built for its channel count.
- **last-axis layers**, normalizing the features of each example or token
  (the last axis): torch's ``LayerNorm`` and ``RMSNorm`` over one axis, and
  third-party ones by duck typing: a leaf module whose class name ends in
  ``Norm`` with a ``normalized_shape`` or a per-feature ``weight`` (Hugging
  Face's ``LlamaRMSNorm``, ``T5LayerNorm``). The new normalizer sees the
  input as ``(N * T, D)``, every token an example, and gives back the
  input's shape, as the zoo's transformer applies its normalizers
  (:mod:`normprobe.models.transformer`). So ``layer`` in place of a
  ``LayerNorm`` computes the same function, and ``rms``, ``group``,
  ``regnorm`` and ``none`` work in any transformer. Normalizers whose
  statistics mix tokens or examples (``batch``, ``batch-renorm``, ``bmlv``,
  ``lmbv``, ``batch-train``, ``instance``) are refused with the reason in a
  model with attention (the causal mask would no longer hold), and, in any
  other model, at the first input with more than two axes.

Normalizers that need the affine op's input or weight (``weight``,
``scaled-weight``, ``weight-meanbn``, ``prelayer``, ``preregnorm``,
``balanced``) cannot replace a standalone layer: asking for one raises an
error that says so and lists the swappable ones.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from normprobe import norms
from normprobe.errors import NormalizerError
from normprobe.models.transformer import sequence_problem
from normprobe.roles import is_normalizer
from normprobe.state import preserved

__all__ = ["swap_norms", "swappable", "norm_kind", "SWAPPABLE_TYPES", "PerToken"]

SWAPPABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.RMSNorm,
)
_CHANNEL_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def swappable() -> list[str]:
    """Normalizers that can replace a standalone torch normalization layer."""
    return [
        name
        for name in norms.normalizers()
        if norms.spec(name).standalone is not None or name == "none"
    ]


def norm_kind(module: nn.Module) -> Literal["channels", "last"] | None:
    """``"channels"`` (BatchNorm/GroupNorm/InstanceNorm), ``"last"`` (LayerNorm/RMSNorm-like) or None.

    >>> class T5LayerNorm(nn.Module):
    ...     def __init__(self, d):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.ones(d))
    >>> norm_kind(nn.BatchNorm2d(3)), norm_kind(nn.LayerNorm(3)), norm_kind(T5LayerNorm(3))
    ('channels', 'last', 'last')
    """
    if isinstance(module, _CHANNEL_TYPES):
        return "channels"
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return "last"
    if type(module).__module__.startswith("normprobe.norms"):
        return None  # normprobe's own normalizers (already swapped, or built by the zoo)
    if is_normalizer(module) and not isinstance(module, nn.LocalResponseNorm):
        return "last"
    return None


class PerToken(nn.Module):
    """A normprobe normalizer applied over the last axis: ``(..., D)`` seen as ``(N * T, D)``.

    ``(N, D)`` inputs go in unchanged. Normalizers with statistics over the
    batch (``batch_stats``) or over positions would mix the tokens of a
    sequence, so for those an input with more than two axes is refused
    with the reason.
    """

    def __init__(self, inner: nn.Module, name: str, was: str, problem: str | None) -> None:
        super().__init__()
        self.inner = inner
        self.name = name
        self.was = was
        self.problem = problem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.inner(x)
        if self.problem is not None:
            raise NormalizerError(
                f"layer {self.name!r} was a {self.was} over the last axis and got input of shape "
                f"{tuple(x.shape)}; the swapped normalizer cannot normalize per token: {self.problem}"
            )
        if x.dim() < 2:
            raise NormalizerError(
                f"layer {self.name!r} got input of shape {tuple(x.shape)}; a {self.was} over the "
                f"last axis needs (N, ..., features)"
            )
        return self.inner(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def _channels(module: nn.Module, name: str) -> int:
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, _CHANNEL_TYPES):
        return module.num_features
    kind = type(module).__name__
    shape = getattr(module, "normalized_shape", None)
    if shape is None:
        weight = module._parameters.get("weight")
        if weight is None or weight.dim() != 1:
            raise NormalizerError(
                f"layer {name!r} ({kind}) looks like a normalization layer but has neither a "
                f"normalized_shape nor a per-feature weight, so its feature count is unknown; "
                f"leave it out of the swap"
            )
        shape = (weight.shape[0],)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if len(shape) != 1:
        raise NormalizerError(
            f"layer {name!r} is {kind}{shape}, normalizing several trailing axes; only "
            f"{kind} over the last axis can be swapped"
        )
    return int(shape[0])


def _refuse_other_axes(module: nn.Module, name: str, features: int) -> None:
    """Refuse a last-axis-looking layer whose forward normalizes another axis.

    A subclass of ``nn.LayerNorm`` may permute its input (ConvNeXt's
    ``data_format="channels_first"``, timm's ``LayerNorm2d``): applied per
    token, the swapped normalizer would normalize another axis than the layer
    did. A layer over the last axis gives each token's features an output that
    does not change when one token's features are scaled (the statistics are
    that token's own); the layer is run on a ``(2, D, 3, D)`` input (then
    ``(2, 3, D)``) with one token scaled, and refused when other outputs move.
    """
    ref = next(module.parameters(), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    tol = max(1e-3, 16 * torch.finfo(dtype).eps)
    for shape in ((2, features, 3, features), (2, 3, features)):
        x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        scaled = x.clone()
        token = (slice(None), 1, 2) if len(shape) == 4 else (slice(None), 1)
        scaled[token] *= 7.0  # one token's features (the last axis), in each example
        try:
            with torch.no_grad(), preserved(module):
                out, again = module(x), module(scaled)
        except Exception:  # noqa: BLE001 - a layer that cannot take this shape: the next one
            continue
        if isinstance(out, torch.Tensor) and torch.allclose(out, again, rtol=tol, atol=tol):
            return
        layout = getattr(module, "data_format", None)
        raise NormalizerError(
            f"layer {name!r} ({type(module).__name__}"
            f"{f', data_format={layout!r}' if layout is not None else ''}) does not normalize "
            f"the last axis of its input (scaling one token's features changed the outputs at "
            f"other positions), so a normalizer applied per token would normalize another axis "
            f"than it does; swap_norms cannot replace it: build the model with the normalizer "
            f"in its place"
        )


def _has_attention(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__
        for m in model.modules()
    )


def swap_norms(model: nn.Module, norm: str, **options: Any) -> list[str]:
    """Replace every normalization layer of ``model`` in place; returns the swapped names.

    Channel layers (BatchNorm, GroupNorm, InstanceNorm) get the normalizer
    built for their channels; last-axis layers (LayerNorm, RMSNorm, and
    third-party ones such as ``LlamaRMSNorm``) get it applied per token
    (module docstring). ``norm="none"`` removes them (identity). The new
    layers take the dtype and device of the layers they replace and start
    from gamma = 1, beta = 0. A normalizer that cannot stand alone, or whose
    statistics would mix the tokens of a model with attention, raises a
    :class:`NormalizerError` naming the reason and the alternatives.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> swap_norms(net, "group", groups=4)
    ['1']
    >>> type(net[1]).__name__, net[1].groups
    ('GroupNorm', 4)
    >>> lm = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 10))
    >>> swap_norms(lm, "rms"), lm(torch.zeros(2, 5, dtype=torch.long)).shape
    (['1'], torch.Size([2, 5, 10]))
    """
    spec = norms.spec(norm)
    if spec.name != "none" and spec.standalone is None:
        raise NormalizerError(
            f"normalizer {spec.name!r} needs the affine op's input or weight, so it cannot replace "
            f"a standalone normalization layer; swappable normalizers: {', '.join(swappable())}. "
            f"To study {spec.name!r}, build the model with norms.build(...) around each affine op "
            f"(a factory that receives norm=...)"
        )
    targets = [
        (name, module, kind)
        for name, module in model.named_modules()
        if name and (kind := norm_kind(module)) is not None
    ]
    if not targets:
        swapped_before = [n for n, m in model.named_modules() if isinstance(m, PerToken)]
        before = (
            f" (its layers {', '.join(swapped_before[:3])}{', ...' if len(swapped_before) > 3 else ''} "
            f"were swapped already: build the model again to swap in another normalizer)"
            if swapped_before
            else ""
        )
        raise NormalizerError(
            f"{type(model).__name__} has no normalization layer to swap{before}; swap_norms "
            f"replaces BatchNorm, GroupNorm, InstanceNorm, LayerNorm and RMSNorm layers (and "
            f"third-party ones with normalized_shape or a per-feature weight)"
        )
    # a swap of an outer module replaces its inner ones too: keep the outermost
    targets = [
        t for t in targets if not any(t[0].startswith(o[0] + ".") for o in targets if o is not t)
    ]
    problem = sequence_problem(spec.name, "post") if spec.name != "none" else None
    if (
        problem is not None
        and any(kind == "last" for _, _, kind in targets)
        and _has_attention(model)
    ):
        last = [name for name, _, kind in targets if kind == "last"]
        raise NormalizerError(
            f"normalizer {spec.name!r} cannot replace the last-axis normalization layers of a model "
            f"with attention ({', '.join(last[:4])}{', ...' if len(last) > 4 else ''}): {problem}; "
            f"normalizers that work per token: "
            f"{', '.join(n for n in swappable() if sequence_problem(n, 'post') is None)}"
        )
    for name, module, kind in targets:
        if kind == "last" and type(module) not in (nn.LayerNorm, nn.RMSNorm):
            _refuse_other_axes(module, name, _channels(module, name))
    swapped = []
    for name, module, kind in targets:
        channels = _channels(module, name)
        if spec.name == "none":
            new: nn.Module = nn.Identity()
        else:
            try:
                new = spec.standalone(channels, **options)
            except TypeError as err:
                raise NormalizerError(
                    f"layer {name!r}: bad option for {spec.name!r}: {err}"
                ) from None
            new.layer_name = name
            ref = next(module.parameters(), None)
            if ref is None:
                ref = next(module.buffers(), None)
            if ref is not None:
                new.to(device=ref.device, dtype=ref.dtype)
            if kind == "last":
                new = PerToken(new, name, type(module).__name__, problem)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        swapped.append(name)
    return swapped
