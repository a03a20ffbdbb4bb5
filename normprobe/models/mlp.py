"""A fully-connected ReLU network with one normalizer per hidden layer (Rao & Sohl-Dickstein 2020, figure 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from normprobe import norms
from normprobe.errors import ModelError
from normprobe.models.common import features_of, he_init_, make_activation

__all__ = ["MLP"]


class MLP(nn.Module):
    """Fully-connected network: depth x (affine, normalizer, activation), then a linear head.

    Module names: ``blocks.{i}.affine``, ``blocks.{i}.norm``, ``blocks.{i}.act``
    for hidden layer i (0 is nearest the input), and ``head``. Weights are He
    initialized (fan-in), biases zero; the head is not normalized.

    >>> model = MLP("batch", input_shape=64, num_classes=10, depth=3, width=32)
    >>> model(torch.randn(8, 64)).shape
    torch.Size([8, 10])
    """

    #: the probes' default layers: the activation modules, one per hidden layer
    representation_layers = "activations"

    def __init__(
        self,
        norm: str = "none",
        *,
        input_shape: int | Sequence[int] = 64,
        num_classes: int = 10,
        depth: int = 10,
        width: int = 128,
        activation: str = "relu",
        norm_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1 or num_classes < 1:
            raise ModelError(
                f"mlp needs depth, width and num_classes >= 1, got {depth}, {width}, {num_classes}"
            )
        self.norm_name = norms.spec(norm).name
        self.depth = depth
        self.flatten = nn.Flatten()
        in_features = features_of(input_shape)
        blocks = []
        for i in range(depth):
            affine = he_init_(nn.Linear(in_features if i == 0 else width, width), activation)
            act = make_activation(activation)
            blocks.append(
                norms.build(norm, affine, act, layer_name=f"blocks.{i}", **(norm_options or {}))
            )
        self.blocks = nn.Sequential(*blocks)
        self.head = he_init_(nn.Linear(width, num_classes), "linear")
        norms.label_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.flatten(x)))
