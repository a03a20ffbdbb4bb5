"""Balanced Normalization of weights: BalNorm (Defazio & Bottou 2018) / EquiNorm (the ICLR 2019 EquiNorm submission).

The weight of the affine op is transformed with the sums of its input, so
that the positive and negative weights of each output channel contribute the
same total magnitude ``r`` to the output (Defazio & Bottou 2018, sec. 4.1, single-pass formula):

    v_c   = sum of x over batch and space, per input channel
    b_d   = -sum_c v_c w_dc / (kh * kw * sum_c v_c)        (w_dc = sum_jk w_dcjk)
    s_d   = r / sum_c v_c (w+_dc + b_d n+_dc)               (single pass)
    W''   = s_d (W + b_d),   r = N * H_out * W_out * stride^2

where ``w+_dc`` is the sum of the positive entries of kernel ``(d, c)`` and
``n+_dc`` their count. The two-pass ("full case") variant uses the positive
part of ``W + b_d`` itself. A per-channel affine follows. Dense layers are
1x1 convolutions. Eval mode uses a running estimate of ``v_c``.

Two options change which examples the train-mode ``v_c`` comes from:
``stat_fraction = f`` in (0, 1] estimates it from the first
``k = max(1, floor(f * N))`` examples of the minibatch, scaled to the batch,
``v_c = (N / k) * sum over the first k`` (Defazio & Bottou 2018, sec. 6: "the first quarter of
the batch to compute the statistics used for the full batch", ``f = 0.25``);
the balanced weight is then applied to all N examples. ``norm_batch = g``
(microbatches, as for the batch normalizers) balances each group of g
consecutive examples with its own ``v_c`` (and ``r = g * H_out * W_out *
stride^2``); with both, each group takes its statistics from its own first
fraction. The running input sums move once per forward pass towards the mean
over the used examples (and groups) of the per-example input sums.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.func import functional_call

from normprobe.errors import NormalizerError
from normprobe.norms.base import (
    EPS,
    Normalizer,
    NormedAffine,
    batch_axes,
    check_norm_batch,
    describe_layer,
    group_axes,
    microbatches,
)

__all__ = [
    "BalancedNorm",
    "BalancedAffine",
    "BalancedInputWarning",
    "balance_signs_",
    "balanced_weight",
]


class BalancedInputWarning(UserWarning):
    """A balanced layer saw input channels with a negative sum."""


def balanced_weight(
    weight: torch.Tensor,
    input_sums: torch.Tensor,
    r: float,
    *,
    single_pass: bool = True,
) -> torch.Tensor:
    """The balanced weight ``W'' = s (W + b)`` for weight (D, C, *k) and input sums v (C,).

    A pure function of its arguments, differentiable in both ``weight`` and
    ``input_sums`` (Defazio & Bottou 2018: the transformation is fully differentiated through).
    Denominators within ``EPS`` of zero are held at ``+-EPS``
    (:func:`_away_from_zero`), so an all-zero input gives a zero output, not NaN.
    """
    d_out, c_in = weight.shape[:2]
    kdims = tuple(range(2, weight.dim()))
    k = math.prod(weight.shape[2:]) if kdims else 1
    bshape = (d_out, *([1] * (weight.dim() - 1)))
    w_dc = weight.sum(dim=kdims) if kdims else weight  # (D, C)
    b = -(w_dc @ input_sums) / (k * _away_from_zero(input_sums.sum()))  # (D,)
    shifted = weight + b.reshape(bshape)
    if single_pass:
        positive = weight > 0
        w_plus = torch.where(positive, weight, 0.0)
        w_plus = w_plus.sum(dim=kdims) if kdims else w_plus
        n_plus = positive.sum(dim=kdims) if kdims else positive
        denom = (w_plus + b[:, None] * n_plus.to(weight.dtype)) @ input_sums
    else:
        w_plus = shifted.clamp_min(0)
        denom = (w_plus.sum(dim=kdims) if kdims else w_plus) @ input_sums
    s = r / _away_from_zero(denom)  # (D,)
    return s.reshape(bshape) * shifted


def _away_from_zero(t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``t`` with entries of magnitude below ``eps`` moved to ``+-eps`` (sign kept, 0 -> +eps).

    An input whose channels all sum to zero (one example through dead ReLUs,
    e.g. a quarter of a microbatch of 4) would give 0/0 in ``b`` and ``s``;
    its balanced output is then ``s * (W + b) x = 0`` with finite ``s`` and
    zero gradient, instead of NaN. Real sums are many orders above ``eps``.
    """
    floor = torch.where(t < 0, -eps, eps).to(t.dtype)
    return torch.where(t.abs() < eps, floor, t)


def balance_signs_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Resample the signs of every kernel that is all positive or all negative (Defazio & Bottou 2018, sec. 5.1).

    Kernels are the ``(d, c)`` slices of a conv weight with more than one
    entry; for dense weights and 1x1 convs the whole row of output unit ``d``.
    """
    with torch.no_grad():
        if weight.dim() > 2 and math.prod(weight.shape[2:]) > 1:
            kernels = weight.reshape(weight.shape[0] * weight.shape[1], -1)
        else:
            kernels = weight.reshape(weight.shape[0], -1)
        if kernels.shape[1] < 2:
            return weight
        for _ in range(100):
            uniform = (kernels > 0).all(dim=1) | (kernels < 0).all(dim=1)
            if not uniform.any():
                break
            signs = torch.randint(0, 2, kernels[uniform].shape, generator=generator) * 2 - 1
            kernels[uniform] = kernels[uniform].abs() * signs.to(kernels.dtype)
        weight.copy_(kernels.reshape(weight.shape))
    return weight


class BalancedNorm(Normalizer):
    """The state of a balanced layer: running input sums and the per-channel affine after it.

    ``running_input_sum`` holds the running mean of ``v_c / N`` (the input sum
    per example), so eval mode uses ``v_c = N_eval * running_input_sum`` and
    the result does not depend on the eval batch size. With
    ``track_running_stats = False`` train mode leaves them alone.
    ``stat_fraction`` and ``norm_batch``: see the module docstring.
    """

    norm_name = "balanced"

    def __init__(
        self,
        num_features: int,
        in_channels: int,
        *,
        momentum: float = 0.1,
        single_pass: bool = True,
        eps: float = EPS,
        stat_fraction: float = 1.0,
        norm_batch: int | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps)
        if isinstance(stat_fraction, bool) or not (
            isinstance(stat_fraction, (int, float)) and 0.0 < stat_fraction <= 1.0
        ):
            raise NormalizerError(
                f"balanced: stat_fraction is the fraction of the minibatch (its first examples) "
                f"that the input sums come from and must be in (0, 1], got {stat_fraction!r}; "
                f"e.g. 0.25 for the first quarter (Defazio & Bottou 2018), 1.0 for the whole batch"
            )
        self.stat_fraction = float(stat_fraction)
        self.norm_batch = check_norm_batch(norm_batch)
        self.momentum = momentum
        self.single_pass = single_pass
        self.track_running_stats = True
        self.register_buffer("running_input_sum", torch.ones(in_channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self._inputs_checked = False

    def extra_repr(self) -> str:
        extra = f", stat_fraction={self.stat_fraction}" if self.stat_fraction != 1.0 else ""
        if self.norm_batch is not None:
            extra += f", norm_batch={self.norm_batch}"
        return f"{super().extra_repr()}, single_pass={self.single_pass}{extra}"

    def stat_count(self, n: int) -> int:
        """How many of ``n`` examples (the first ones) the train-mode input sums come from."""
        return max(1, min(n, math.floor(self.stat_fraction * n + 1e-9)))

    def _check_sums(self, v: torch.Tensor) -> None:
        """Warn once if an input channel's sum is negative (first training call only)."""
        self._inputs_checked = True
        bad = int((v < 0).sum())
        if bad:
            warnings.warn(
                f"{describe_layer(self)} (balanced): {bad} of {v.numel()} input channels have a "
                f"negative sum over the batch; balanced normalization assumes non-negative "
                f"inputs (Defazio & Bottou 2018, sec. 5.1) and its scale blows up when a channel sums to about "
                f"zero. Feed it non-negative inputs, e.g. load_dataset(..., normalize='unit')",
                BalancedInputWarning,
                stacklevel=4,
            )

    def input_sums(self, x: torch.Tensor) -> torch.Tensor:
        """``v_c`` for this forward pass: the batch's sums in train mode, running in eval.

        Shape (C,), or (N / norm_batch, C) with one row per microbatch when
        train mode uses microbatches.
        """
        n = x.shape[0]
        if not self.training:
            return self.running_input_sum * n
        xg = microbatches(x, self.norm_batch, self)
        if xg is None:
            per, k = n, self.stat_count(n)
            v = x.sum(dim=batch_axes(x)) if k == n else x[:k].sum(dim=batch_axes(x)) * (n / k)
        else:
            per = xg.shape[1]
            k = self.stat_count(per)
            v = xg[:, :k].sum(dim=group_axes(xg)) * (per / k)
        if not self._inputs_checked:
            self._check_sums(v.detach())
        if self.track_running_stats:
            with torch.no_grad():
                mean_sum = (v.detach() if v.dim() == 1 else v.detach().mean(dim=0)) / per
                self.running_input_sum.mul_(1 - self.momentum).add_(mean_sum, alpha=self.momentum)
                self.num_batches_tracked.add_(1)
        return v

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        return self._affine(z)


class BalancedAffine(NormedAffine):
    """A Linear/Conv layer whose weight is balanced with its input's sums on every call.

    The affine op runs through ``functional_call`` with the balanced weight, so
    hooks on ``affine`` still see its input and output (once per microbatch
    when train mode uses ``norm_batch`` microbatches).
    """

    norm: BalancedNorm

    def __init__(self, affine: nn.Module, norm: BalancedNorm, **kwargs) -> None:
        if getattr(affine, "groups", 1) != 1:
            raise NormalizerError(
                f"balanced normalization needs an ungrouped convolution, got groups={affine.groups}; "
                "use groups=1 or another normalizer"
            )
        super().__init__(affine, norm, **kwargs)

    def effective_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The balanced weight ``W''`` the layer applies to input ``x`` (updates running sums in train mode).

        With microbatches (train mode, ``norm_batch``), one weight per group
        stacked on a new leading axis: (N / norm_batch, *weight.shape).
        """
        if x.dim() != (2 if isinstance(self.affine, nn.Linear) else self.affine.weight.dim()):
            raise NormalizerError(
                f"layer {self.layer_name or ''!s} (balanced) got input of shape {tuple(x.shape)}; "
                f"expected (N, C) for a dense layer or (N, C, H, W) for a conv layer"
            )
        v = self.norm.input_sums(x)
        if v.dim() == 2:
            r = (x.shape[0] // v.shape[0]) * self._outputs_per_example(x)
            return torch.stack(
                [
                    balanced_weight(self.affine.weight, vg, r, single_pass=self.norm.single_pass)
                    for vg in v
                ]
            )
        r = x.shape[0] * self._outputs_per_example(x)
        return balanced_weight(self.affine.weight, v, r, single_pass=self.norm.single_pass)

    def _outputs_per_example(self, x: torch.Tensor) -> float:
        """``H_out * W_out * stride^2`` (1 for dense): the ``r`` of Defazio & Bottou 2018 per example."""
        if isinstance(self.affine, nn.Linear):
            return 1.0
        a = self.affine
        n_spatial = x.dim() - 2
        stride = _tuple(a.stride, n_spatial)
        spatial = x.shape[2:]
        if a.padding == "same":
            out = list(spatial)
        else:
            pad = (0,) * n_spatial if a.padding == "valid" else _tuple(a.padding, n_spatial)
            dil = _tuple(a.dilation, n_spatial)
            out = [
                (spatial[i] + 2 * pad[i] - dil[i] * (a.kernel_size[i] - 1) - 1) // stride[i] + 1
                for i in range(n_spatial)
            ]
        return float(math.prod(out) * math.prod(stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        weight = self.effective_weight(x)
        if weight.dim() == self.affine.weight.dim():
            z = functional_call(self.affine, {"weight": weight}, (x,))
        else:
            groups = x.split(x.shape[0] // weight.shape[0])
            z = torch.cat(
                [
                    functional_call(self.affine, {"weight": w}, (xg,))
                    for w, xg in zip(weight, groups)
                ]
            )
        return self.act(self.norm(z))


def _tuple(v: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
