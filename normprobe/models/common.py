"""Pieces shared by the model builders: activations and initialization."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from normprobe.errors import ModelError
from normprobe.registry import Registry

__all__ = ["ACTIVATIONS", "make_activation", "he_init_", "features_of"]

ACTIVATIONS: Registry[type[nn.Module]] = Registry("activation")
ACTIVATIONS.register("relu", nn.ReLU)
ACTIVATIONS.register("tanh", nn.Tanh)
ACTIVATIONS.register("gelu", nn.GELU)
ACTIVATIONS.register("silu", nn.SiLU, aliases=("swish",))
ACTIVATIONS.register("identity", nn.Identity, aliases=("linear",))


def make_activation(name: str) -> nn.Module:
    return ACTIVATIONS.get(name)()


def he_init_(affine: nn.Module, nonlinearity: str = "relu") -> nn.Module:
    """He (Kaiming) normal initialization, fan-in mode, zero bias.

    ``nonlinearity`` "relu" gives variance 2 / fan_in; anything else 1 / fan_in
    (LeCun), the right choice for a linear read-out or tanh.
    """
    gain_for = "relu" if nonlinearity == "relu" else "linear"
    nn.init.kaiming_normal_(affine.weight, mode="fan_in", nonlinearity=gain_for)
    if affine.bias is not None:
        nn.init.zeros_(affine.bias)
    return affine


def features_of(input_shape: int | Sequence[int]) -> int:
    """Number of input features for a dense network: the product of the example's shape."""
    if isinstance(input_shape, int):
        shape: tuple[int, ...] = (input_shape,)
    else:
        shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ModelError(f"input_shape must be positive integers, got {input_shape!r}")
    return math.prod(shape)
