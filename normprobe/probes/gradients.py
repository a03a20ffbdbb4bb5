"""Gradient probes: gradient correlation (Rao & Sohl-Dickstein 2020, sec. 4.2, 5) and gradient norm with depth (sec. 4.3).

Both take the gradient of the mean loss ``loss_fn(model(x), y)`` with respect
to each layer's parameters, for all layers at once with one
``torch.autograd.grad`` call per batch (``.grad`` fields are never touched).

Which tensors: a layer's *weight* is the weight tensor the layer applies in
the forward pass, as autograd sees it: the parameter itself for a plain
Linear/Conv, the effective ``W = g V / ||V||`` for weight-normalized layers
(``torch.nn.utils.parametrize``), the masked ``weight_orig * weight_mask`` for
layers pruned by ``torch.nn.utils.prune``, and the balanced ``W''`` for balanced layers
that call their affine op through ``torch.func.functional_call``. Its gradient
is ``sum over the batch of dL/dz x^T`` for every normalizer, which makes the
norms comparable across normalizers. A layer's *parameters* (for gradient
correlation) are that weight and the bias it applies, if any. A module called
several times in a pass contributes one row: the gradient with respect to its
weight sums the uses.

Default layers: every module owning a weight that runs (Linear, Conv,
Hugging Face's ``Conv1D``, a user's own layer; :mod:`normprobe.roles`), in
execution order (depth 1 is nearest the input; depth is the rank of a
module's first call). ``embeddings=True`` and ``norms=True`` take
embeddings and normalization gains too, ``frozen=False`` leaves out frozen
weights (taken by default, as before; the Hessian's defaults are the
opposite: embeddings and norms in, frozen out), with the options of the same
names as the Hessian's; the ``layer_rule`` column states the rule and
what it left out, ``role`` and ``frozen`` describe each layer. A weight
shared by two modules (GPT-2's ``lm_head`` and ``wte``) is one tensor: its
gradient is the total over both uses, reported under each selected module.

Batches follow the batch contract (:mod:`normprobe.batch`): ``(inputs,
targets)`` with inputs a tensor, a tuple or a dict; the loss is
``loss_fn(prediction, targets)`` with the prediction read from the model's
outputs by the contract's rule or by ``output=``; ``loss_fn=None`` takes the
model's own ``outputs.loss``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from normprobe.batch import (
    OutputPick,
    all_finite,
    compute_loss,
    differentiated,
    model_device,
    to_device,
)
from normprobe.errors import listed
from normprobe.probes import overflow
from normprobe.probes.capture import (
    Layers,
    Mode,
    Probe,
    ProbeError,
    check_same_layers,
    to_model,
    unpack_batch,
)
from normprobe.probes.overflow import all_finite_values
from normprobe.roles import is_embedding, is_frozen, is_normalizer, owns_weight

__all__ = [
    "LossFn",
    "LayerGradient",
    "cosine",
    "log_linear_slope",
    "layer_gradients",
    "gradient_correlation",
    "gradient_norms",
    "gradient_statistics",
    "growth_rate",
]

#: ``loss_fn(output, target) -> mean loss``, e.g. ``torch.nn.functional.cross_entropy``
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``(inputs, targets)`` by the batch contract (:mod:`normprobe.batch`)
Batch = Sequence[Any]


# --------------------------------------------------------------------------- pure math


def cosine(a: torch.Tensor, b: torch.Tensor, *, safe: bool = False) -> torch.Tensor:
    """Cosine similarity of ``a`` and ``b`` flattened (0-dim tensor; NaN if either is zero).

    ``safe``: in float64 on each vector scaled to a largest magnitude of 1, which no finite
    entries can overflow (:mod:`normprobe.probes.overflow`).

    >>> round(cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])).item(), 6)
    0.707107
    >>> cosine(torch.full((4096,), 1e37), torch.full((4096,), 1e37)).item()  # float32 overflows
    nan
    >>> cosine(torch.full((4096,), 1e37), torch.full((4096,), 1e37), safe=True).item()
    1.0
    """
    if safe:
        a, b = overflow.direction(a), overflow.direction(b)
    a, b = a.reshape(-1), b.reshape(-1)
    return torch.dot(a, b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))


def log_linear_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``log(y)`` against ``x`` (float64).

    >>> round(log_linear_slope([1, 2, 3], [1.0, math.e, math.e**2]), 12)
    1.0
    """
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.size < 2 or np.ptp(xs) == 0:
        raise ProbeError(
            f"a log-linear fit needs at least two points at different x, got x={xs.tolist()}"
        )
    if not (np.isfinite(ys).all() and (ys > 0).all()):
        raise ProbeError(
            f"a log-linear fit needs finite positive values, got {ys.tolist()}; a zero gradient "
            f"norm (a dead layer) has no logarithm: leave that layer out"
        )
    xc = xs - xs.mean()
    return float(xc @ (np.log(ys) - np.log(ys).mean()) / (xc @ xc))


# --------------------------------------------------------------------------- gradients


@dataclass(frozen=True)
class LayerGradient:
    """The gradient of the mean loss for one layer (module) of a pass."""

    name: str
    depth: int
    calls: int
    module_type: str
    shape: str
    weight: torch.Tensor  # d loss / d (applied weight), summed over distinct applied tensors
    bias: torch.Tensor | None  # d loss / d (applied bias), if the layer has one
    role: str = "weight"  # "weight", "embedding" or "norm" (normprobe.roles)
    frozen: bool = False  # the layer's weight had requires_grad=False in the model

    def params(self) -> torch.Tensor:
        """The gradient with respect to all the layer's parameters, flattened (weight, then bias)."""
        if self.bias is None:
            return self.weight.reshape(-1)
        return torch.cat([self.weight.reshape(-1), self.bias.reshape(-1)])


def layer_gradients(
    probe: Probe,
    model: nn.Module,
    loss_fn: LossFn | None,
    batch: Batch,
    output: OutputPick = None,
    frozen: dict[str, bool] | None = None,
) -> list[LayerGradient]:
    """Run one forward and one backward (``torch.autograd.grad``) for all probed layers at once.

    ``probe`` must be an active ``Probe(model, ..., capture="weights")``;
    ``frozen`` maps module names to whether their weight was frozen before
    the probe made it differentiable (:func:`frozen_before`). Layers are
    returned in order of their first call. A layer the loss has no gradient
    path to (autograd gives none of the tensors it applies a gradient: it
    feeds only outputs the loss does not use) is left out, as one run with
    autograd off is; the probes name it in their ``layer_rule``.
    """
    return _gradients(probe, model, loss_fn, batch, output, frozen)[0]


def _gradients(
    probe: Probe,
    model: nn.Module,
    loss_fn: LossFn | None,
    batch: Batch,
    output: OutputPick,
    frozen: dict[str, bool] | None,
) -> tuple[list[LayerGradient], list[str]]:
    """:func:`layer_gradients`, and the selected layers the loss has no gradient path to
    (in the order of selection)."""
    if probe.capture != "weights" or probe.model is not model:
        raise ProbeError("layer_gradients needs an active Probe(model, capture='weights')")
    x, y = unpack_batch(batch)
    x = to_model(x, model)
    y = None if y is None else to_device(y, model_device(model))
    with torch.enable_grad():
        loss = compute_loss(loss_fn, probe.run(x), y, output, ProbeError)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ProbeError(
            f"loss_fn must return the mean loss as a scalar tensor, got {got}; use a loss with "
            f"reduction='mean' (e.g. torch.nn.functional.cross_entropy)"
        )
    if not loss.requires_grad:
        raise ProbeError(
            "the loss returned by loss_fn does not depend on the model's parameters (was it "
            "detached, or computed under torch.no_grad()?)"
        )

    # distinct tensors (a tied or reused weight is one tensor) -> one autograd.grad call
    tensors: list[torch.Tensor] = []
    index: dict[int, int] = {}
    layers: dict[str, dict[str, list[int]]] = {}
    first = {}
    records = probe.weights
    off = set(probe.without_autograd)  # stated in the layer rule (_stated_rule)
    for c in probe.calls:
        if c.name in off:
            continue
        entry = layers.setdefault(c.name, {"weight": [], "bias": [], "calls": []})
        first.setdefault(c.name, c)
        entry["calls"].append(c.call)
        for key in ("weight", "bias"):
            t = records[c.label][key]
            if t is None:
                continue
            i = index.setdefault(id(t), len(tensors))
            if i == len(tensors):
                tensors.append(t)
            if i not in entry[key]:
                entry[key].append(i)
    if not tensors:
        raise ProbeError(
            f"every selected layer ran with autograd off ({', '.join(sorted(off)[:8])}): inside "
            f"torch.no_grad(), or a reentrant torch.utils.checkpoint whose inputs need no "
            f"gradient; the loss has no gradient path to their weights"
        )
    with differentiated(ProbeError):
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    # none of a layer's tensors in the loss's graph (autograd: None, not a zero tensor, which a
    # dead layer gets): no gradient path from the loss, so no row rather than a wrong zero
    unreached = {
        name
        for name, entry in layers.items()
        if all(grads[i] is None for i in entry["weight"] + entry["bias"])
    }
    if unreached:
        _check_reached(probe, unreached, len(layers))
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]

    result = []
    reached = [(name, entry) for name, entry in layers.items() if name not in unreached]
    for depth, (name, entry) in enumerate(reached, start=1):
        weight = _summed([grads[i] for i in entry["weight"]])
        bias = _summed([grads[i] for i in entry["bias"]]) if entry["bias"] else None
        result.append(
            LayerGradient(
                name=name,
                depth=depth,
                calls=len(entry["calls"]),
                module_type=first[name].module_type,
                shape="x".join(map(str, weight.shape)),
                weight=weight,
                bias=bias,
                role=_role(probe.selected[name]),
                frozen=bool((frozen or {}).get(name, False)),
            )
        )
    return result, [name for name in probe.selected if name in unreached]


def _check_reached(probe: Probe, unreached: set[str], ran: int) -> None:
    """Refuse layers named in ``layers=`` that the loss has no gradient path to, and a pass
    whose loss reaches none of the ``ran`` layers that ran with autograd on."""
    named = [name for name in probe._required if name in unreached]
    if named:
        raise ProbeError(
            f"layer(s) {', '.join(map(repr, named))} get no gradient: there is no gradient "
            f"path from the loss to their weights (they feed only outputs the loss does not "
            f"use, e.g. an auxiliary head when output= picks the logits); leave them out of "
            f"layers"
        )
    if len(unreached) == ran:
        raise ProbeError(_none_reached([name for name in probe.selected if name in unreached]))


def _none_reached(names: list[str]) -> str:
    return (
        f"there is no gradient path from the loss to any selected layer ({listed(names, 8)}): "
        f"they feed only outputs the loss does not use; check output= (which output is the "
        f"prediction) or choose layers the loss depends on"
    )


def _role(module: nn.Module) -> str:
    if is_embedding(module):
        return "embedding"
    return "norm" if is_normalizer(module) else "weight"


def frozen_before(probe: Probe) -> dict[str, bool]:
    """Module name -> whether its weight is frozen in the model (read before the probe is entered)."""
    return {name: owns_weight(m) and is_frozen(m) for name, m in probe.selected.items()}


def _summed(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).sum(dim=0)


# --------------------------------------------------------------------------- probes


def gradient_norms(
    model: nn.Module,
    loss_fn: LossFn | None,
    batch: Batch,
    *,
    layers: Layers = None,
    mode: Mode = "train",
    seed: int = 0,
    output: OutputPick = None,
    embeddings: bool = False,
    norms: bool = False,
    frozen: bool = True,
) -> pd.DataFrame:
    """Frobenius norm of the gradient of the mean loss w.r.t. each layer's weight, by depth.

    ``batch`` is ``(inputs, targets)`` (:mod:`normprobe.batch`: inputs a
    tensor, a tuple or a dict); ``loss_fn(prediction, targets)`` must return
    the mean loss (``output=`` says which part of the outputs is the
    prediction; ``loss_fn=None`` takes the model's own ``outputs.loss``).
    Layers: every module owning a weight (module docstring; ``embeddings``,
    ``norms``, ``frozen`` widen the rule). The probe differentiates exactly that loss: to include RegNorm's
    penalty pass ``lambda out, y: F.cross_entropy(out, y) + lam *
    normprobe.norms.regularization(model)``. The model runs in ``mode``
    (default "train", batch statistics) and is left exactly as found.

    Returns two rows per layer: ``grad_norm`` and ``grad_norm_ratio`` (to the
    deepest layer's norm, usually the head's); columns ``layer``, ``depth``
    (1 nearest the input), ``metric``, ``value``, ``module_type``, ``shape``
    (of the weight), ``calls``, ``mode``, ``probe_seed``, ``role``,
    ``frozen``, ``layer_rule``. See :func:`growth_rate`.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> batch = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> frame = gradient_norms(net, nn.functional.cross_entropy, batch)
    >>> frame.query("metric == 'grad_norm_ratio'").value.tolist()[-1]
    1.0
    """
    probe = _probe(model, layers, mode, seed, embeddings, norms, frozen)
    was_frozen = frozen_before(probe)
    with probe:
        grads, unreached = _gradients(probe, model, loss_fn, batch, output, was_frozen)
        rule = _stated_rule(probe, unreached)
    return _frame(_norm_rows(grads), mode, seed, rule)


def _stated_rule(probe: Probe, unreached: Sequence[str] = ()) -> str:
    """The probe's layer rule, plus the selected modules that never ran as modules, those
    that ran with autograd off and those the loss has no gradient path to (``unreached``)."""
    rule = probe.rule
    for names, why in (
        (probe.not_run, "not run as modules (no gradient row)"),
        (
            probe.without_autograd,
            "ran with autograd off (torch.no_grad or a reentrant checkpoint) (no gradient row)",
        ),
        (unreached, "no gradient path from the loss (no row)"),
    ):
        if names:
            rule += f"; {why}: {listed(names, 8)}"
    return rule


def _probe(
    model: nn.Module,
    layers: Layers,
    mode: Mode,
    seed: int,
    embeddings: bool,
    norms: bool,
    frozen: bool,
) -> Probe:
    return Probe(
        model,
        layers,
        mode=mode,
        seed=seed,
        capture="weights",
        embeddings=embeddings,
        norms=norms,
        frozen=frozen,
    )


def _norm_rows(grads: list[LayerGradient]) -> list[tuple[LayerGradient, str, float]]:
    norms = torch.stack([torch.linalg.vector_norm(g.weight) for g in grads])
    ratios = norms / norms[-1]
    values = torch.stack([norms, ratios], dim=1).double().cpu().tolist()  # one device sync
    if not all_finite_values(v for pair in values for v in pair):
        values = _norm_values_again(grads, values)
    return [
        (g, metric, v)
        for g, pair in zip(grads, values)
        for metric, v in zip(("grad_norm", "grad_norm_ratio"), pair)
    ]


def _norm_values_again(grads: list[LayerGradient], values: list[list[float]]) -> list[list[float]]:
    """``values`` with each non-finite norm or ratio computed again free of overflow
    (:mod:`normprobe.probes.overflow`); the layers whose gradient itself is not finite are said."""
    exact = [overflow.norm(g.weight) for g in grads]
    again = [[n, n / exact[-1] if exact[-1] else math.inf * n] for n in exact]
    values = [
        [v if math.isfinite(v) else w for v, w in zip(pair, pair_again)]
        for pair, pair_again in zip(values, again)
    ]
    overflow.warn_of_non_finite(
        "gradient", [g.name for g, n in zip(grads, exact) if not math.isfinite(n)]
    )
    return values


def gradient_correlation(
    model: nn.Module,
    loss_fn: LossFn | None,
    batch_a: Batch,
    batch_b: Batch,
    *,
    layers: Layers = None,
    mode: Mode = "train",
    seed: int = 0,
    output: OutputPick = None,
    embeddings: bool = False,
    norms: bool = False,
    frozen: bool = True,
) -> pd.DataFrame:
    """Cosine similarity of two minibatches' gradients of the mean loss, per layer (gradient confusion).

    For each layer, the gradients with respect to its parameters (the weight
    it applies and its bias, flattened together) on ``batch_a`` and on
    ``batch_b``, two disjoint ``(inputs, targets)`` minibatches (batch
    contract, as :func:`gradient_norms`), are compared by cosine similarity. Each batch is its own forward pass (its own batch statistics
    in train mode). Rows: ``metric="grad_corr"``; columns as
    :func:`gradient_norms`.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> a = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> b = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> gradient_correlation(net, nn.functional.cross_entropy, a, b).layer.tolist()
    ['0', '2']
    """
    grads_a, grads_b, rule = _two_batches(
        model, loss_fn, batch_a, batch_b, layers, mode, seed, output, (embeddings, norms, frozen)
    )
    return _frame(_corr_rows(grads_a, grads_b), mode, seed, rule)


def gradient_statistics(
    model: nn.Module,
    loss_fn: LossFn | None,
    batch_a: Batch,
    batch_b: Batch,
    *,
    layers: Layers = None,
    mode: Mode = "train",
    seed: int = 0,
    output: OutputPick = None,
    embeddings: bool = False,
    norms: bool = False,
    frozen: bool = True,
) -> pd.DataFrame:
    """:func:`gradient_correlation` and :func:`gradient_norms` (of ``batch_a``) from one set of passes.

    The rows of both probes in one frame, the ``grad_corr`` rows first, for
    a third less work than calling the two: ``batch_a``'s gradients serve
    both. Identical values to the separate calls.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> a = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> b = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> gradient_statistics(net, nn.functional.cross_entropy, a, b).metric.unique().tolist()
    ['grad_corr', 'grad_norm', 'grad_norm_ratio']
    """
    return pd.DataFrame(
        statistics_columns(
            model,
            loss_fn,
            batch_a,
            batch_b,
            layers=layers,
            mode=mode,
            seed=seed,
            output=output,
            embeddings=embeddings,
            norms=norms,
            frozen=frozen,
        )  # fmt: skip
    )


def statistics_columns(
    model: nn.Module,
    loss_fn: LossFn | None,
    batch_a: Batch,
    batch_b: Batch,
    *,
    layers: Layers = None,
    mode: Mode = "train",
    seed: int = 0,
    output: OutputPick = None,
    embeddings: bool = False,
    norms: bool = False,
    frozen: bool = True,
    listener: Listener | None = None,
) -> dict[str, list[Any]]:
    """:func:`gradient_statistics`' rows as columns (name -> values), for a driver that builds
    one table per step rather than one per probe (:func:`normprobe.measures.measure_step`).

    ``listener``: another active :class:`Probe` of ``model`` (entered
    first) that records ``batch_a``'s forward pass too and is paused for
    the rest; its ``quiet`` is set to whether that pass drew no random
    numbers. When it drew none, the listener holds what a pass of its own on
    ``batch_a``'s inputs would have recorded (the forward runs the same
    operations on the same inputs; only the gradient is extra), and the
    measurement step need not run that pass.
    """
    grads_a, grads_b, rule = _two_batches(
        model, loss_fn, batch_a, batch_b, layers, mode, seed, output, (embeddings, norms, frozen),
        listener,
    )  # fmt: skip
    return _columns(_corr_rows(grads_a, grads_b) + _norm_rows(grads_a), mode, seed, rule)


@dataclass
class Listener:
    """A probe that records another probe's first pass (:func:`statistics_columns`), and
    whether that pass drew no random numbers (set by the pass)."""

    probe: Probe
    quiet: bool = False


def _two_batches(
    model: nn.Module,
    loss_fn: LossFn | None,
    batch_a: Batch,
    batch_b: Batch,
    layers: Layers,
    mode: Mode,
    seed: int,
    output: OutputPick,
    roles: tuple[bool, bool, bool],
    listener: Listener | None = None,
) -> tuple[list[LayerGradient], list[LayerGradient], str]:
    """Both batches' layer gradients and the layer rule (``listener``: see
    :func:`statistics_columns`). A layer the loss has no gradient path to in either batch is
    left out of both, so that the two lists pair the same layers."""
    probe = _probe(model, layers, mode, seed, *roles)
    was_frozen = frozen_before(probe)
    with probe:
        grads_a, unreached_a = _gradients(probe, model, loss_fn, batch_a, output, was_frozen)
        calls_a = probe.calls
        if listener is None:
            grads_b, unreached_b = _gradients(probe, model, loss_fn, batch_b, output, was_frozen)
        else:
            listener.quiet = not probe.last_pass_drew
            with listener.probe.paused():
                grads_b, unreached_b = _gradients(
                    probe, model, loss_fn, batch_b, output, was_frozen
                )
        check_same_layers(calls_a, probe.calls, "batch_a and batch_b")
        unreached = [n for n in probe.selected if n in unreached_a or n in unreached_b]
        if unreached_a != unreached_b:
            grads_a, grads_b = _without(grads_a, unreached), _without(grads_b, unreached)
            if not grads_a:
                raise ProbeError(_none_reached(unreached))
        rule = _stated_rule(probe, unreached)
    return grads_a, grads_b, rule


def _without(grads: list[LayerGradient], names: list[str]) -> list[LayerGradient]:
    """``grads`` less the layers ``names``, depths counted again without them."""
    kept = [g for g in grads if g.name not in names]
    return [replace(g, depth=depth) for depth, g in enumerate(kept, start=1)]


def _corr_rows(
    grads_a: list[LayerGradient], grads_b: list[LayerGradient]
) -> list[tuple[LayerGradient, str, float]]:
    values = torch.stack([cosine(a.params(), b.params()) for a, b in zip(grads_a, grads_b)])
    floats = values.double().cpu().tolist()  # one device sync
    if not all_finite_values(floats):
        floats = [
            v if math.isfinite(v) else float(cosine(a.params(), b.params(), safe=True))
            for v, a, b in zip(floats, grads_a, grads_b)
        ]
        overflow.warn_of_non_finite(
            "gradient",
            [
                a.name
                for a, b in zip(grads_a, grads_b)
                if not (all_finite(a.params()) and all_finite(b.params()))
            ],
        )
    return [(g, "grad_corr", v) for g, v in zip(grads_a, floats)]


def _frame(
    rows: list[tuple[LayerGradient, str, float]], mode: str, seed: int, rule: str
) -> pd.DataFrame:
    return pd.DataFrame(_columns(rows, mode, seed, rule))


def _columns(
    rows: list[tuple[LayerGradient, str, float]], mode: str, seed: int, rule: str
) -> dict[str, list[Any]]:
    n = len(rows)
    return {
        "layer": [g.name for g, _, _ in rows],
        "depth": [g.depth for g, _, _ in rows],
        "metric": [metric for _, metric, _ in rows],
        "value": [value for _, _, value in rows],
        "module_type": [g.module_type for g, _, _ in rows],
        "shape": [g.shape for g, _, _ in rows],
        "calls": [g.calls for g, _, _ in rows],
        "mode": [mode] * n,
        "probe_seed": [seed] * n,
        "role": [g.role for g, _, _ in rows],
        "frozen": [g.frozen for g, _, _ in rows],
        "layer_rule": [rule] * n,
    }


def growth_rate(frame: pd.DataFrame) -> float:
    """Per-layer growth of the gradient norm towards the input: ``exp(-slope)`` of log norm vs depth.

    ``slope`` is the least-squares slope of ``log(grad_norm)`` against depth,
    and depth grows towards the output, so a network whose earliest layers
    have the largest gradients (gradients explode towards the input) has a
    negative slope and a growth rate ``> 1``; ``< 1`` means they vanish
    towards the input. ``frame`` is one network's :func:`gradient_norms`
    (group a combined frame first, e.g. ``frame.groupby("norm").apply(growth_rate)``).

    >>> frame = pd.DataFrame({"depth": [1, 2, 3], "metric": "grad_norm", "value": [4.0, 2.0, 1.0]})
    >>> round(growth_rate(frame), 12)
    2.0
    """
    missing = {"depth", "metric", "value"} - set(frame.columns)
    if missing:
        raise ProbeError(
            f"growth_rate needs a frame with columns depth, metric, value (from gradient_norms); "
            f"missing {sorted(missing)}"
        )
    rows = frame[frame["metric"] == "grad_norm"]
    if rows.empty:
        raise ProbeError(
            "growth_rate found no rows with metric 'grad_norm'; pass the frame returned by "
            "gradient_norms"
        )
    if rows["depth"].duplicated().any():
        raise ProbeError(
            "growth_rate got several grad_norm rows at the same depth, i.e. more than one "
            "network; group the frame first, e.g. frame.groupby('norm').apply(growth_rate)"
        )
    slope = log_linear_slope(rows["depth"].tolist(), rows["value"].tolist())
    return math.exp(-slope)


def growth_of(columns: dict[str, list[Any]]) -> float:
    """:func:`growth_rate` of one network's rows given as columns (``depth``, ``metric``,
    ``value``: :func:`statistics_columns`), the same number without building a frame."""
    rows = [(d, v) for d, m, v in zip(columns["depth"], columns["metric"], columns["value"])
            if m == "grad_norm"]  # fmt: skip
    if not rows:
        raise ProbeError("growth_rate found no rows with metric 'grad_norm'")
    depths = [d for d, _ in rows]
    if len(set(depths)) != len(depths):
        raise ProbeError("growth_rate got several grad_norm rows at the same depth")
    return math.exp(-log_linear_slope(depths, [v for _, v in rows]))
