"""Swap the normalization layers of a user's model for a normprobe normalizer.

A model that already contains torch ``BatchNorm``/``GroupNorm``/
``InstanceNorm``/``LayerNorm``/``RMSNorm`` layers can be studied with any normalizer that
sits between the affine op and the nonlinearity: each such layer is replaced
by the normalizer built for its channel count. Normalizers that need the
affine op's input or weight (``weight``, ``scaled-weight``, ``weight-meanbn``,
``prelayer``, ``preregnorm``, ``balanced``) cannot replace a standalone layer:
asking for one raises an error that says so and lists the swappable ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normprobe import norms
from normprobe.errors import NormalizerError

__all__ = ["swap_norms", "swappable", "SWAPPABLE_TYPES"]

SWAPPABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.RMSNorm,
)


def swappable() -> list[str]:
    """Normalizers that can replace a standalone torch normalization layer."""
    return [
        name
        for name in norms.normalizers()
        if norms.spec(name).standalone is not None or name == "none"
    ]


class _ChannelsFirst2D(nn.Module):
    """Guard for a swapped ``nn.LayerNorm(D)``/``nn.RMSNorm(D)``: only (N, D) has channels on axis 1."""

    def __init__(self, inner: nn.Module, name: str, was: str = "LayerNorm") -> None:
        super().__init__()
        self.inner = inner
        self.name = name
        self.was = was

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise NormalizerError(
                f"layer {self.name!r} was a {self.was} over the last axis and got input of shape "
                f"{tuple(x.shape)}; normprobe normalizers take channels on axis 1, so a {self.was} "
                f"can be swapped only where its input is (N, features). Keep this layer, or swap "
                f"only the BatchNorm/GroupNorm layers of the model"
            )
        return self.inner(x)


def _channels(module: nn.Module, name: str) -> int:
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        shape = tuple(module.normalized_shape)
        kind = type(module).__name__
        if len(shape) != 1:
            raise NormalizerError(
                f"layer {name!r} is {kind}{shape}, normalizing several trailing axes; only "
                f"{kind} over one axis of (N, features) activations can be swapped"
            )
        return shape[0]
    return module.num_features


def swap_norms(model: nn.Module, norm: str, **options: Any) -> list[str]:
    """Replace every torch normalization layer of ``model`` in place; returns the swapped names.

    ``norm="none"`` removes them (identity). The new layers take the dtype and
    device of the layers they replace and start from gamma = 1, beta = 0.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> swap_norms(net, "group", groups=4)
    ['1']
    >>> type(net[1]).__name__, net[1].groups
    ('GroupNorm', 4)
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
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, SWAPPABLE_TYPES) and name
    ]
    swapped = []
    for name, module in targets:
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
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and spec.name != "none":
            new = _ChannelsFirst2D(new, name, type(module).__name__)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        swapped.append(name)
    return swapped
