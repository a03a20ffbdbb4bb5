"""Shared pieces of the normalizer zoo: axes, moments, the layer wrapper.

Every normalizer is built the same way, whatever it needs: ``build(name,
affine)`` returns a :class:`NormedAffine` that owns the affine op (``Linear``
or ``Conv2d``) and computes ``act(norm(affine(pre(x))))``. Normalizers that act
on the affine op's output (batch, layer, bmlv, ...) live in ``norm``; those
that need the input or the weight (prelayer, weight norm, balanced, ...) use
``pre``, a parametrization of ``affine.weight``, or a subclass. Model builders
therefore never special-case a normalizer name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from normprobe.errors import NormalizerError

__all__ = [
    "EPS",
    "Affine",
    "NormSpec",
    "NormedAffine",
    "Normalizer",
    "batch_axes",
    "feature_axes",
    "channel_view",
    "describe_layer",
    "check_norm_batch",
    "microbatches",
    "group_axes",
]

EPS = 1e-5

Affine = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
Nonlinearity = Literal["relu", "linear"]


def batch_axes(z: torch.Tensor) -> tuple[int, ...]:
    """Axes of the per-channel batch statistics: (N) dense, (N, *spatial) conv."""
    return (0, *range(2, z.dim()))


def feature_axes(z: torch.Tensor) -> tuple[int, ...]:
    """Axes of the per-example feature statistics: (C) dense, (C, *spatial) conv."""
    return tuple(range(1, z.dim()))


def channel_view(v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Reshape a per-channel vector (C,) to broadcast against ``z`` (N, C, ...)."""
    return v.reshape(1, -1, *([1] * (z.dim() - 2)))


def describe_layer(module: nn.Module) -> str:
    """The layer's name in its model if known (set by :func:`label_layers`), else its repr."""
    name = getattr(module, "layer_name", None)
    if name:
        return f"layer {name!r}"
    return f"layer {module.__class__.__name__}({getattr(module, 'num_features', '?')})"


def check_norm_batch(norm_batch: int | None) -> int | None:
    """Validate the ``norm_batch`` option: None (the whole minibatch) or an int >= 2."""
    if norm_batch is None:
        return None
    if isinstance(norm_batch, bool) or not isinstance(norm_batch, int) or norm_batch < 2:
        raise NormalizerError(
            f"norm_batch must be None (statistics over the whole minibatch) or an integer >= 2 "
            f"(the examples per microbatch; batch statistics need at least 2), got {norm_batch!r}"
        )
    return norm_batch


def microbatches(z: torch.Tensor, norm_batch: int | None, module: nn.Module) -> torch.Tensor | None:
    """``z`` (N, C, ...) viewed as (N / norm_batch, norm_batch, C, ...), or None for one group.

    None when ``norm_batch`` is None or equals N: the caller then takes its
    plain whole-batch path, so ``norm_batch = N`` is the plain layer bit for
    bit. Groups are consecutive examples. Raises an error naming the layer when
    N is not a multiple of ``norm_batch``.
    """
    if norm_batch is None or z.shape[0] == norm_batch:
        return None
    n = int(z.shape[0])
    if n % norm_batch:
        raise NormalizerError(
            f"{describe_layer(module)} ({getattr(module, 'norm_name', '')}) normalizes "
            f"microbatches of norm_batch={norm_batch} examples but got a batch of {n}, which is "
            f"not a multiple of {norm_batch}; use a batch size that is a multiple of "
            f"{norm_batch} (drop the last incomplete batch), or set norm_batch to a divisor of "
            f"{n} (None: the whole batch)"
        )
    return z.reshape(n // norm_batch, norm_batch, *z.shape[1:])


def group_axes(zg: torch.Tensor) -> tuple[int, ...]:
    """Batch axes inside each microbatch of ``zg`` (G, g, C, *spatial): (g, *spatial)."""
    return (1, *range(3, zg.dim()))


class Normalizer(nn.Module):
    """Base of the activation normalizers that sit between the affine op and the nonlinearity.

    Subclasses work on dense ``(N, C)`` and conv ``(N, C, *spatial)`` inputs
    with channels on axis 1. ``layer_name`` is filled in by ``label_layers`` so
    errors can say which layer of a model is misused.
    """

    #: marks normalization modules for code that must not import normprobe.norms
    #: (probes select "every normalization module" by this flag or torch's norm types)
    is_normalizer: bool = True
    #: registry name, set by the subclass
    norm_name: str = ""
    #: whether train mode normalizes with statistics over the batch axis
    uses_batch_stats: bool = False

    def __init__(self, num_features: int, *, eps: float = EPS, affine: bool = True) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise NormalizerError(
                f"{self.__class__.__name__} needs a positive channel count, got {num_features!r}"
            )
        self.num_features = num_features
        self.eps = eps
        self.layer_name: str | None = None
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def _check_input(self, z: torch.Tensor) -> None:
        if z.dim() < 2 or z.shape[1] != self.num_features:
            raise NormalizerError(
                f"{describe_layer(self)} ({self.norm_name}) expects input of shape "
                f"(N, {self.num_features}, ...) with channels on axis 1, got {tuple(z.shape)}; "
                f"check that the preceding affine op has {self.num_features} outputs"
            )
        if self.uses_batch_stats and self._batch_stats_now() and _values_per_channel(z) < 2:
            raise NormalizerError(
                f"{describe_layer(self)} ({self.norm_name}) computes batch statistics but got a "
                f"batch of {z.shape[0]} example(s) of shape {tuple(z.shape[1:])}; batch "
                f"statistics need at least 2 examples: use a larger batch, or call model.eval() "
                f"to use the running statistics"
            )

    def _batch_stats_now(self) -> bool:
        """Whether this forward pass uses batch statistics (train mode by default)."""
        return self.training

    def _affine(self, u: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return u
        return u * channel_view(self.weight, u) + channel_view(self.bias, u)


def _values_per_channel(z: torch.Tensor) -> int:
    # docs/definitions.md: N = 1 in train mode is an error for every batch-statistic
    # normalizer, also for conv layers where (H, W) would give more than one value.
    return int(z.shape[0])


class NormedAffine(nn.Module):
    """An affine op with its normalizer: ``act(norm(affine(pre(x))))``.

    Children: ``pre`` (Identity unless the normalizer transforms the input),
    ``affine`` (the ``Linear``/``Conv`` op, possibly with a weight
    parametrization), ``norm`` (the activation normalizer or Identity) and
    ``act`` (the nonlinearity or Identity). ``norm_name`` is the registry name.
    """

    def __init__(
        self,
        affine: Affine,
        norm: nn.Module | None = None,
        *,
        pre: nn.Module | None = None,
        act: nn.Module | None = None,
        norm_name: str = "none",
    ) -> None:
        super().__init__()
        self.pre = pre if pre is not None else nn.Identity()
        self.affine = affine
        self.norm = norm if norm is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()
        self.norm_name = norm_name
        self.layer_name: str | None = None

    @property
    def is_conv(self) -> bool:
        return not isinstance(self.affine, nn.Linear)

    @property
    def out_channels(self) -> int:
        return out_channels(self.affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.affine(self.pre(x))))

    def extra_repr(self) -> str:
        return f"norm={self.norm_name!r}"


def out_channels(affine: nn.Module) -> int:
    """The output channels (features) of a Linear or Conv affine op."""
    if isinstance(affine, nn.Linear):
        return affine.out_features
    return affine.out_channels


@dataclass(frozen=True)
class NormSpec:
    """One registry entry: how to build the normalizer and what it is.

    ``factory(affine, nonlinearity=..., **options)`` returns a
    :class:`NormedAffine`. ``summary`` is the one-line description shown by
    ``normprobe list``: what it normalizes over, what eval mode does, and the
    seed it comes from. ``standalone`` builds the bare activation normalizer
    from a channel count (None for normalizers that need the affine op), which
    is what norm swapping in user models uses.
    """

    name: str
    summary: str
    factory: Callable[..., NormedAffine]
    wraps_affine: bool = False
    batch_stats: bool = False
    affine_bias: bool = False
    dense: bool = True
    regularized: bool = False
    standalone: Callable[..., nn.Module] | None = None
    aliases: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
