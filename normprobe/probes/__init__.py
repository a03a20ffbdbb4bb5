"""Probes that hook into any ``torch.nn.Module`` (docs/definitions.md, Probes 1-3).

- :func:`representation_correlation`: how similar two minibatches' representations
  stay with depth (pairings ``noise``, ``independent``, ``within``);
- :func:`gradient_correlation`: cosine of two minibatches' gradients per layer;
- :func:`gradient_norms` and :func:`growth_rate`: gradient norm with depth and
  its per-layer growth towards the input;
- :func:`batch_mean`: each normalization layer's batch mean, RegNorm's regularizer value;
- :func:`batch_dependence`, :func:`train_eval_gap`, :func:`signal_statistics`:
  structural probes for the properties table (:mod:`normprobe.probes.structure`);
- :class:`Probe`: the context manager they are built on, for writing new probes.

Inputs and batches follow one contract (:mod:`normprobe.batch`): a tensor, a
tuple of tensors (positional) or a dict (keyword arguments), with targets
for the gradient probes; layers are chosen by role (:mod:`normprobe.roles`)
and the ``layer_rule`` column says how.

Each probe returns a tidy ``pandas.DataFrame`` (columns ``layer``, ``depth``,
``metric``, ``value``, ...), runs the model in train mode by default (batch
statistics, as in training) without updating running statistics, and leaves
the model exactly as found. This package never imports ``normprobe.norms`` or
``normprobe.models``: it recognises layers by torch type and by the
``is_normalizer`` class flag.

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
>>> frame = representation_correlation(net, torch.randn(16, 8), pairing="within")
>>> frame.columns[:4].tolist()
['layer', 'depth', 'metric', 'value']
"""

from __future__ import annotations

from normprobe.probes.batchmean import batch_mean
from normprobe.probes.capture import LayerCall, Layers, Mode, Probe, ProbeError, select_layers
from normprobe.probes.gradients import (
    LossFn,
    gradient_correlation,
    gradient_norms,
    gradient_statistics,
    growth_rate,
)
from normprobe.probes.signal import PAIRINGS, Pairing, representation_correlation
from normprobe.probes.structure import batch_dependence, signal_statistics, train_eval_gap

__all__ = [
    "representation_correlation",
    "gradient_correlation",
    "gradient_norms",
    "gradient_statistics",
    "growth_rate",
    "batch_mean",
    "batch_dependence",
    "train_eval_gap",
    "signal_statistics",
    "Probe",
    "LayerCall",
    "select_layers",
    "PAIRINGS",
    "Pairing",
    "Layers",
    "Mode",
    "LossFn",
    "ProbeError",
]
