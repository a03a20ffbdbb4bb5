"""The table of measures: every probe and the Hessian, registered once.

A :class:`Measure` says what it reads (the probe batches, the Hessian set,
the loss), what it writes (metric names, and which result table), which
config switch turns it on and on which schedule it runs. A run dispatches
over :data:`MEASURES` at each scheduled step (:func:`measure_step`), and so
can any other driver, e.g. a recorder inside the user's own training loop:
build :class:`MeasureInputs` once, then call :func:`measure_step` with the
model at each step.

Adding a probe: write it (``normprobe/probes/``), register it here with
:func:`register`, and give it a switch under ``probes:`` in
:mod:`normprobe.config` (the config hash needs no patch: it hashes the
fields that differ from their defaults).

>>> [m.name for m in MEASURES.values()]  # doctest: +NORMALIZE_WHITESPACE
['representation', 'gradients', 'batch_dependence', 'train_eval_gap', 'signal',
 'batch_mean', 'hessian']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn

from normprobe.config import ConfigError, HessianConfig, ProbesConfig
from normprobe.hessian import hessian_spectrum
from normprobe.probes import (
    ProbeError,
    batch_mean,
    gradient_correlation,
    gradient_norms,
    growth_rate,
)
from normprobe.probes.capture import Probe, is_normalizer
from normprobe.probes.gradients import Listener, growth_of, statistics_columns
from normprobe.probes.signal import representation_columns
from normprobe.probes.structure import batch_dependence, signal_statistics, train_eval_gap
from normprobe.rows import Columns, Rows, frames_of
from normprobe.state import held
from normprobe.training import loss_for, norm_batch_of

__all__ = [
    "Measure",
    "MeasureInputs",
    "MEASURES",
    "TABLES",
    "register",
    "enabled_measures",
    "measure_step",
    "hessian_chunks",
    "has_norm_layers",
]

Batch = tuple[torch.Tensor, torch.Tensor]
#: the tables a measure may write (besides ``metrics``, the Hessian's SLQ nodes and densities)
TABLES = ("metrics", "hessian_nodes", "hessian_density")
Tables = dict[str, list[pd.DataFrame | Rows]]


@dataclass(frozen=True)
class MeasureInputs:
    """What the measures read, fixed for a whole run: the batches on the model's device.

    ``batch_a``/``batch_b``: two disjoint probe batches (inputs, targets);
    ``hessian_set``: the Hessian's probe set (None when no Hessian is
    measured); ``seed``: the run's seed (the representation probe's noise and
    the Hessian at step ``t`` draw with ``seed + t``, every other probe with
    ``seed``, so measuring never touches the global RNG);
    ``num_classes``: K of the outlier ratio ``lambda_1 / lambda_K``;
    ``loss_fn``: ``loss_fn(output, target)`` of the gradient probes and the
    Hessian (None: the mean cross-entropy of :func:`normprobe.training.loss_for`,
    what an analysis trains with; a recorder in the user's loop passes the
    loop's loss).
    """

    batch_a: Batch
    batch_b: Batch
    hessian_set: Batch | None = None
    seed: int = 0
    num_classes: int | None = None
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None

    def loss(self, model: nn.Module) -> Callable[[Any, torch.Tensor], torch.Tensor]:
        """The loss the measures differentiate: ``loss_fn``, or the model's cross-entropy."""
        return self.loss_fn if self.loss_fn is not None else loss_for(model)

    def to(self, device: torch.device | str) -> MeasureInputs:
        """The same inputs on ``device``."""

        def move(batch: Batch | None) -> Batch | None:
            return None if batch is None else (batch[0].to(device), batch[1].to(device))

        return MeasureInputs(
            move(self.batch_a),
            move(self.batch_b),
            move(self.hessian_set),
            self.seed,
            self.num_classes,
            self.loss_fn,
        )


Compute = Callable[[nn.Module, int, MeasureInputs, ProbesConfig, HessianConfig], Tables]


@dataclass(frozen=True)
class Measure:
    """One registered measure.

    ``switches``: the config sections (``probes.<name>`` or ``hessian``)
    whose ``enabled`` turns it on (any of them); ``schedule``: the probe
    schedule or the Hessian's; ``reads``/``writes``: what it takes from
    :class:`MeasureInputs` and the metric names it records (documentation
    and a recorder can list them); ``compute(model, step, inputs,
    probes, hessian)`` returns frames per table (without the step column:
    :func:`measure_step` adds it); a frame may also be given as its columns
    (name -> list of values), which :func:`measure_step` makes a frame once,
    with the step column, instead of copying a frame to add it.
    """

    name: str
    switches: tuple[str, ...]
    schedule: Literal["probes", "hessian"]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    compute: Compute

    def enabled(self, probes: ProbesConfig, hessian: HessianConfig) -> bool:
        """Whether the config turns this measure on."""
        for switch in self.switches:
            section, _, key = switch.partition(".")
            node = hessian if section == "hessian" else getattr(probes, key)
            if node.enabled:
                return True
        return False


#: name -> measure, in the order a step measures them (the order of the result rows)
MEASURES: dict[str, Measure] = {}


def register(measure: Measure) -> Measure:
    """Add ``measure`` to :data:`MEASURES` (after the others); a name is registered once."""
    if measure.name in MEASURES:
        raise ValueError(f"measure {measure.name!r} is already registered")
    MEASURES[measure.name] = measure
    return measure


def enabled_measures(
    probes: ProbesConfig, hessian: HessianConfig, *, schedule: str | None = None
) -> list[Measure]:
    """The measures the config turns on (optionally only those on ``schedule``), in order."""
    return [
        m
        for m in MEASURES.values()
        if m.enabled(probes, hessian) and (schedule is None or m.schedule == schedule)
    ]


def measure_step(
    model: nn.Module,
    step: int,
    inputs: MeasureInputs,
    measures: Iterable[Measure],
    probes: ProbesConfig,
    hessian: HessianConfig,
    *,
    lazy: bool = False,
) -> Tables:
    """Run ``measures`` on ``model`` at ``step``; frames per table, each with a ``step`` column.

    Every measure leaves the model exactly as found (the probes' contract).
    The rows measures give as columns are kept as lists until the step
    ends and made one frame (per run of consecutive such measures), the same
    rows and dtypes as joining a frame per measure, for a fraction of the
    pandas work. With ``lazy``, they are not made frames at all but
    returned as :class:`~normprobe.rows.Rows` for the caller to join with
    the rest of its run (:func:`~normprobe.rows.frame_of`): one frame per
    run instead of one per step.
    """
    items: Tables = {name: [] for name in TABLES}
    measures = list(measures)
    with held(model):  # one snapshot of the model's state for the whole step
        together = _shared_forward(measures, probes)
        done: dict[str, Tables] = {}
        if together:
            done.update(_representation_and_gradients(model, step, inputs, probes, hessian))
        computed = [
            done[m.name] if m.name in done else m.compute(model, step, inputs, probes, hessian)
            for m in measures
        ]
    for tables in computed:
        for table, frames in tables.items():
            items[table].extend(
                Rows(step, frame) if isinstance(frame, Mapping) else _tagged(frame, step)
                for frame in frames
            )
    if lazy:
        return items
    return {table: frames_of(blocks) for table, blocks in items.items()}


def _tagged(frame: pd.DataFrame, step: int) -> pd.DataFrame:
    frame = frame.copy()
    frame.insert(0, "step", step)
    return frame


# --------------------------------------------------------------------------- the measures


def _representation(
    model: nn.Module, step: int, inputs: MeasureInputs, pc: ProbesConfig, hc: HessianConfig
) -> Tables:
    kwargs = _representation_kwargs(step, inputs, pc)
    return {"metrics": [representation_columns(model, inputs.batch_a[0], **kwargs)]}


def _representation_kwargs(step: int, inputs: MeasureInputs, pc: ProbesConfig) -> dict[str, Any]:
    rc = pc.representation
    kwargs: dict[str, Any] = {"pairing": rc.pairing, "mode": rc.mode, "layers": rc.layers}
    if rc.pairing == "noise":
        kwargs.update(noise_scale=rc.noise_scale, seed=inputs.seed + step)
    elif rc.pairing == "independent":
        kwargs["x_other"] = inputs.batch_b[0]
    return kwargs


def _shared_forward(measures: list[Measure], pc: ProbesConfig) -> bool:
    """Whether the representation probe's first pass (batch_a, no gradient) can be the
    gradient probes' batch_a pass: both measured, in one mode, the gradient probes on one
    layer rule (one pass pair), and a pairing that runs that pass."""
    names = {m.name for m in measures}
    rc = pc.representation
    return (
        {"representation", "gradients"} <= names
        and rc.pairing in ("noise", "independent")
        and _one_pass_pair(pc)
        and rc.mode == pc.gradient_correlation.mode
    )


def _one_pass_pair(pc: ProbesConfig) -> bool:
    """Whether the gradient correlation and the gradient norms take the same layers in the same
    mode: one pass pair serves both (:func:`~normprobe.probes.gradients.statistics_columns`)."""
    gc, gn = pc.gradient_correlation, pc.gradient_norms
    return gc.enabled and gn.enabled and (gc.layers, gc.mode) == (gn.layers, gn.mode)


def _gradient_statistics(
    model: nn.Module, inputs: MeasureInputs, pc: ProbesConfig, listener: Listener | None = None
) -> Tables:
    """Both gradient probes from one pass pair: their rows (grad_corr, then the norms) as
    columns, and the growth rate read from them."""
    gc = pc.gradient_correlation
    both = statistics_columns(
        model, inputs.loss(model), inputs.batch_a, inputs.batch_b, layers=gc.layers,
        mode=gc.mode, seed=inputs.seed, listener=listener,
    )  # fmt: skip
    return {"metrics": [both, _growth_row(_growth_or_nan(both))]}


def _representation_and_gradients(
    model: nn.Module, step: int, inputs: MeasureInputs, pc: ProbesConfig, hc: HessianConfig
) -> dict[str, Tables]:
    """The representation and gradients measures with one forward pass fewer: batch_a's
    gradient pass is recorded by the representation probe too, whose own first pass runs
    only when that one drew random numbers (then it is not the pass it would have run).

    The tables are the same as the two measures' own, bit for bit (tested with every
    normalizer of the zoo). One difference in what the passes see: the representation
    probe's second pass sees the model as the step found it (the gradient probe puts back
    what its passes changed), not as its own first pass left it; the two differ only for a
    model whose forward pass changes state that a later pass reads (a call counter, say).
    """
    out: dict[str, Tables] = {}

    def gradient_pass(probe: Probe) -> bool:
        listener = Listener(probe)
        out["gradients"] = _gradient_statistics(model, inputs, pc, listener)
        return listener.quiet

    rep = representation_columns(
        model, inputs.batch_a[0], shared=gradient_pass, **_representation_kwargs(step, inputs, pc)
    )
    # without a first pass to share, the gradients measure runs on its own
    return {"representation": {"metrics": [rep]}, **out}


def _gradients(
    model: nn.Module, step: int, inputs: MeasureInputs, pc: ProbesConfig, hc: HessianConfig
) -> Tables:
    if _one_pass_pair(pc):  # batch_a's gradients serve both probes: two passes, not three
        return _gradient_statistics(model, inputs, pc)
    # mean cross-entropy (per example, or per token for a language model) unless a loss is given
    loss_fn = inputs.loss(model)
    a, b = inputs.batch_a, inputs.batch_b
    gc, gn = pc.gradient_correlation, pc.gradient_norms
    frames: list[Any] = []
    if gc.enabled:
        frames.append(
            gradient_correlation(
                model, loss_fn, a, b, layers=gc.layers, mode=gc.mode, seed=inputs.seed
            )
        )
    if gn.enabled:
        norms = gradient_norms(model, loss_fn, a, layers=gn.layers, mode=gn.mode, seed=inputs.seed)
        norms = norms.reset_index(drop=True)
        frames.append(norms)
        frames.append(_growth_row(_growth_or_nan(norms)))
    return {"metrics": frames}


def _growth_row(value: float) -> Columns:
    return {
        "layer": [None],
        "depth": [float("nan")],
        "metric": ["grad_growth_rate"],
        "value": [value],
    }


def _growth_or_nan(rows: pd.DataFrame | Columns) -> float:
    """The growth rate, or NaN where it is undefined (a layer whose gradient is exactly zero,
    as in a network that died in training): a measurement, not a reason to fail the run."""
    try:
        return growth_rate(rows) if isinstance(rows, pd.DataFrame) else growth_of(dict(rows))
    except ProbeError:
        return float("nan")


def _batch_dependence(
    model: nn.Module, step: int, inputs: MeasureInputs, pc: ProbesConfig, hc: HessianConfig
) -> Tables:
    x, x_other = inputs.batch_a[0], inputs.batch_b[0]
    layers = pc.batch_dependence.layers
    return {
        "metrics": [
            batch_dependence(model, x, x_other, layers=layers, mode=mode, seed=inputs.seed)
            for mode in ("train", "eval")
        ]
    }


def _train_eval_gap(
    model: nn.Module, step: int, inputs: MeasureInputs, pc: ProbesConfig, hc: HessianConfig
) -> Tables:
    x, layers = inputs.batch_a[0], pc.train_eval_gap.layers
    return {"metrics": [train_eval_gap(model, x, layers=layers, seed=inputs.seed)]}


def _signal(
    model: nn.Module, step: int, inputs: MeasureInputs, pc: ProbesConfig, hc: HessianConfig
) -> Tables:
    x, sc = inputs.batch_a[0], pc.signal
    return {
        "metrics": [
            signal_statistics(
                model, x, layers=sc.layers, seed=inputs.seed, channel_axis=sc.channel_axis
            )
        ]
    }


def has_norm_layers(model: nn.Module) -> bool:
    """Whether ``model`` has a normalization layer for :func:`normprobe.probes.batch_mean`."""
    return any(is_normalizer(m) for m in model.modules())


def _batch_mean(
    model: nn.Module, step: int, inputs: MeasureInputs, pc: ProbesConfig, hc: HessianConfig
) -> Tables:
    if not has_norm_layers(model):  # nothing to measure (normalizer none, weight norm)
        return {}
    x, mode = inputs.batch_a[0], pc.batch_mean.mode
    return {"metrics": [batch_mean(model, x, mode=mode, seed=inputs.seed)]}


def hessian_chunks(data: Batch, chunk_size: int, norm_batch: int | None) -> Batch | list[Batch]:
    """The Hessian set as ``hessian_spectrum`` takes it.

    Without microbatch normalizers, the set itself (cut into nearly equal
    chunks there). With ``norm_batch`` g, consecutive chunks of
    ``chunk_size`` (a multiple of g, checked with the config) and a last
    chunk of the rest, so every chunk is a whole number of microbatches; a
    remainder of fewer than g examples (only when the training set is
    smaller than ``data.hessian_samples``) is left out.
    """
    if norm_batch is None:
        return data
    x, y = data
    n = len(x) // norm_batch * norm_batch
    if n == 0:
        raise ConfigError(
            f"data.hessian_samples: the Hessian set has {len(x)} examples, fewer than one "
            f"microbatch of norm_batch {norm_batch}"
        )
    return [
        (x[i : min(i + chunk_size, n)], y[i : min(i + chunk_size, n)])
        for i in range(0, n, chunk_size)
    ]


def _hessian(
    model: nn.Module, step: int, inputs: MeasureInputs, pc: ProbesConfig, hc: HessianConfig
) -> Tables:
    if inputs.hessian_set is None:
        raise ValueError("the hessian measure needs MeasureInputs.hessian_set")
    spectrum = hessian_spectrum(
        model,
        inputs.loss(model),
        hessian_chunks(inputs.hessian_set, hc.chunk_size, norm_batch_of(model)),
        what=tuple(dict.fromkeys(hc.pieces)),
        n_samples=None,  # the whole set given (data.hessian_samples long in an analysis)
        steps=hc.lanczos_steps,
        num_vectors=hc.start_vectors,
        k=hc.top_k,
        # K of the outlier ratio: the classes (Rao & Sohl-Dickstein 2020, sec. 6) unless the config says
        num_classes=hc.outlier_k or inputs.num_classes,
        trace_samples=hc.trace_samples,
        norm_mode=hc.norm_mode,
        chunk_size=hc.chunk_size,
        dtype=getattr(torch, hc.dtype),
        batched=hc.batched,
        seed=inputs.seed + step,
    )
    # the spectrum's own seed would collide with the run's seed column
    table = spectrum.to_frame().rename(columns={"seed": "probe_seed"})
    nodes = table["metric"] == "slq_node"
    out: Tables = {"metrics": [table[~nodes]], "hessian_nodes": [table[nodes]]}
    if spectrum.nodes is not None:
        density = spectrum.density()
        density.insert(0, "norm_mode", spectrum.norm_mode)
        out["hessian_density"] = [density]
    return out


register(
    Measure(
        "representation",
        ("probes.representation",),
        "probes",
        reads=("batch_a", "batch_b (pairing independent)"),
        writes=("repr_corr_noise", "repr_corr_independent", "repr_corr_within"),
        compute=_representation,
    )
)
register(
    Measure(
        "gradients",
        ("probes.gradient_correlation", "probes.gradient_norms"),
        "probes",
        reads=("batch_a", "batch_b", "loss"),
        writes=("grad_corr", "grad_norm", "grad_norm_ratio", "grad_growth_rate"),
        compute=_gradients,
    )
)
register(
    Measure(
        "batch_dependence",
        ("probes.batch_dependence",),
        "probes",
        reads=("batch_a", "batch_b"),
        writes=("batch_dependence",),
        compute=_batch_dependence,
    )
)
register(
    Measure(
        "train_eval_gap",
        ("probes.train_eval_gap",),
        "probes",
        reads=("batch_a",),
        writes=("train_eval_gap",),
        compute=_train_eval_gap,
    )
)
register(
    Measure(
        "signal",
        ("probes.signal",),
        "probes",
        reads=("batch_a",),
        writes=("signal_sq_mean", "signal_var"),
        compute=_signal,
    )
)
register(
    Measure(
        "batch_mean",
        ("probes.batch_mean",),
        "probes",
        reads=("batch_a",),
        writes=("batch_mean_sq",),
        compute=_batch_mean,
    )
)
register(
    Measure(
        "hessian",
        ("hessian",),
        "hessian",
        reads=("hessian_set", "loss"),
        writes=(
            "eigenvalue",
            "smallest_eigenvalue",
            "outlier_ratio",
            "trace",
            "slq_node",
            "density",
        ),
        compute=_hessian,
    )
)
