"""The dataset container every loader returns, and the shared normalization."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Dataset", "Split", "standardize"]


@dataclass(frozen=True)
class Split:
    """One split: inputs ``x`` (float32) and integer class labels ``y`` (int64).

    For next-token prediction (``text``) ``x`` holds int64 token windows and
    ``y`` the next token at every position, both ``(N, T)``.
    """

    x: torch.Tensor  # (N, *input_shape)
    y: torch.Tensor  # (N,); (N, T) for next-token targets

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __iter__(self):  # allows ``x, y = split``
        return iter((self.x, self.y))


@dataclass(frozen=True)
class Dataset:
    """Train and test splits of a classification dataset, already normalized.

    ``input_shape`` is the shape of one example (``(64,)`` for flattened digits,
    ``(3, 32, 32)`` for CIFAR-10); ``info`` records how the data was made
    (source, normalization statistics, options) so it can go into a results
    manifest.
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.train)}, test={len(self.test)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def standardize(
    train_x: torch.Tensor, test_x: torch.Tensor, *, channel_dim: int | None = 1
) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[float]]]:
    """Subtract the per-channel mean and divide by the per-channel std of the train split.

    ``channel_dim=None`` uses one scalar mean/std over all features (flattened
    inputs of a single-channel image). The statistics come from the training
    split only and are applied to both splits, so the test set leaks nothing.
    """
    if channel_dim is None:
        mean = train_x.mean()
        std = train_x.std()
        if not std > 0:  # constant inputs: only centre them, as the per-channel branch does
            std = torch.ones_like(std)
        stats = {"mean": [float(mean)], "std": [float(std)]}
        return (train_x - mean) / std, (test_x - mean) / std, stats
    dims = [d for d in range(train_x.dim()) if d != channel_dim]
    mean = train_x.mean(dim=dims, keepdim=True)
    std = train_x.std(dim=dims, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    stats = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    return (train_x - mean) / std, (test_x - mean) / std, stats
