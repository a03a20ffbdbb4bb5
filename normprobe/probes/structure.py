"""Structural probes: batch dependence, train/eval consistency, signal-propagation statistics.

These feed the measured properties table (:mod:`normprobe.properties`,
Rao & Sohl-Dickstein 2020, Table 2).

- :func:`batch_dependence`: how much the outputs of the first half of a
  minibatch change when the second half is replaced by other examples.
  ``||h_k(X) - h_k(X')|| / ||h_k(X)||`` (Frobenius norms over the kept
  examples ``k``), per layer and at the model's output. A normalizer without
  batch statistics gives exactly 0 (the same arithmetic runs on the kept
  rows); batch statistics (BatchNorm, BMLV, LMBV, Batch Renorm, BalNorm's
  input sums) in train mode give a positive number. Measured in ``mode``
  ("train" as in training; "eval": BatchNorm uses its running statistics and
  is independent of the batch, Batch-Train is not).
- :func:`train_eval_gap`: ``||h_train(X) - h_eval(X)|| / ||h_eval(X)||`` on the
  same batch, per layer and at the output: zero when a network computes the
  same function in training and at test time.
- :func:`signal_statistics`: per depth, the input of each selected layer
  (by default the activation modules, so the pre-activations ``z_hat``),
  summarised as in signal propagation plots (Brock et al. 2021):
  ``signal_sq_mean`` = mean over channels of the squared channel mean and
  ``signal_var`` = mean over channels of the channel variance, both over the
  batch and spatial axes (biased moments). Channels are axis 1 of a 2-D
  ``(N, C)`` or 4-D-and-up ``(N, C, H, W)`` input; a 3-D input is ``(N, C, L)``
  to a 1-D convolution but ``(N, T, D)`` in a transformer, so its channel axis
  is given (``channel_axis=1`` or ``-1``), never guessed.

All three leave the model exactly as found (:func:`~normprobe.probes.capture.session`)
and never update running statistics. Sums run in float64.

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))
>>> x, other = torch.randn(16, 6), torch.randn(16, 6)
>>> batch_dependence(net, x, other)["value"].tolist()   # layer norm: per example
[0.0, 0.0]
>>> net[1] = nn.BatchNorm1d(8)
>>> bool((batch_dependence(net, x, other)["value"] > 0).all())
True
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from normprobe.batch import (
    Inputs,
    batch_size,
    call_model,
    concat,
    inputs_equal,
    prediction,
    same_layout,
    take,
)
from normprobe.batch import (
    layout as _layout,
)
from normprobe.probes.capture import (
    Layers,
    Mode,
    Probe,
    ProbeError,
    check_same_layers,
    inputs_of,
    select_layers,
    session,
    to_model,
)

__all__ = ["batch_dependence", "train_eval_gap", "signal_statistics", "relative_change"]

OUTPUT = "output"


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||a||`` in float64 (0 when both are 0; inf when only ``a`` is).

    >>> relative_change(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0]))
    0.0
    >>> relative_change(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 4.0]))
    0.6
    """
    a, b = a.detach().double(), b.detach().double()
    diff = float(torch.linalg.vector_norm(a - b))
    if diff == 0.0:
        return 0.0
    scale = float(torch.linalg.vector_norm(a))
    return diff / scale if scale > 0 else float("inf")


def _outputs(
    model: nn.Module, x: Inputs, layers: Layers, mode: Mode, seed: int
) -> tuple[list, dict[str, torch.Tensor], torch.Tensor]:
    """One pass: the selected layers' calls, their outputs, and the model's prediction.

    The prediction is read from the outputs by the batch contract's rule
    (:func:`normprobe.batch.prediction`: a tensor, ``.logits``, or a tuple's
    first item).
    """
    with Probe(model, layers, mode=mode, seed=seed) as probe, torch.no_grad():
        out = prediction(probe.run(x), None, ProbeError)
        return probe.calls, probe.activations, out.detach().clone()


def _rows(calls: list, values: dict[str, float], out_value: float, metric: str, mode: str):
    rows = [
        {
            "layer": c.label,
            "depth": c.depth,
            "metric": metric,
            "value": values[c.label],
            "module": c.name,
            "module_type": c.module_type,
            "mode": mode,
        }
        for c in calls
    ]
    rows.append(
        {
            "layer": OUTPUT,
            "depth": len(calls) + 1,
            "metric": metric,
            "value": out_value,
            "module": "",
            "module_type": "output",
            "mode": mode,
        }
    )
    return pd.DataFrame(rows)


def batch_dependence(
    model: nn.Module,
    x: Inputs,
    x_other: Inputs,
    *,
    layers: Layers = None,
    mode: Mode = "train",
    keep: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """How much the first ``keep`` examples' outputs change when the rest of the batch changes.

    ``X`` is ``x``; ``X'`` keeps ``x[:keep]`` and takes its other rows from
    ``x_other`` (a disjoint minibatch of the same shape); ``keep`` defaults to
    half the batch. Both passes run in ``mode`` with the same batch size.
    Returns one row per selected layer call (default rule: the activation
    modules) and one for the model's output (``layer`` "output"), metric
    ``batch_dependence``, value ``||h(X)[:keep] - h(X')[:keep]|| / ||h(X)[:keep]||``.
    """
    x = to_model(inputs_of(x, "x"), model)
    x_other = to_model(inputs_of(x_other, "x_other"), model)
    n = batch_size(x, None, "x", ProbeError)
    if n < 2:
        raise ProbeError(
            f"batch_dependence needs a minibatch of at least 2 examples (one kept, one "
            f"replaced), got {n}"
        )
    differs = same_layout(x, x_other)
    if differs is not None:
        raise ProbeError(
            f"x_other must have the shape of x, {_layout(x)}, got {_layout(x_other)}; take "
            f"two disjoint minibatches of the same size"
        )
    keep = n // 2 if keep is None else keep
    if not 1 <= keep < n:
        raise ProbeError(f"keep must be between 1 and {n - 1} (the batch size minus 1), got {keep}")
    mixed = concat([take(x, slice(None, keep)), take(x_other, slice(keep, None))])
    if inputs_equal(mixed, x):
        raise ProbeError(
            "x_other's rows after keep equal x's; batch_dependence needs a disjoint minibatch"
        )
    calls, first, out = _outputs(model, x, layers, mode, seed)
    calls_b, second, out_b = _outputs(model, mixed, layers, mode, seed)
    check_same_layers(calls, calls_b, "the two minibatches")
    values = {
        c.label: relative_change(first[c.label][:keep], second[c.label][:keep]) for c in calls
    }
    return _rows(calls, values, relative_change(out[:keep], out_b[:keep]), "batch_dependence", mode)


def train_eval_gap(
    model: nn.Module,
    x: Inputs,
    *,
    layers: Layers = None,
    seed: int = 0,
) -> pd.DataFrame:
    """``||h_train(X) - h_eval(X)|| / ||h_eval(X)||`` per layer and at the output, one batch.

    The train-mode pass uses batch statistics without updating running
    statistics (dropout off in both passes), so the gap is what switching
    ``model.eval()`` changes. Metric ``train_eval_gap``, ``mode`` "train-eval".
    """
    x = to_model(inputs_of(x, "x"), model)
    calls, train, out = _outputs(model, x, layers, "train", seed)
    calls_e, evals, out_e = _outputs(model, x, layers, "eval", seed)
    check_same_layers(calls, calls_e, "the train-mode and eval-mode passes")
    values = {c.label: relative_change(evals[c.label], train[c.label]) for c in calls}
    return _rows(calls, values, relative_change(out_e, out), "train_eval_gap", "train-eval")


def signal_statistics(
    model: nn.Module,
    x: Inputs,
    *,
    layers: Layers = None,
    mode: Mode = "train",
    seed: int = 0,
    channel_axis: int | None = None,
) -> pd.DataFrame:
    """Signal-propagation statistics of each selected layer's input, by depth.

    Default layers: the activation modules (so the statistics are of the
    pre-activations), else the normalization modules, else Linear/Conv.
    Two rows per layer call: ``signal_sq_mean`` (mean over channels of the
    squared channel mean) and ``signal_var`` (mean over channels of the
    channel variance); moments over every axis but the channels'.

    ``channel_axis``: the axis of the channels in the layers' inputs. None
    (the default) takes axis 1 of a 2-D ``(N, C)`` or 4-D-and-up
    ``(N, C, H, W, ...)`` input and refuses a 3-D one, which is ``(N, C, L)``
    before a 1-D convolution and ``(N, T, D)`` in a transformer: pass
    ``channel_axis=1`` for the first, ``-1`` for the second.

    >>> torch.manual_seed(0) and None
    >>> seq = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    >>> x = torch.randn(8, 5, 4)  # (N, T, D)
    >>> len(signal_statistics(seq, x, channel_axis=-1))
    2
    >>> signal_statistics(seq, x)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    normprobe.probes.capture.ProbeError: layer '1' gets a 3-D input (8, 5, 6), whose channel axis ...
    """
    if channel_axis is not None and (
        isinstance(channel_axis, bool) or not isinstance(channel_axis, int)
    ):
        raise ProbeError(f"channel_axis must be an axis (an integer) or None, got {channel_axis!r}")
    x = to_model(inputs_of(x, "x"), model)
    selected = select_layers(model, layers)
    records: list[tuple[str, str, torch.Tensor]] = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                moments = _moments(name, args[0], channel_axis)
                records.append((name, type(module).__name__, moments))

        return record

    with session(model, mode, seed), torch.no_grad():
        handles = [m.register_forward_pre_hook(hook(name)) for name, m in selected.items()]
        try:
            call_model(model, x, ProbeError)
        finally:
            for handle in handles:
                handle.remove()
    if not records:
        raise ProbeError(
            f"none of the selected layers ({', '.join(list(selected)[:6])}) ran in the forward "
            f"pass; name the layers to probe with layers=..."
        )
    rows, seen = [], {}
    for depth, (name, module_type, (sq_mean, var)) in enumerate(records, start=1):
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name}#{seen[name]}"
        for metric, value in (("signal_sq_mean", sq_mean), ("signal_var", var)):
            rows.append(
                {
                    "layer": label,
                    "depth": depth,
                    "metric": metric,
                    "value": value,
                    "module": name,
                    "module_type": module_type,
                    "mode": mode,
                }
            )
    return pd.DataFrame(rows)


def _moments(name: str, z: torch.Tensor, channel_axis: int | None) -> tuple[float, float]:
    if z.dim() < 2 or z.shape[0] < 1:
        raise ProbeError(
            f"layer {name!r} got an input of shape {tuple(z.shape)}; signal statistics need "
            f"(N, C, ...) with channels on axis 1"
        )
    if channel_axis is None:
        if z.dim() == 3:
            raise ProbeError(
                f"layer {name!r} gets a 3-D input {tuple(z.shape)}, whose channel axis is axis 1 "
                f"for a 1-D convolution's (N, C, L) but the last for a sequence's (N, T, D); "
                f"pass channel_axis=1 or channel_axis=-1 (probes.signal.channel_axis in a config)"
            )
        channel_axis = 1
    if not -z.dim() < channel_axis < z.dim() or channel_axis % z.dim() == 0:
        raise ProbeError(
            f"channel_axis={channel_axis} is not a channel axis of layer {name!r}'s input "
            f"{tuple(z.shape)} (axis 0 is the batch); use 1 to {z.dim() - 1}, or -1 for the last"
        )
    z = z.detach().double().movedim(channel_axis, 0)
    z = z.reshape(z.shape[0], -1)
    mean = z.mean(dim=1)
    var = (z - mean[:, None]).square().mean(dim=1)
    return float(mean.square().mean()), float(var.mean())
