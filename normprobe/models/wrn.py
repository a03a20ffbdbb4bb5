"""WideResNet-d-k with or without skip connections (Rao & Sohl-Dickstein 2020: WRN-26-2 without skips).

Three stages of ``n`` residual blocks with ``16k``, ``32k`` and ``64k``
channels, stride 2 between stages, a normalized 3x3 stem, global average
pooling and a linear head. Each block is ``conv1 -> norm -> act -> conv2 ->
norm``, then the shortcut is added (``skip=True``) and ``act`` applied: the
post-activation ordering, which keeps every normalizer directly after its
affine op as docs/definitions.md defines it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from normprobe import norms
from normprobe.errors import ModelError
from normprobe.models.common import he_init_, make_activation

__all__ = ["WideResNet", "Block", "blocks_per_stage"]


def blocks_per_stage(depth: int) -> int:
    """Blocks per stage ``n`` for a WRN of ``depth`` layers.

    Zagoruyko & Komodakis count ``depth = 6n + 4`` (WRN-16, WRN-28, ...);
    depths ``6n + 2`` are accepted too, counting stem, ``6n`` convs and head as
    Rao & Sohl-Dickstein's 26-layer network does (WRN-26 -> n = 4).
    """
    if depth >= 10 and (depth - 4) % 6 == 0:
        return (depth - 4) // 6
    if depth >= 8 and (depth - 2) % 6 == 0:
        return (depth - 2) // 6
    valid = sorted({6 * n + 4 for n in range(1, 7)} | {6 * n + 2 for n in range(1, 7)})
    raise ModelError(
        f"wrn depth must be 6n + 4 (WRN-16, -22, -28, ...) or 6n + 2 (WRN-26: stem, 6n convs, "
        f"head), got {depth}; valid depths include {', '.join(map(str, valid))}"
    )


class Block(nn.Module):
    """Two normalized 3x3 convs, an optional (normalized 1x1) shortcut, then the activation."""

    def __init__(
        self,
        norm: str,
        in_channels: int,
        out_channels: int,
        stride: int,
        *,
        skip: bool,
        activation: str,
        name: str,
        norm_options: dict[str, Any],
    ) -> None:
        super().__init__()
        self.skip = skip
        conv1 = he_init_(nn.Conv2d(in_channels, out_channels, 3, stride, padding=1), activation)
        conv2 = he_init_(nn.Conv2d(out_channels, out_channels, 3, 1, padding=1), activation)
        self.conv1 = norms.build(
            norm, conv1, make_activation(activation), layer_name=f"{name}.conv1", **norm_options
        )
        # conv2's output goes through ``act`` after the (optional) sum.
        nonlinearity = "relu" if activation == "relu" else "linear"
        self.conv2 = norms.build(
            norm, conv2, nonlinearity=nonlinearity, layer_name=f"{name}.conv2", **norm_options
        )
        self.shortcut: nn.Module | None = None
        if skip and (stride != 1 or in_channels != out_channels):
            proj = he_init_(nn.Conv2d(in_channels, out_channels, 1, stride), "linear")
            self.shortcut = norms.build(
                norm, proj, nonlinearity="linear", layer_name=f"{name}.shortcut", **norm_options
            )
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        if self.skip:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return self.act(out)


class WideResNet(nn.Module):
    """WideResNet-d-k (3 stages, stride 2 between them) with or without skip connections.

    Module names: ``stem`` (a normalized conv with ``affine``/``norm``/``act``),
    ``blocks.{i}`` numbered through all stages with ``conv1``, ``conv2``,
    ``shortcut`` (projection blocks with ``skip=True`` only) and ``act``;
    ``pool`` and ``head``.

    >>> model = WideResNet("layer", depth=10, widen=1, input_shape=(3, 16, 16))
    >>> model(torch.randn(2, 3, 16, 16)).shape
    torch.Size([2, 10])
    """

    #: the probes' default layers: every activation module (the stem's, both of each
    #: block's), the depth axis of the WideResNet figures
    representation_layers = "activations"

    def __init__(
        self,
        norm: str = "none",
        *,
        depth: int = 16,
        widen: int = 1,
        skip: bool = True,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        base_channels: int = 16,
        activation: str = "relu",
        norm_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != 3:
            raise ModelError(
                f"wrn takes images: input_shape must be (channels, height, width), got {shape}; "
                f"load the dataset with flatten=False (e.g. digits with size=16)"
            )
        if widen < 1 or base_channels < 1 or num_classes < 1:
            raise ModelError(
                f"wrn needs widen, base_channels and num_classes >= 1, got {widen}, "
                f"{base_channels}, {num_classes}"
            )
        n = blocks_per_stage(depth)
        options = dict(norm_options or {})
        self.norm_name = norms.spec(norm).name
        self.depth, self.widen, self.skip = depth, widen, skip
        stem = he_init_(nn.Conv2d(shape[0], base_channels, 3, padding=1), activation)
        self.stem = norms.build(
            norm, stem, make_activation(activation), layer_name="stem", **options
        )
        widths = [base_channels * widen * 2**s for s in range(3)]
        blocks = []
        in_channels = base_channels
        for stage, width in enumerate(widths):
            for b in range(n):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(
                    Block(
                        norm,
                        in_channels,
                        width,
                        stride,
                        skip=skip,
                        activation=activation,
                        name=f"blocks.{len(blocks)}",
                        norm_options=options,
                    )
                )
                in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = he_init_(nn.Linear(in_channels, num_classes), "linear")
        norms.label_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ModelError(
                f"wrn expects images of shape (N, C, H, W), got {tuple(x.shape)}; "
                f"load the dataset with flatten=False"
            )
        return self.head(self.pool(self.blocks(self.stem(x))))
