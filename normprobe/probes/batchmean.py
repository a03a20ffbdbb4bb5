"""The batch mean of each normalization layer's output: RegNorm's regularizer value.

For a normalization layer ``l`` with normalized, pre-affine output ``u_l``
(docs/definitions.md, RegNorm loss term; Rao & Sohl-Dickstein 2020, sec. 3.2 and appendix figure 11)::

    R_l = mean over channels of (mean over the batch (and space) of u_l)^2

RegNorm adds ``lambda * sum_l R_l`` to the loss, so through training its
``R_l`` is driven to zero and the network behaves like ``bmlv``; a LayerNorm
network, which has the same normalization but no such term, keeps a non-zero
batch mean. Batch Norm's ``R_l`` is zero in train mode by construction.

``u_l`` is the layer's output with its per-channel affine switched off (the
layer is called again on its recorded input with ``weight`` and ``bias`` set
to None), so the value does not depend on the learned gain and shift. For a
layer with microbatches (``norm_batch = g``) in train mode, the mean is taken
per group of ``g`` consecutive examples and ``R_l`` is the mean over groups,
as in RegNorm's penalty. Channels are axis 1 (``(N, C, *spatial)``), except
for ``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm``, whose channels are their
``normalized_shape`` axes.

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
>>> frame = batch_mean(net, torch.randn(32, 6))
>>> frame[["layer", "depth", "metric"]].values.tolist()
[['1', 1, 'batch_mean_sq']]
>>> float(frame["value"].iloc[0]) < 1e-12    # Batch Norm centres every channel of the batch
True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
import torch
from torch import nn

from normprobe.batch import Inputs, call_model
from normprobe.probes.capture import Mode, ProbeError, inputs_of, is_normalizer, session, to_model

__all__ = ["batch_mean", "batch_mean_sq"]


def batch_mean_sq(
    u: torch.Tensor, channel_axes: tuple[int, ...], group: int | None = None
) -> float:
    """``mean over channels of (mean over the other axes of u)^2``, per group of ``group`` rows.

    >>> u = torch.tensor([[1.0, 2.0], [3.0, -2.0]])     # channel means 2 and 0
    >>> batch_mean_sq(u, (1,))
    2.0
    >>> batch_mean_sq(u, (1,), group=1)                  # each row on its own: (1+4+9+4)/4
    4.5
    """
    n = u.shape[0]
    if group is not None and group < n and n % group == 0:
        u = u.reshape(n // group, group, *u.shape[1:])
        channel_axes = tuple(a + 1 for a in channel_axes)
        reduce = tuple(a for a in range(1, u.dim()) if a not in channel_axes)
        return float(u.mean(dim=reduce).square().mean())
    reduce = tuple(a for a in range(u.dim()) if a not in channel_axes)
    return float(u.mean(dim=reduce).square().mean())


def _channel_axes(module: nn.Module, u: torch.Tensor) -> tuple[int, ...]:
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        k = len(module.normalized_shape)
        return tuple(range(u.dim() - k, u.dim()))
    if u.dim() < 2:
        raise ProbeError(
            f"normalization layer {type(module).__name__} gave an output of shape "
            f"{tuple(u.shape)}; batch_mean needs (N, C, ...)"
        )
    return (1,)


@contextmanager
def _affine_off(module: nn.Module) -> Iterator[None]:
    """``module.weight`` and ``module.bias`` set to None (and put back), so it skips its affine."""
    saved = {k: module._parameters[k] for k in ("weight", "bias") if k in module._parameters}
    try:
        for key in saved:
            module._parameters[key] = None
        yield
    finally:
        module._parameters.update(saved)


def batch_mean(model: nn.Module, x: Inputs, *, mode: Mode = "train", seed: int = 0) -> pd.DataFrame:
    """``R_l`` (metric ``batch_mean_sq``) of every normalization layer on minibatch ``x``.

    One row per call of a normalization layer, in call order (``depth`` 1,
    2, ...; a layer called twice gets two rows, named ``layer#2`` the second
    time). ``mode``: "train" (batch statistics, as in training; the default)
    or "eval". The model is left exactly as found (see
    :func:`normprobe.probes.capture.session`).
    """
    norms = {m: name for name, m in model.named_modules() if is_normalizer(m)}
    if not norms:
        raise ProbeError(
            "batch_mean found no normalization layers in the model (torch's norm layers or "
            "modules whose class sets is_normalizer = True)"
        )
    calls: list[tuple[nn.Module, torch.Tensor]] = []

    def record(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            calls.append((module, args[0].detach()))

    with session(model, mode, seed), torch.no_grad():
        handles = [m.register_forward_pre_hook(record) for m in norms]
        try:
            call_model(model, to_model(inputs_of(x, "x"), model), ProbeError)
        finally:
            for handle in handles:
                handle.remove()
        rows, seen = [], {}
        for depth, (module, z) in enumerate(calls, start=1):
            with _affine_off(module):
                u = module(z)
            if isinstance(u, tuple):
                u = u[0]
            group = getattr(module, "norm_batch", None) if module.training else None
            name = norms[module]
            seen[name] = seen.get(name, 0) + 1
            rows.append(
                {
                    "layer": name if seen[name] == 1 else f"{name}#{seen[name]}",
                    "depth": depth,
                    "metric": "batch_mean_sq",
                    "value": batch_mean_sq(u, _channel_axes(module, u), group),
                    "mode": mode,
                }
            )
    return pd.DataFrame(rows)
