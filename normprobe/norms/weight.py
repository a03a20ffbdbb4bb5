"""Weight-space normalizers: weight norm and scaled weight norm (Arpit's lecture slides).

``weight`` is torch's own ``torch.nn.utils.parametrizations.weight_norm``.
``scaled-weight`` (Arpit & Bengio 2019) multiplies the weight-normalized
weight by ``sqrt(2 fan_in / fan_out)`` before a ReLU (``sqrt(fan_in /
fan_out)`` before a linear output) so a wide ReLU layer preserves the norm of
its input in expectation, with ``g = 1`` at initialization.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["apply_weight_norm", "apply_scaled_weight_norm", "ScaledWeightNorm", "fan_in_out"]


def apply_weight_norm(affine: nn.Module) -> nn.Module:
    """``W = g * V / ||V||`` per output unit (dim 0), torch's parametrization."""
    return weight_norm(affine, name="weight", dim=0)


def fan_in_out(weight: torch.Tensor) -> tuple[int, int]:
    """torch's fan convention: ``fan_in = C_in * k``, ``fan_out = C_out * k`` (k = kernel size)."""
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


class ScaledWeightNorm(nn.Module):
    """Parametrization ``W = scale * g * V / ||V||`` with row norms over all but dim 0.

    Registered through ``torch.nn.utils.parametrize`` so ``affine.weight``
    stays a plain tensor attribute; the originals are
    ``parametrizations.weight.original0`` (g) and ``original1`` (V), as for
    torch's weight norm.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
        return v * (self.scale * g / norm)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        norm = torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.dim())), keepdim=True)
        return norm / self.scale, weight

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}"


def apply_scaled_weight_norm(
    affine: nn.Module, nonlinearity: Literal["relu", "linear"] = "relu"
) -> nn.Module:
    """Scaled weight norm on ``affine.weight``: ``g = 1`` and bias 0 at initialization (Arpit's lecture slides)."""
    fan_in, fan_out = fan_in_out(affine.weight)
    gain = 2.0 if nonlinearity == "relu" else 1.0
    scale = math.sqrt(gain * fan_in / fan_out)
    parametrize.register_parametrization(affine, "weight", ScaledWeightNorm(scale), unsafe=True)
    with torch.no_grad():
        affine.parametrizations.weight.original0.fill_(1.0)
        if affine.bias is not None:
            affine.bias.zero_()
    return affine
