"""The normalizer zoo: one registry, one construction interface.

>>> from torch import nn
>>> from normprobe import norms
>>> layer = norms.build("batch", nn.Linear(64, 32), act=nn.ReLU())
>>> [name for name, _ in layer.named_children()]
['pre', 'affine', 'norm', 'act']

``build(name, affine)`` returns a :class:`NormedAffine` computing
``act(norm(affine(pre(x))))`` for every normalizer in :data:`NORMS`, whether
it sits after the affine op (batch, layer, ...) or needs its input or weight
(prelayer, weight norm, balanced, ...). Definitions: docs/definitions.md.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from normprobe.errors import NormalizerError
from normprobe.norms.balanced import BalancedAffine, BalancedNorm, balance_signs_, balanced_weight
from normprobe.norms.base import (
    Affine,
    Normalizer,
    NormedAffine,
    NormSpec,
    check_norm_batch,
    out_channels,
)
from normprobe.norms.batch import (
    BatchNorm,
    BatchRenorm,
    BatchTrainNorm,
    BMLVNorm,
    LMBVNorm,
    MeanOnlyBatchNorm,
)
from normprobe.norms.layer import (
    CenterFeatures,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    PreLayerNorm,
    PreRegNorm,
    RegNorm,
    RMSNorm,
    default_groups,
    instance_on_dense_message,
)
from normprobe.norms.weight import apply_scaled_weight_norm, apply_weight_norm
from normprobe.registry import Registry

__all__ = [
    "NORMS",
    "NormSpec",
    "NormedAffine",
    "Normalizer",
    "build",
    "spec",
    "normalizers",
    "describe",
    "label_layers",
    "regularization",
    "penalties",
    "set_total_steps",
    "BatchNorm",
    "BatchTrainNorm",
    "BMLVNorm",
    "LMBVNorm",
    "BatchRenorm",
    "MeanOnlyBatchNorm",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm",
    "RMSNorm",
    "RegNorm",
    "PreLayerNorm",
    "PreRegNorm",
    "CenterFeatures",
    "BalancedAffine",
    "BalancedNorm",
    "balanced_weight",
    "balance_signs_",
]

NORMS: Registry[NormSpec] = Registry("normalizer")


def _post(cls: type[Normalizer]) -> Callable[..., NormedAffine]:
    """Factory for a normalizer that sits between the affine op and the nonlinearity."""

    def factory(affine: Affine, nonlinearity: str = "relu", **options: Any) -> NormedAffine:
        return NormedAffine(affine, cls(out_channels(affine), **options), norm_name=cls.norm_name)

    factory.__signature__ = _signature_with(cls)  # type: ignore[attr-defined]
    return factory


def _signature_with(cls: type) -> inspect.Signature:
    params = [p for p in inspect.signature(cls).parameters.values() if p.kind is p.KEYWORD_ONLY]
    return inspect.Signature(params)


def _none(affine: Affine, nonlinearity: str = "relu") -> NormedAffine:
    return NormedAffine(affine, None, norm_name="none")


def _weight(affine: Affine, nonlinearity: str = "relu") -> NormedAffine:
    return NormedAffine(apply_weight_norm(affine), None, norm_name="weight")


def _scaled_weight(
    affine: Affine, nonlinearity: Literal["relu", "linear"] = "relu"
) -> NormedAffine:
    return NormedAffine(
        apply_scaled_weight_norm(affine, nonlinearity), None, norm_name="scaled-weight"
    )


def _weight_meanbn(
    affine: Affine,
    nonlinearity: str = "relu",
    *,
    eps: float = 1e-5,
    momentum: float = 0.1,
    norm_batch: int | None = None,
) -> NormedAffine:
    norm = MeanOnlyBatchNorm(
        out_channels(affine), eps=eps, momentum=momentum, norm_batch=norm_batch
    )
    return NormedAffine(apply_weight_norm(affine), norm, norm_name="weight-meanbn")


def _group(
    affine: Affine, nonlinearity: str = "relu", *, groups: int | None = None, eps: float = 1e-5
) -> NormedAffine:
    channels = out_channels(affine)
    if groups is None:
        # A dense layer has one value per channel: keep at least two channels per
        # group, or each group would normalize a single value to zero.
        dense = isinstance(affine, nn.Linear)
        groups = default_groups(channels, max_groups=max(1, channels // 2) if dense else 32)
    return NormedAffine(affine, GroupNorm(channels, groups=groups, eps=eps), norm_name="group")


def _prelayer(affine: Affine, nonlinearity: str = "relu", *, eps: float = 1e-5) -> NormedAffine:
    norm = PreLayerNorm(out_channels(affine), eps=eps)
    return NormedAffine(affine, norm, pre=CenterFeatures(), norm_name="prelayer")


def _preregnorm(
    affine: Affine, nonlinearity: str = "relu", *, eps: float = 1e-5, norm_batch: int | None = None
) -> NormedAffine:
    norm = PreRegNorm(out_channels(affine), eps=eps, norm_batch=norm_batch)
    return NormedAffine(affine, norm, pre=CenterFeatures(), norm_name="preregnorm")


def _balanced(
    affine: Affine,
    nonlinearity: str = "relu",
    *,
    momentum: float = 0.1,
    single_pass: bool = True,
    balance_signs: bool = True,
    stat_fraction: float = 1.0,
    norm_batch: int | None = None,
) -> NormedAffine:
    in_channels = affine.in_features if isinstance(affine, nn.Linear) else affine.in_channels
    norm = BalancedNorm(
        out_channels(affine),
        in_channels,
        momentum=momentum,
        single_pass=single_pass,
        stat_fraction=stat_fraction,
        norm_batch=norm_batch,
    )
    if balance_signs:
        balance_signs_(affine.weight)
    return BalancedAffine(affine, norm, norm_name="balanced")


def _register(spec: NormSpec) -> None:
    NORMS.register(spec.name, spec, aliases=spec.aliases)


# One line each: what it normalizes over; what eval mode does; where it comes from.
for _spec in [
    NormSpec(
        "none", "no normalization, z passes unchanged; eval same; baseline", _none, affine_bias=True
    ),
    NormSpec(
        "batch",
        "per channel over the batch (and space); eval uses running mean/var; "
        "BatchNorm, Ioffe & Szegedy 2015 (Rao & Sohl-Dickstein 2020; Arpit's lecture slides)",
        _post(BatchNorm),
        batch_stats=True,
        standalone=BatchNorm,
        aliases=("batchnorm",),
    ),
    NormSpec(
        "batch-train",
        "as batch in train mode; eval uses the eval batch's own statistics; Batch-Train (Rao & Sohl-Dickstein 2020)",
        _post(BatchTrainNorm),
        batch_stats=True,
        standalone=BatchTrainNorm,
    ),
    NormSpec(
        "layer",
        "per example over all channels (and space); eval same; "
        "LayerNorm, Ba et al. 2016 (Rao & Sohl-Dickstein 2020; Arpit's lecture slides)",
        _post(LayerNorm),
        standalone=LayerNorm,
        aliases=("layernorm",),
    ),
    NormSpec(
        "group",
        "per example over groups of min(32, C) channels (and space); eval same; "
        "GroupNorm, Wu & He 2018 (Defazio & Bottou 2018; Rao & Sohl-Dickstein 2020)",
        _group,
        standalone=GroupNorm,
        aliases=("groupnorm",),
    ),
    NormSpec(
        "instance",
        "per example and channel over space, conv only; eval same; "
        "InstanceNorm, Ulyanov et al. 2016 (Rao & Sohl-Dickstein 2020)",
        _post(InstanceNorm),
        dense=False,
        standalone=InstanceNorm,
        aliases=("instancenorm",),
    ),
    NormSpec(
        "weight",
        "weight rows to g * V / ||V||, no activation normalization; eval same; "
        "WeightNorm, Salimans & Kingma 2016 (Rao & Sohl-Dickstein 2020; Arpit's lecture slides)",
        _weight,
        wraps_affine=True,
        affine_bias=True,
        aliases=("weightnorm",),
    ),
    NormSpec(
        "scaled-weight",
        "weight norm times sqrt(2 fan_in / fan_out), g = 1 at init; eval same; "
        "Scaled WeightNorm, Arpit & Bengio 2019 (Arpit's lecture slides)",
        _scaled_weight,
        wraps_affine=True,
        affine_bias=True,
    ),
    NormSpec(
        "weight-meanbn",
        "weight norm then mean-only batch norm; eval uses the running mean; "
        "Salimans & Kingma 2016 (Ioffe 2017; Arpit's lecture slides)",
        _weight_meanbn,
        wraps_affine=True,
        batch_stats=True,
    ),
    NormSpec(
        "bmlv",
        "mean over the batch, variance per example; eval uses the running mean; BMLV (Rao & Sohl-Dickstein 2020)",
        _post(BMLVNorm),
        batch_stats=True,
        standalone=BMLVNorm,
    ),
    NormSpec(
        "lmbv",
        "mean per example, variance over the batch; eval uses the running variance; "
        "LMBV (Rao & Sohl-Dickstein 2020)",
        _post(LMBVNorm),
        batch_stats=True,
        standalone=LMBVNorm,
    ),
    NormSpec(
        "prelayer",
        "affine input centred per example, output divided by its per-example std; "
        "eval same; PreLayerNorm (Rao & Sohl-Dickstein 2020)",
        _prelayer,
        wraps_affine=True,
        aliases=("prelayernorm",),
    ),
    NormSpec(
        "regnorm",
        "layer norm plus a loss term driving each channel's batch mean to zero; "
        "eval same; RegNorm (Rao & Sohl-Dickstein 2020)",
        _post(RegNorm),
        regularized=True,
        standalone=RegNorm,
    ),
    NormSpec(
        "preregnorm",
        "prelayer plus RegNorm's batch-mean loss term; eval same; PreRegNorm (Rao & Sohl-Dickstein 2020)",
        _preregnorm,
        wraps_affine=True,
        regularized=True,
    ),
    NormSpec(
        "batch-renorm",
        "batch statistics corrected by clipped r, d towards moving averages; "
        "eval uses the moving mean/std; Batch Renorm, Ioffe 2017",
        _post(BatchRenorm),
        batch_stats=True,
        standalone=BatchRenorm,
        aliases=("batchrenorm",),
    ),
    NormSpec(
        "rms",
        "per example over all channels (and space), root mean square without centring, "
        "per-channel gain, no shift; eval same; RMSNorm, Zhang & Sennrich 2019",
        _post(RMSNorm),
        affine_bias=True,  # no centring and no shift of its own: the affine op's bias matters
        standalone=RMSNorm,
        aliases=("rmsnorm",),
    ),
    NormSpec(
        "balanced",
        "weights balanced with the batch's input sums per input channel; "
        "eval uses running input sums; BalNorm/EquiNorm (Defazio & Bottou 2018; the ICLR 2019 EquiNorm submission)",
        _balanced,
        wraps_affine=True,
        aliases=("equinorm", "balnorm"),
    ),
]:
    _register(_spec)


def spec(name: str) -> NormSpec:
    """The registry entry for ``name`` (aliases accepted); did-you-mean error if unknown."""
    return NORMS.get(name)


def normalizers() -> list[str]:
    """The registered normalizer names, in a fixed order (aliases excluded)."""
    return NORMS.names()


def describe() -> dict[str, str]:
    """Registry name -> one-line summary."""
    return {name: s.summary for name, s in NORMS.items()}


def options(name: str) -> list[str]:
    """The keyword options the normalizer ``name`` accepts."""
    return list(_options(NORMS.get(name)))


def _options(s: NormSpec) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(s.factory)
    return {n: p for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


def build(
    name: str,
    affine: Affine,
    act: nn.Module | None = None,
    *,
    nonlinearity: Literal["relu", "linear"] | None = None,
    layer_name: str | None = None,
    **options: Any,
) -> NormedAffine:
    """Wrap ``affine`` (a ``Linear`` or ``Conv``) with the normalizer ``name``.

    ``act`` is the nonlinearity applied after normalizing (kept as the child
    ``act``). ``nonlinearity`` says what follows the layer for normalizers
    whose scaling depends on it (scaled weight norm); it defaults to "relu"
    when ``act`` is a ReLU and "linear" otherwise. ``layer_name`` is used in
    error messages. A bias on ``affine`` that the normalizer makes redundant
    (it subtracts a mean and has its own shift) is removed.

    ``norm_batch`` (microbatch or "ghost batch" statistics, see
    :mod:`normprobe.norms.batch`) is an option of every normalizer that looks
    across examples (the batch-statistic ones, RegNorm's penalty, balanced).
    For the others (none, layer, group, instance, rms, weight, scaled-weight,
    prelayer) it is accepted and dropped: their statistics are per example, so
    splitting the batch into microbatches changes nothing, and one
    ``norm_options`` can then serve every normalizer of an analysis. Any other
    option a normalizer does not have is an error.

    >>> from torch import nn
    >>> layer = build("group", nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), groups=8)
    >>> layer.norm.groups
    8
    """
    s = NORMS.get(name)
    if not isinstance(affine, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise NormalizerError(
            f"normalizer {s.name!r} wraps a Linear or Conv layer, got {type(affine).__name__}"
        )
    where = f"layer {layer_name!r}" if layer_name else f"layer {affine}"
    if not s.dense and isinstance(affine, nn.Linear):
        raise NormalizerError(instance_on_dense_message(where))
    valid = _options(s)
    if "norm_batch" not in valid and "norm_batch" in options:
        # per-example statistics: microbatches change nothing (docstring above)
        try:
            check_norm_batch(options.pop("norm_batch"))
        except NormalizerError as err:
            raise NormalizerError(f"{where}: {err}") from None
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise NormalizerError(
                f"normalizer {s.name!r} has no option {key!r}; {hint}"
                f"its options are: {', '.join(valid) or '(none)'}"
            )
    if not s.affine_bias and affine.bias is not None:
        affine.register_parameter("bias", None)
    if nonlinearity is None:
        nonlinearity = "relu" if isinstance(act, nn.ReLU) else "linear"
    try:
        layer = s.factory(affine, nonlinearity=nonlinearity, **options)
    except NormalizerError as err:
        raise NormalizerError(f"{where}: {err}") from None
    if act is not None:
        layer.act = act
    # the normalizer's own parameters and buffers follow the affine op's dtype and device
    weight = next(affine.parameters())
    layer.to(device=weight.device, dtype=weight.dtype)
    if layer_name:
        layer.layer_name = layer_name
        if isinstance(layer.norm, Normalizer):
            layer.norm.layer_name = f"{layer_name}.norm"
    return layer


def label_layers(model: nn.Module) -> nn.Module:
    """Record each normalizer's qualified name in ``model`` so its errors name it."""
    for name, module in model.named_modules():
        if isinstance(module, (NormedAffine, Normalizer)):
            module.layer_name = name
    return model


def penalties(model: nn.Module) -> dict[str, torch.Tensor]:
    """RegNorm-style penalty of each layer from the model's last forward pass, by module name."""
    return {
        name: m.penalty
        for name, m in model.named_modules()
        if getattr(m, "penalty", None) is not None and isinstance(m, Normalizer)
    }


def regularization(model: nn.Module) -> torch.Tensor:
    """``sum_l R_l`` over the RegNorm/PreRegNorm layers of the last forward pass (0 if none).

    The training loss of docs/definitions.md is ``loss + lam * regularization(model)``.
    """
    values = list(penalties(model).values())
    if not values:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack(values).sum()


def set_total_steps(model: nn.Module, total_steps: int) -> int:
    """Scale every Batch Renorm schedule in ``model`` to a run of ``total_steps``; returns the count."""
    count = 0
    for m in model.modules():
        if isinstance(m, BatchRenorm):
            m.total_steps.fill_(int(total_steps))
            count += 1
    return count
