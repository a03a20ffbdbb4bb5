"""Normalizers with per-example statistics: layer, group, instance, RMS, RegNorm, PreLayerNorm.

None of these look across the batch, so train and eval mode are the same.
``layer``, ``group``, ``instance`` and ``rms`` call torch's kernels and so equal
``GroupNorm(1, C)``, ``GroupNorm(G, C)``, ``InstanceNorm2d(affine=True)`` and
``RMSNorm``.
RegNorm and PreRegNorm also record the batch-mean penalty of docs/definitions.md
(Rao & Sohl-Dickstein 2020, sec. 3.2) for :func:`normprobe.norms.regularization`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normprobe.errors import NormalizerError
from normprobe.norms.base import (
    EPS,
    Normalizer,
    batch_axes,
    channel_view,
    check_norm_batch,
    describe_layer,
    feature_axes,
    group_axes,
    microbatches,
)

__all__ = [
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm",
    "RMSNorm",
    "RegNorm",
    "PreLayerNorm",
    "PreRegNorm",
    "CenterFeatures",
    "default_groups",
]


class LayerNorm(Normalizer):
    """``(z - mean_F z) / sqrt(var_F z + eps)`` per example, per-channel affine; ``GroupNorm(1, C)``."""

    norm_name = "layer"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        return F.group_norm(z, 1, self.weight, self.bias, self.eps)


class RMSNorm(Normalizer):
    """RMSNorm (Zhang & Sennrich 2019): ``z / sqrt(mean_F z^2 + eps)`` with a per-channel gain.

    No mean is subtracted and there is no shift (``bias`` is None). The mean
    of squares is over the feature axes, (C) dense and (C, *spatial) conv, as
    for ``layer``, so a dense layer equals ``torch.nn.RMSNorm(C)`` and a conv
    layer equals ``torch.nn.RMSNorm((C, H, W))`` with its gain repeated over
    (H, W). ``eps`` defaults to 1e-5 (docs/definitions.md); ``eps=None`` takes torch's
    own default, the machine epsilon of the input's dtype. A sequence
    ``(N, T, D)`` is normalized per position by passing it as ``(N * T, D)``.

    >>> norm = RMSNorm(4)
    >>> norm(torch.tensor([[3.0, -3.0, 3.0, -3.0]])).round(decimals=3)
    tensor([[ 1., -1.,  1., -1.]], grad_fn=<RoundBackward1>)
    """

    norm_name = "rms"

    def __init__(self, num_features: int, *, eps: float | None = EPS) -> None:
        if eps is not None and (
            isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1
        ):
            raise NormalizerError(
                f"rms norm eps must be a number in [0, 1) or None (torch's default, the machine "
                f"epsilon of the input's dtype), got {eps!r}; e.g. eps=1e-5"
            )
        super().__init__(num_features, eps=eps, affine=False)
        self.weight = nn.Parameter(torch.ones(num_features))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        if z.dim() == 2:  # one value per channel: torch's kernel applies the gain itself
            return F.rms_norm(z, z.shape[1:], self.weight, self.eps)
        u = F.rms_norm(z, z.shape[1:], None, self.eps)
        return u if self.weight is None else u * channel_view(self.weight, u)


def default_groups(num_channels: int, max_groups: int = 32) -> int:
    """The largest group count <= ``max_groups`` that divides ``num_channels``.

    This is ``min(32, C)`` whenever that divides C (docs/definitions.md), and stays
    usable for channel counts such as 48 or 100 that 32 does not divide.
    """
    for g in range(min(max_groups, 32, num_channels), 0, -1):
        if num_channels % g == 0:
            return g
    return 1


class GroupNorm(Normalizer):
    """GroupNorm (Wu & He): statistics per example over each group of channels (and space)."""

    norm_name = "group"

    def __init__(self, num_features: int, *, groups: int | None = None, eps: float = EPS) -> None:
        super().__init__(num_features, eps=eps)
        if groups is None:
            groups = default_groups(num_features)
        if not isinstance(groups, int) or groups < 1 or num_features % groups != 0:
            divisors = [g for g in range(1, min(num_features, 64) + 1) if num_features % g == 0]
            raise NormalizerError(
                f"group norm with groups={groups!r} cannot split {num_features} channels evenly; "
                f"choose groups from the divisors of {num_features} ({', '.join(map(str, divisors))}"
                f"{', ...' if num_features > 64 else ''}) or leave groups unset for "
                f"{default_groups(num_features)}"
            )
        self.groups = groups

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        per_group = z[0].numel() // self.groups
        if per_group < 2:
            raise NormalizerError(
                f"{describe_layer(self)} (group) has {self.num_features // self.groups} channel(s) "
                f"per group and input of shape {tuple(z.shape)}, so each group normalizes a single "
                f"value and the output is the shift alone; use fewer groups "
                f"(groups={max(1, self.groups // 2)} or less) or 'layer'"
            )
        return F.group_norm(z, self.groups, self.weight, self.bias, self.eps)


class InstanceNorm(Normalizer):
    """Instance norm: statistics over the spatial axes per example and channel (conv only)."""

    norm_name = "instance"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        if z.dim() < 3:
            raise NormalizerError(instance_on_dense_message(self))
        return F.instance_norm(
            z, None, None, self.weight, self.bias, use_input_stats=True, eps=self.eps
        )


def instance_on_dense_message(where: nn.Module | str) -> str:
    layer = where if isinstance(where, str) else describe_layer(where)
    return (
        f"{layer} is dense, but instance norm needs spatial axes (it normalizes each channel of "
        f"each example over height and width, and a dense layer has one value per channel); "
        f"use 'layer' or 'group' for dense layers, or a conv model such as 'wrn'"
    )


class _Penalized(Normalizer):
    """A normalizer that records RegNorm's batch-mean penalty of its last forward pass.

    ``penalty`` is ``mean over channels of (mean_B u)^2`` for the normalized,
    pre-affine output ``u`` (Rao & Sohl-Dickstein 2020, eq. 3, docs/definitions.md); it is zero exactly when
    every channel has zero batch mean. It holds the autograd graph of the last
    forward pass so it can join the loss, and is left out of pickles and
    deep copies.

    The normalization itself is per example, but the penalty's ``mean_B`` is a
    batch statistic: with ``norm_batch = g`` (microbatches, as for the batch
    normalizers) train mode computes it per group of g consecutive examples and
    ``penalty`` is the mean over groups of the group penalties, i.e. the mean
    over groups and channels of ``(mean_group u)^2``. Eval mode, and
    ``norm_batch`` None or equal to N, use the whole batch.
    """

    def __init__(
        self, num_features: int, *, eps: float = EPS, norm_batch: int | None = None
    ) -> None:
        super().__init__(num_features, eps=eps)
        self.norm_batch = check_norm_batch(norm_batch)
        self.penalty: torch.Tensor | None = None

    def _record(self, u: torch.Tensor) -> None:
        ug = microbatches(u, self.norm_batch, self) if self.training else None
        if ug is not None:
            self.penalty = ug.mean(dim=group_axes(ug)).square().mean()
            return
        self.penalty = u.mean(dim=batch_axes(u)).square().mean()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__().copy()
        state["penalty"] = None
        return state


class RegNorm(_Penalized):
    """RegNorm (Rao & Sohl-Dickstein 2020, sec. 3.2): ``layer`` normalization plus the batch-mean penalty."""

    norm_name = "regnorm"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        u = F.group_norm(z, 1, None, None, self.eps)
        self._record(u)
        return self._affine(u)


class PreLayerNorm(Normalizer):
    """The after-affine half of PreLayerNorm (Rao & Sohl-Dickstein 2020, sec. 3.1): ``z / sqrt(var_F z + eps)``.

    No mean is subtracted here: the mean was removed from the affine op's
    input by :class:`CenterFeatures`.
    """

    norm_name = "prelayer"

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        var = z.var(dim=feature_axes(z), correction=0, keepdim=True)
        return z * torch.rsqrt(var + self.eps)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self._affine(self._normalize(z))


class PreRegNorm(PreLayerNorm, _Penalized):
    """PreRegNorm (Rao & Sohl-Dickstein 2020): PreLayerNorm plus RegNorm's batch-mean penalty on ``z / std_F z``."""

    norm_name = "preregnorm"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        u = self._normalize(z)
        self._record(u)
        return self._affine(u)


class CenterFeatures(nn.Module):
    """``x - mean_F x`` per example: PreLayerNorm's centring of the affine op's input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=feature_axes(x), keepdim=True)
