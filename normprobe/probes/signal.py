"""Representation correlation with depth (information propagation, Rao & Sohl-Dickstein 2020, sec. 4.1).

For a minibatch ``X`` and a similar minibatch ``X'``, per layer
``rho_l = pearson(vec h_l(X), vec h_l(X'))``, ``vec`` flattening the whole
minibatch (N x features; a transformer's (N, T, D) output entirely). Pairings
(docs/definitions.md, Probes 1):

- ``noise`` (default): ``X' = X + s * std(X) * eps``, ``eps ~ N(0, 1)`` drawn
  from a ``torch.Generator`` seeded with ``seed``, ``s = 0.3``, ``std`` the
  biased standard deviation of all entries of ``X``;
- ``independent``: ``X'`` is a disjoint minibatch of the same shape
  (``x_other``);
- ``within``: the mean off-diagonal cosine similarity of the per-example
  representations of one minibatch (Yang et al. 2019's gram matrix).

The input itself is the row at depth 0 (``layer="input"``): the reference
point that the correlation of every later layer is compared with (several
inputs: all of them flattened per example and concatenated).

Inputs follow the batch contract (:mod:`normprobe.batch`): a tensor, a tuple
of tensors (positional) or a dict (keyword arguments, e.g. ``input_ids`` and
``attention_mask``), every one passed to the model. The noise pairing
perturbs the floating-point inputs only (features, embeddings), never
integer ones (token ids, masks); inputs with no floating-point tensor need
``independent``.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn

from normprobe.batch import (
    Inputs,
    all_finite,
    batch_size,
    flat_inputs,
    input_tensors,
    inputs_equal,
    map_floating,
    same_layout,
)
from normprobe.batch import (
    layout as _layout,
)
from normprobe.errors import user_stacklevel
from normprobe.probes import overflow
from normprobe.probes.capture import (
    LayerCall,
    Layers,
    Mode,
    Probe,
    ProbeError,
    check_same_layers,
    inputs_of,
    to_model,
)
from normprobe.probes.overflow import all_finite_values

__all__ = [
    "Pairing",
    "PAIRINGS",
    "METRICS",
    "pearson",
    "centred",
    "pearson_centred",
    "mean_offdiagonal_cosine",
    "noisy_copy",
    "representation_correlation",
]

Pairing = Literal["noise", "independent", "within"]
PAIRINGS: tuple[str, ...] = ("noise", "independent", "within")
#: the metric name of each pairing: Pearson correlation across two batches, cosine within one
METRICS: dict[str, str] = {
    "noise": "repr_corr_noise",
    "independent": "repr_corr_independent",
    "within": "repr_cos_within",
}


# --------------------------------------------------------------------------- pure math


def _float(t: torch.Tensor) -> torch.Tensor:
    """At least float32, so half-precision activations are reduced accurately."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def centred(a: torch.Tensor, *, safe: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` flattened minus its mean, and the norm of that vector (the two halves of a Pearson r).

    ``safe``: in float64, ``a`` first scaled to a largest magnitude of 1, which leaves the
    correlation as it is and lets no finite entries overflow (:mod:`normprobe.probes.overflow`).
    """
    v = overflow.direction(a) if safe else _float(a).reshape(-1)
    v = v - v.mean()
    return v, torch.linalg.vector_norm(v)


def pearson_centred(
    a_centred: torch.Tensor, a_norm: torch.Tensor, b: torch.Tensor, *, safe: bool = False
) -> torch.Tensor:
    """:func:`pearson` of ``a`` and ``b`` given ``centred(a, safe=safe)``, so ``b`` need not be
    stored."""
    if a_centred.numel() != b.numel():
        raise ProbeError(
            f"pearson needs two tensors with as many entries, got {a_centred.numel()} and "
            f"{b.numel()}"
        )
    v, v_norm = centred(b, safe=safe)
    return torch.dot(a_centred, v) / (a_norm * v_norm)


def pearson(a: torch.Tensor, b: torch.Tensor, *, safe: bool = False) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` flattened (0-dim tensor; NaN if one is constant).

    ``safe``: free of overflow (:func:`centred`); float32's sums overflow at entries near 1e19.

    >>> round(pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0])).item(), 6)
    0.993399
    >>> a, b = torch.tensor([1.0, 2.0, 3.0]) * 1e37, torch.tensor([2.0, 4.0, 7.0]) * 1e37
    >>> pearson(a, b).item(), round(pearson(a, b, safe=True).item(), 6)
    (nan, 0.993399)
    """
    return pearson_centred(*centred(a, safe=safe), b, safe=safe)


def mean_offdiagonal_cosine(
    h: torch.Tensor, eps: float = 1e-8, *, safe: bool = False
) -> torch.Tensor:
    """Mean cosine similarity over all pairs ``i != j`` of the rows of ``h`` (N, ...) flattened.

    Uses ``sum_{i != j} u_i . u_j = |sum_i u_i|^2 - sum_i |u_i|^2`` for the unit
    rows ``u_i``, so no N x N matrix is formed and the rows are read twice
    (their norms, then one matrix-vector product). A zero row has cosine 0
    with everything, as in ``torch.nn.functional.cosine_similarity`` (norms
    clamped to ``eps``). ``safe``: in float64, each row first scaled to a largest magnitude
    of 1, which no finite entries can overflow (:mod:`normprobe.probes.overflow`).

    >>> round(mean_offdiagonal_cosine(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])).item(), 6)
    0.333333
    """
    n = h.shape[0] if h.dim() else 0
    if n < 2:
        raise ProbeError(
            f"the within-batch cosine needs at least 2 examples, got a batch of {n}; "
            f"use a larger batch"
        )
    rows = _float(h).reshape(n, -1)
    if safe:
        rows = rows.detach().double()
        largest = rows.abs().amax(dim=1, keepdim=True)
        rows = rows / torch.where(largest > 0, largest, 1.0)
    norms = torch.linalg.vector_norm(rows, dim=1)
    inverse = 1.0 / norms.clamp_min(eps)
    total = inverse @ rows  # sum_i u_i
    return (torch.dot(total, total) - (norms * inverse).square().sum()) / (n * (n - 1))


def noisy_copy(x: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """``x + scale * std(x) * eps`` with ``eps ~ N(0, 1)`` from ``generator`` (biased std of all of x).

    >>> x = torch.arange(6.0).reshape(2, 3)
    >>> torch.equal(noisy_copy(x, 0.0, torch.Generator().manual_seed(0)), x)
    True
    """
    if not x.is_floating_point():
        raise ProbeError(
            f"the noise pairing perturbs the inputs, which needs floating-point inputs, got "
            f"{x.dtype}; use pairing='independent' with a second batch (e.g. token ids)"
        )
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if scale:
        _refuse_noise_drawn_as_the_input(x, eps, generator)
    return x + scale * x.std(correction=0) * eps


def noisy_inputs(x: Inputs, noise_scale: float, seed: int) -> tuple[Inputs, list[str]]:
    """The noise pairing's ``X'``: :func:`noisy_copy` of each floating-point input (in order,
    from one generator seeded with ``seed`` on the inputs' device), and the labels of those
    perturbed; integer inputs (token ids, masks) pass unchanged."""
    device = input_tensors(x)[0][1].device
    generator = torch.Generator(device=device).manual_seed(seed)
    return map_floating(x, lambda t: noisy_copy(t, noise_scale, generator))


#: entries of the input and its noise compared by :func:`_refuse_noise_drawn_as_the_input`
NOISE_CHECK_ENTRIES = 1024


def _refuse_noise_drawn_as_the_input(
    x: torch.Tensor, eps: torch.Tensor, generator: torch.Generator
) -> None:
    """Refuse noise that came out as the input itself, up to scale and shift.

    Inputs drawn as ``torch.manual_seed(0); x = torch.randn(...)`` are the
    very numbers a generator seeded with the probe's seed 0 draws as ``eps``,
    and ``X' = X + s * std(X) * X`` is a rescaled ``X``, not a noisy
    neighbour: every layer of a scale-invariant network would read a
    correlation of 1. Independent noise has a correlation with the input of
    about ``1 / sqrt(n)`` over ``n`` entries (0.031 over the 1,024 compared
    here): it exceeds 0.9 by chance with odds below 1e-11 from 32 entries on
    (``r sqrt(n - 2) / sqrt(1 - r^2)`` follows Student's t with ``n - 2``
    degrees of freedom).
    """
    n = min(x.numel(), NOISE_CHECK_ENTRIES)
    if n < 32:
        return
    # the first examples only, so a non-contiguous input (channels last) is not copied whole;
    # both centred rows' 2 x 2 Gram matrix in one product (float32 is ample to tell 0.9)
    rows = -(-n // max(1, x[0].numel()))
    pair = torch.stack([x[:rows].reshape(-1)[:n], eps[:rows].reshape(-1)[:n]]).float()
    pair = pair - pair.mean(dim=1, keepdim=True)
    (aa, ab), (_, bb) = (pair @ pair.T).tolist()
    r = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else 0.0
    if abs(r) > 0.9:
        seed = generator.initial_seed()
        raise ProbeError(
            f"the noise pairing's noise, drawn from a torch.Generator seeded with {seed}, is the "
            f"input itself (correlation {r:.4f} over its first {n} entries): the inputs were "
            f"drawn from the same seed (torch.manual_seed({seed}); torch.randn(...)), so "
            f"X + s * std(X) * eps would be a rescaled X, not a noisy copy; give the probe "
            f"another seed (seed= of the probe or of the Monitor, a run's seed in an analysis) "
            f"or draw the inputs from another seed"
        )


# --------------------------------------------------------------------------- the probe


def representation_correlation(
    model: nn.Module,
    x: Inputs,
    *,
    pairing: Pairing = "noise",
    x_other: Inputs | None = None,
    layers: Layers = None,
    mode: Mode = "train",
    noise_scale: float = 0.3,
    seed: int = 0,
) -> pd.DataFrame:
    """Correlation of each layer's representations of two similar minibatches, by depth.

    ``x`` is a minibatch of inputs: a tensor, a tuple of tensors (the
    model's positional inputs) or a dict (its keyword inputs), all passed
    to the model (an ``(inputs, targets)`` batch is refused when the model
    takes one input: pass ``batch[0]``). ``pairing`` chooses the second minibatch (module
    docstring); ``x_other`` is the disjoint minibatch for
    ``pairing="independent"``. Both minibatches run through the model in
    ``mode`` (default "train": batch-statistic normalizers use each batch's
    own statistics, as in training) as two separate passes, so neither
    batch's statistics leak into the other's; running statistics are never
    updated and the model is left exactly as found. ``seed`` draws the noise
    of the "noise" pairing and seeds any randomness inside the model (on a
    forked random state, so the caller's is untouched).

    Returns one row per layer call plus the input (depth 0): columns
    ``layer``, ``depth``, ``metric`` (``repr_corr_noise``,
    ``repr_corr_independent`` or ``repr_cos_within``), ``value``, ``pairing``,
    ``module``, ``call``, ``module_type``, ``shape`` (one example's
    representation), ``mode``, ``probe_seed`` (``seed``), ``layer_rule``
    (how the layers were chosen, e.g. the blocks of a transformer). A constant
    representation has an undefined correlation (NaN). A module called twice
    has rows ``name`` and ``name#2`` (``call`` 1 and 2).

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    >>> frame = representation_correlation(net, torch.randn(32, 8))
    >>> frame.layer.tolist(), frame.depth.tolist(), frame.metric.unique().tolist()
    (['input', '1', '3'], [0, 1, 2], ['repr_corr_noise'])
    """
    return pd.DataFrame(
        representation_columns(
            model,
            x,
            pairing=pairing,
            x_other=x_other,
            layers=layers,
            mode=mode,
            noise_scale=noise_scale,
            seed=seed,
        )  # fmt: skip
    )


#: runs one forward pass of the model on the probe's ``x`` while the representation probe
#: (given, active) records it; returns whether that pass is the one the probe would have run
SharedPass = Callable[[Probe], bool]


def representation_columns(
    model: nn.Module,
    x: Inputs,
    *,
    pairing: Pairing = "noise",
    x_other: Inputs | None = None,
    layers: Layers = None,
    mode: Mode = "train",
    noise_scale: float = 0.3,
    seed: int = 0,
    shared: SharedPass | None = None,
) -> dict[str, list[Any]]:
    """:func:`representation_correlation`'s rows as columns (name -> values), for a driver
    that builds one table per step rather than one per probe
    (:func:`normprobe.measures.measure_step`).

    ``shared(probe)``, when given, runs the model once on ``x`` (the same
    inputs object, moved to the model as the probes move it) inside this
    probe's session, with this probe listening, and pauses it for any other
    pass; it returns True when that pass is exactly the one this probe
    would run (the same mode, no random numbers drawn), and the probe then
    runs only its second pass. On False the probe runs its first pass
    itself. The values are the same either way: a measurement step uses it
    to let the representation and gradient probes share ``batch_a``'s forward.
    """
    if pairing not in PAIRINGS:
        raise ProbeError(
            f"unknown pairing {pairing!r}; choose 'noise' (X' = X + {noise_scale} std(X) eps), "
            f"'independent' (a disjoint batch passed as x_other) or 'within' (cosine between the "
            f"examples of one batch)"
        )
    x = to_model(inputs_of(x, "x"), model)
    n = batch_size(x, None, "x", ProbeError)
    if pairing == "independent":
        if x_other is None:
            raise ProbeError(
                "pairing='independent' compares two disjoint minibatches: pass the second one "
                "as x_other=, with the same shape as x"
            )
        x_other = to_model(inputs_of(x_other, "x_other"), model)
        differs = same_layout(x, x_other)
        if differs is not None:
            raise ProbeError(
                f"x_other must have the shape of x, {_layout(x)}, got {_layout(x_other)}; take "
                f"two disjoint minibatches of the same size"
            )
        if inputs_equal(x_other, x):
            raise ProbeError(
                "x_other equals x; pairing='independent' needs a disjoint minibatch (or use "
                "pairing='within' for one batch)"
            )
    elif x_other is not None:
        raise ProbeError(
            f"x_other is only used with pairing='independent', got pairing={pairing!r}; "
            f"drop x_other or set pairing='independent'"
        )
    if pairing == "noise":
        if not (isinstance(noise_scale, (int, float)) and 0 <= noise_scale < float("inf")):
            raise ProbeError(
                f"noise_scale must be a finite number >= 0 (docs/definitions.md: 0.3), got {noise_scale!r}"
            )
        x_other, changed = noisy_inputs(x, noise_scale, seed)
        if not changed:
            kinds = ", ".join(f"{k} ({t.dtype})" for k, t in input_tensors(x))
            raise ProbeError(
                f"the noise pairing perturbs floating-point inputs, and these inputs have none "
                f"({kinds}); for token ids use pairing='independent' with a second batch as "
                f"x_other"
            )

    _warn_of_padding(x, x_other if pairing == "independent" else None)
    calls, shapes, values, rule, _ = _measured(
        model, x, x_other, n, pairing, layers, mode, seed, noise_scale, shared
    )
    floats = torch.stack(values).double().cpu().tolist()  # one device sync
    if not all_finite_values(floats):
        calls_again, _, values_again, _, non_finite = _measured(
            model, x, x_other, n, pairing, layers, mode, seed, noise_scale, safe=True
        )
        check_same_layers(calls, calls_again, "the pass repeated free of overflow")
        exact = torch.stack(values_again).double().cpu().tolist()
        floats = [v if math.isfinite(v) else w for v, w in zip(floats, exact)]
        overflow.warn_of_non_finite("representation", non_finite)
    return {
        **_columns(calls, shapes, floats, pairing, mode, seed),
        "layer_rule": [rule] * len(shapes),
    }


def _measured(
    model: nn.Module,
    x: Inputs,
    x_other: Inputs | None,
    n: int,
    pairing: str,
    layers: Layers,
    mode: Mode,
    seed: int,
    noise_scale: float,
    shared: SharedPass | None = None,
    safe: bool = False,
) -> tuple[list[LayerCall], list[str], list[torch.Tensor], str, list[str]]:
    """The probe's passes: the layer calls, the shapes and values of the rows (the input's
    first), the layer rule, and (``safe``: the values computed free of overflow) the labels of
    the layers whose representation held NaN or infinite values."""
    non_finite: list[str] = []

    def note(call: LayerCall, h: torch.Tensor) -> None:
        if safe and not all_finite(h) and call.label not in non_finite:
            non_finite.append(call.label)

    def within(call: LayerCall, h: torch.Tensor) -> tuple[torch.Tensor, str]:
        note(call, h)
        return _within(h, call, n, safe), _shape(h)

    def first(call: LayerCall, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
        note(call, h)
        return (*centred(h, safe=safe), _shape(h))

    # Statistics are computed inside the hooks, while each output is fresh: only the
    # first batch's centred representations are held, the second batch's are not stored.
    with Probe(model, layers, mode=mode, seed=seed) as probe, torch.no_grad():
        if pairing == "within":
            probe.reduce = within
            probe.run(x)
            calls, kept = probe.calls, probe.reduced
            values = [
                mean_offdiagonal_cosine(flat_inputs(x), safe=safe),
                *(kept[c.label][0] for c in calls),
            ]
        else:
            probe.reduce = first
            if shared is None or not shared(probe):
                probe.run(x)
            calls, kept = probe.calls, probe.reduced

            def second(call: LayerCall, h: torch.Tensor) -> torch.Tensor:
                note(call, h)
                return _correlate(kept.get(call.label), h, safe)

            probe.reduce = second
            with _said_of_the_noise_pass(noise_scale) if pairing == "noise" else nullcontext():
                probe.run(x_other)
            check_same_layers(calls, probe.calls, "the two minibatches")
            correlations = probe.reduced
            values = [
                pearson(flat_inputs(x), flat_inputs(x_other), safe=safe),
                *(correlations[c.label] for c in calls),
            ]
        shapes = [_input_shape(x), *(kept[c.label][-1] for c in calls)]
    return calls, shapes, values, probe.rule, non_finite


#: padding masks by their keyword: True where a position is padding (attention_mask: 0)
_PADDING_MASKS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "attention_mask": lambda m: m == 0,
    "key_padding_mask": lambda m: m != 0,
    "src_key_padding_mask": lambda m: m != 0,
}


def _warn_of_padding(*inputs: Inputs | None) -> None:
    """Say so when keyword inputs mark padded positions (``attention_mask`` 0, or
    ``key_padding_mask`` / ``src_key_padding_mask`` True, ``(N, T)``): the probe's
    correlations take every position of each output, the padded ones too."""
    padded, total, keys = 0, 0, []
    # keyword inputs, or a dict given as one positional input
    mappings = [m for x in inputs for m in (x if isinstance(x, tuple) else (x,))]
    for x in mappings:
        if not isinstance(x, Mapping):
            continue
        for key, is_pad in _PADDING_MASKS.items():
            mask = x.get(key)
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                padded += int(is_pad(mask).sum())
                total += mask.numel()
                keys.append(key)
    if padded:
        warnings.warn(
            f"the inputs' {', '.join(dict.fromkeys(keys))} marks {padded} of {total} positions as "
            f"padding; the representation probe takes every position of each layer's output, "
            f"the padded ones too (the model computes them like any other, and padding at the "
            f"same positions of both minibatches raises their correlation): for real tokens "
            f"only, probe with batches of sequences of one length (no padding)",
            stacklevel=user_stacklevel(),
        )


@contextmanager
def _said_of_the_noise_pass(noise_scale: float) -> Iterator[None]:
    """Warnings that layers raise in the noise pairing's second pass, shown with where they
    come from.

    That pass runs the model on ``X + noise_scale * std(X) * eps``, which can leave the range
    of the batch (negative values where every input is non-negative): a layer that checks its
    inputs (balanced normalization's non-negative input sums) warns about the probe's
    perturbed copy, not about the user's data, and its own advice would mislead. Only the
    showing changes: ``warnings.showwarning`` is wrapped for the pass, so the caller's filters
    decide as before (once per message by default; an ``error`` filter raises the layer's own
    warning), and a warning another thread shows meanwhile passes through untouched.
    """
    shown, thread = warnings.showwarning, threading.get_ident()
    active = True  # False after the pass: a wrapper left in the chain only passes through

    def show(message: Any, category: Any, filename: str, lineno: int, *args: Any) -> None:
        if active and threading.get_ident() == thread:
            text = (
                f"{message} [this warning comes from the representation probe's noise pass, "
                f"which runs the model on X + {noise_scale} * std(X) * eps: noisy copies of the "
                f"batch that can leave its range (negative values where the batch has none); "
                f"the layer's correlation is measured on those inputs, and pairing "
                f"'independent' compares two unperturbed batches instead]"
            )
            try:
                message = category(text)
            except Exception:  # a warning class that takes other arguments: its text then
                message = text
        shown(message, category, filename, lineno, *args)

    warnings.showwarning = show
    try:
        yield
    finally:
        active = False
        if warnings.showwarning is show:  # else another block wrapped it since: left to unwind
            warnings.showwarning = shown


def _correlate(first: tuple | None, h: torch.Tensor, safe: bool = False) -> torch.Tensor:
    if first is None:  # a layer the first pass did not run; check_same_layers reports it
        return torch.full((), float("nan"), device=h.device)
    a_centred, a_norm, _ = first
    return pearson_centred(a_centred, a_norm, h, safe=safe)


def _within(h: torch.Tensor, call: LayerCall, n: int, safe: bool = False) -> torch.Tensor:
    if h.dim() == 0 or h.shape[0] != n:
        raise ProbeError(
            f"layer {call.label!r} returned shape {tuple(h.shape)}, whose first axis is not the "
            f"batch of {n}; pairing='within' compares examples along the first axis (use "
            f"batch_first=True for transformers)"
        )
    return mean_offdiagonal_cosine(h, safe=safe)


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape[1:])) or "1"


def _input_shape(x: Inputs) -> str:
    """One example's input shape; several inputs joined by "+" (e.g. ``16+16`` for ids and mask)."""
    return "+".join(_shape(t) for _, t in input_tensors(x))


def _columns(
    calls: list[LayerCall],
    shapes: list[str],
    values: list[float],
    pairing: str,
    mode: str,
    seed: int,
) -> dict[str, list[Any]]:
    n = len(calls) + 1
    return {
        "layer": ["input", *(c.label for c in calls)],
        "depth": [0, *(c.depth for c in calls)],
        "metric": [METRICS[pairing]] * n,
        "value": values,
        "pairing": [pairing] * n,
        "module": ["input", *(c.name for c in calls)],
        "call": [1, *(c.call for c in calls)],
        "module_type": ["input", *(c.module_type for c in calls)],
        "shape": shapes,
        "mode": [mode] * n,
        "probe_seed": [seed] * n,
    }
