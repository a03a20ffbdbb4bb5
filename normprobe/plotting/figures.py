"""One function per figure of Rao & Sohl-Dickstein 2020 (docs/definitions.md, Figures), drawn from stored results only.

(Over 500 lines on purpose: twelve figure functions and the line, band,
legend and caption helpers they share; the appendix figures are in
:mod:`normprobe.plotting.experiments`.)

Each function takes a :class:`~normprobe.results.Results` (or, for the line
figures, its metrics DataFrame) and an optional ``Axes``/``Figure``, and
returns what it drew on. Lines are the median over seeds with a band from
the lowest to the highest seed (drawn when there are several seeds); every
normalizer has the same color and marker in every figure
(:mod:`normprobe.plotting.style`). A caption line under each figure states
the run's key settings. Nothing here trains or probes: a figure the tables
cannot support raises :class:`FigureSkipped` saying what is missing.

Columns read, so that a table from anywhere (a :class:`~normprobe.Monitor`'s
results, a frame made by hand) can be drawn: every figure reads
``normalizer, step, metric, value`` of the metrics table (:data:`BASE_COLUMNS`;
``seed`` for the band over seeds, ``selected`` when present); the depth
figures (1a, 1b, 2a, 2b) also ``depth``; the training figures of a per-layer
metric (3b, 3c) also ``run, depth, layer`` (3c: ``seed, lr``); figure 4 reads
the ``hessian_nodes`` table's ``normalizer, seed, step, value, weight``. A
missing column raises :class:`MissingColumnError` naming it and how to add
it. Each figure's docstring names the metrics it draws.

>>> import pandas as pd
>>> frame = pd.DataFrame({"normalizer": ["batch", "batch", "layer", "layer"], "seed": 0,
...     "lr": 0.1, "step": 0, "layer": ["a", "b", "a", "b"], "depth": [1, 2, 1, 2],
...     "metric": "repr_corr_noise", "value": [0.9, 0.5, 0.95, 0.9]})
>>> ax = depth_profile(frame, "repr_corr_noise")
>>> len(ax.get_lines())
2
>>> plt.close("all")
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from normprobe.errors import NormprobeError
from normprobe.plotting.style import color, label, marker, norm_order, style_context
from normprobe.results import Results, selected_rows

__all__ = [
    "FigureSkipped",
    "MissingColumnError",
    "require_columns",
    "BASE_COLUMNS",
    "REPR_METRICS",
    "repr_metric",
    "model_text",
    "depth_profile",
    "through_training",
    "hessian_density_panels",
    "caption",
    "fig1a",
    "fig1b",
    "fig2a",
    "fig2b",
    "fig3a",
    "fig3b",
    "fig3c",
    "fig4",
    "fig6a",
    "fig6b",
]

Data = Results | pd.DataFrame

REPR_METRICS = ("repr_corr_noise", "repr_corr_independent", "repr_cos_within")
REPR_LABEL = {
    "repr_corr_noise": "correlation of X and X + noise",
    "repr_corr_independent": "correlation of two minibatches",
    "repr_cos_within": "mean cosine within a minibatch",
}

WEIGHT_DEPTH = "depth (layer with weights, in execution order)"


class FigureSkipped(LookupError):
    """The results hold no data for this figure; the message says what is missing."""


class MissingColumnError(FigureSkipped, NormprobeError):
    """A table handed to a figure lacks a column it reads; the message says how to add it."""


#: how to add each column the figures read to a table made by hand
HOW_TO_ADD = {
    "run": "a name per run, e.g. frame['run'] = 'mine' (a Monitor's results name each run)",
    "normalizer": "the legend group, e.g. frame['normalizer'] = 'batch' "
    "(Monitor(normalizer='batch') records it)",
    "seed": "frame['seed'] = 0 (Monitor(seed=...) records it)",
    "lr": "frame['lr'] = 0.1 (Monitor(lr=...) or Monitor(optimizer=...) records it)",
    "step": "the training step of each row (Monitor.step(step) and Monitor.log(step, ...) "
    "record it)",
    "metric": "the measured quantity's name per row, as the probes write it",
    "value": "the measured number per row",
    "depth": "the probed layer's position (the probes write it; NaN for whole-model rows)",
    "layer": "the probed layer's name (the probes write it; None for whole-model rows)",
    "weight": "the SLQ node weights (the Hessian measure writes hessian_nodes with them)",
    "variant": "the config variant of each run (analyses with variants: write it)",
}


def require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise :class:`MissingColumnError` naming the first missing column and how to add it.

    >>> require_columns(pd.DataFrame({"metric": [], "value": []}), ["metric", "run"], "fig3a")
    Traceback (most recent call last):
    ...
    normprobe.plotting.figures.MissingColumnError: fig3a reads the column 'run', which the table lacks (it has metric, value); add a name per run, e.g. frame['run'] = 'mine' (a Monitor's results name each run)
    """
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        column = missing[0]
        more = f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise MissingColumnError(
            f"{what} reads the column {column!r}, which the table lacks (it has "
            f"{', '.join(map(str, frame.columns)) or 'no columns'}){more}; add "
            f"{HOW_TO_ADD.get(column, 'it')}"
        )


# --------------------------------------------------------------------------- data helpers


def _metrics(data: Data) -> pd.DataFrame:
    return data.metrics if isinstance(data, Results) else data


#: the columns every figure reads from a metrics table
BASE_COLUMNS = ("normalizer", "step", "metric", "value")


def rows_of(
    data: Data, metric: str, *, selected: bool = True, columns: Sequence[str] = ()
) -> pd.DataFrame:
    """Rows of ``metric``, only the selected learning rate per normalizer (when marked).

    The table must have :data:`BASE_COLUMNS` and ``columns``; a missing one
    raises :class:`MissingColumnError` saying how to add it.
    """
    frame = _metrics(data)
    if frame is None or frame.empty:
        raise FigureSkipped(f"no {metric!r} rows: the results table is empty")
    require_columns(frame, [*BASE_COLUMNS, *columns], f"a figure of {metric!r}")
    rows = frame[frame["metric"] == metric]
    if selected:
        rows = selected_rows(rows)
    rows = rows[np.isfinite(rows["value"].astype(float))]
    if rows.empty:
        raise FigureSkipped(f"no {metric!r} rows in the results (was that probe enabled?)")
    return rows


def _at_step(rows: pd.DataFrame, step: int, what: str) -> tuple[pd.DataFrame, int]:
    """Rows at ``step``, or at the nearest measured step (which the caption states)."""
    steps = np.array(sorted(rows["step"].unique()))
    if steps.size == 0:
        raise FigureSkipped(f"no measured steps for {what}")
    nearest = int(steps[np.argmin(np.abs(steps - step))])
    return rows[rows["step"] == nearest], nearest


def repr_metric(data: Data) -> str:
    """The representation metric present in the results (the noise pairing preferred)."""
    frame = _metrics(data)
    present = set(frame["metric"].unique()) if frame is not None and "metric" in frame else set()
    for metric in REPR_METRICS:
        if metric in present:
            return metric
    raise FigureSkipped("no representation-correlation rows (probes.representation disabled?)")


def config_of(data: Any) -> dict[str, Any]:
    manifest = data.manifest if isinstance(data, Results) else {}
    return (manifest or {}).get("config", {}) or {}


def model_text(data: Any) -> str:
    """A short name of the analysed model, e.g. ``WRN-26-2 without skips`` or ``MLP, 8 x 128``."""
    model = config_of(data).get("model", {}) or {}
    options = model.get("options", {}) or {}
    if model.get("name") == "wrn":
        skip = options.get("skip", True)
        depth, widen = options.get("depth", 16), options.get("widen", 1)
        return f"WRN-{depth}-{widen} {'with' if skip else 'without'} skips"
    if model.get("name") == "mlp":
        return f"MLP, {options.get('depth', 10)} x {options.get('width', 128)}"
    if model.get("name") == "transformer":
        return f"Transformer LM, {options.get('depth', 2)} blocks x {options.get('width', 64)}"
    if model.get("factory"):
        return str(model["factory"]).split(":")[-1]
    return ""


# --------------------------------------------------------------------------- drawing helpers


def _lines(ax: Axes, rows: pd.DataFrame, x: str) -> None:
    """Median over seeds with a min-max band, one line (color + marker) per normalizer."""
    order = norm_order(rows["normalizer"].unique())
    sns.lineplot(
        data=rows,
        x=x,
        y="value",
        hue="normalizer",
        style="normalizer",
        hue_order=order,
        style_order=order,
        palette={n: color(n) for n in order},
        markers={n: marker(n) for n in order},
        dashes=False,
        estimator="median",
        errorbar=("pi", 100),
        err_kws={"alpha": 0.15, "linewidth": 0},
        markersize=4,
        markeredgewidth=0.6,
        ax=ax,
    )
    # lines that coincide (BatchNorm, Batch-Train and Batch Renorm at init) must not hide
    # BatchNorm: earlier normalizers in the legend order are drawn on top
    rank = {color(n): i for i, n in enumerate(order)}
    for line in ax.get_lines():
        i = rank.get(mcolors.to_hex(line.get_color()))
        if i is not None:
            line.set_zorder(3 + (len(order) - i) / len(order))
    _legend(ax)


def _legend(ax: Axes) -> None:
    """Legend outside the axes on the right, with display names, so it never covers data."""
    handles, names = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if handles:
        ax.legend(
            handles,
            [label(n) for n in names],
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0.0,
            handlelength=1.8,
            ncols=1 if len(handles) <= 12 else 2,
            columnspacing=0.8,
        )
    # seaborn adds empty proxy lines for its legend; the legend has its own copies, so
    # drop them and leave one line per normalizer on the axes
    for line in list(ax.get_lines()):
        if len(line.get_xdata()) == 0:
            line.remove()


def caption(data: Data | None, extra: str = "", *, band: str = "min-max") -> str:
    """The run's key settings, for the line under a figure.

    >>> caption(None, "step 0")
    'step 0'
    """
    parts: list[str] = []
    config = config_of(data)
    if config:
        parts.append(model_text(data))
        # a Monitor's folder records no data or train section: the user's loop had them
        data_cfg = config.get("data") or {}
        if data_cfg:
            options = data_cfg.get("options", {}) or {}
            size = f" {options['size']}x{options['size']}" if options.get("size") else ""
            parts.append(f"{data_cfg.get('name')}{size}")
        train = config.get("train") or {}
        if train.get("steps"):
            parts.append(
                f"{train.get('optimizer')} lr {_lr_text(data)}, batch {train.get('batch_size')}, "
                f"{train.get('steps')} steps"
            )
            parts.append(_unsettled_text(data))
        elif data_cfg:
            parts.append(f"untrained, probe batch {data_cfg.get('probe_batch')}")
        if train:
            seeds = len(train.get("seeds", []))
            spread = f": median, band {band}" if seeds > 1 else ""
            parts.append(f"{seeds} seed{'s' if seeds != 1 else ''}{spread}")
    if extra:
        parts.append(extra)
    return " · ".join(p for p in parts if p)


def _lr_text(data: Data | None) -> str:
    runs = data.runs if isinstance(data, Results) else pd.DataFrame()
    if not len(runs) or "lr" not in runs:
        return "?"
    grid = runs.groupby("normalizer")["lr"].nunique()
    if (grid > 1).any():
        return "best of a grid per normalizer"
    if runs["lr"].nunique() > 1:
        return "set per normalizer"
    return f"{runs['lr'].iloc[0]:g}"


def _unsettled_text(data: Data | None) -> str:
    """Which normalizers' selected rate is at an edge of their grid (or diverged everywhere):
    the figure's lines for them are not settled."""
    runs = data.runs if isinstance(data, Results) else pd.DataFrame()
    if not len(runs) or "lr_edge" not in runs:
        return ""
    edge = runs[runs["lr_edge"].isin(("low", "high", "diverged"))]
    if edge.empty:
        return ""
    names = []
    for _, row in edge.drop_duplicates(
        [c for c in ("normalizer", "variant") if c in edge]
    ).iterrows():
        variant = row.get("variant")
        where = f" ({variant})" if isinstance(variant, str) else ""
        names.append(f"{row['normalizer']}{where} {row['lr_edge']}")
    return "not settled (selected rate at the grid's edge): " + ", ".join(names)


def log_y(ax: Axes) -> None:
    """Log y axis with plain tick labels (0.1, 60; not 1e-01, 6 x 10^1).

    Spans under a decade and a half also label the minor ticks at 2, 3 and 5.
    """
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 30:

        def minor(v: float, _: Any) -> str:
            lead = round(v / 10 ** math.floor(math.log10(v)), 6)
            return f"{v:g}" if lead in (2, 3, 5) else ""

        ax.yaxis.set_minor_formatter(mticker.FuncFormatter(minor))
    else:
        ax.yaxis.set_minor_formatter(mticker.NullFormatter())


def _finish(ax: Axes, data: Any, title: str, extra: str) -> Axes:
    ax.set_title(title, loc="left")
    text = textwrap.fill(caption(data, extra), 130)
    if text:
        ax.annotate(
            text,
            xy=(0.0, -0.2),
            xycoords="axes fraction",
            va="top",
            fontsize=7,
            color="#444444",
            annotation_clip=False,
        )
    return ax


def _axes(ax: Axes | None, size: tuple[float, float] = (5.6, 3.4)) -> Axes:
    """``ax``, or the axes of a new figure whose layout keeps the legend (outside the axes,
    on the right) and the caption inside it, so ``savefig`` keeps them without
    ``bbox_inches="tight"``."""
    if ax is None:
        _, ax = plt.subplots(figsize=size, layout="constrained")
    return ax


def with_model(title: str, data: Any) -> str:
    model = model_text(data)
    return f"{title} ({model})" if model else title


# --------------------------------------------------------------------------- generic figures


def depth_profile(
    data: Data,
    metric: str,
    *,
    step: int = 0,
    ax: Axes | None = None,
    logy: bool = False,
    ylabel: str | None = None,
    xlabel: str = "depth (probed layer, in execution order; 0 = input)",
    title: str | None = None,
) -> Axes:
    """``metric`` against layer depth at one training step (default: initialization).

    Depth is the order in which the probed layers run (0 is the input).
    Reads the columns ``normalizer, step, depth, metric, value`` (``seed``
    when there are several: the band) and ``selected`` when present.
    """
    rows, at = _at_step(rows_of(data, metric, columns=("depth",)), step, metric)
    rows = rows[rows["depth"].notna()]
    if rows.empty:
        raise FigureSkipped(f"{metric!r} has no per-layer rows at step {at}")
    if logy:
        rows = rows[rows["value"] > 0]
    with style_context():
        ax = _axes(ax)
        _lines(ax, rows, "depth")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel or metric)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if logy:
            log_y(ax)
        where = "initialization" if at == 0 else f"step {at}"
        extra = f"step {at}" + (_same_at_init(rows) if at == 0 else "")
        return _finish(ax, data, title or f"{metric} at {where}", extra)


#: normalizers that compute exactly what another does before any training step
SAME_AT_INIT = {
    "batch-train": "batch",
    "batch-renorm": "batch",
    "regnorm": "layer",
    "none": "weight",  # weight norm starts with g = ||V||: the same weights
}


def _same_at_init(rows: pd.DataFrame) -> str:
    """A caption note naming the lines that coincide at initialization (hidden under another)."""
    present = set(rows["normalizer"].unique())
    pairs = [(n, m) for n, m in SAME_AT_INIT.items() if n in present and m in present]
    if not pairs:
        return ""
    return " · at init " + ", ".join(f"{label(n)} = {label(m)}" for n, m in pairs)


def through_training(
    data: Data,
    metric: str,
    *,
    layer: str | None = None,
    aggregate: str | None = None,
    where: dict[str, Any] | None = None,
    ax: Axes | None = None,
    logy: bool = False,
    ylabel: str | None = None,
    title: str | None = None,
) -> Axes:
    """``metric`` against the training step.

    Per-layer metrics need ``layer`` ("last", "first" or a module name) or
    ``aggregate="mean"`` (over layers); ``where`` keeps only rows whose
    columns equal the given values (e.g. ``{"index": 1}`` for lambda_1).
    Reads the columns ``normalizer, step, metric, value`` and, for per-layer
    metrics, ``run, depth, layer`` (``aggregate="mean"``: also ``seed, lr``);
    ``selected`` when present.
    """
    rows = rows_of(data, metric)
    if "depth" in rows and rows["depth"].notna().any():
        need = ("run", "depth", "layer") + (("seed", "lr") if aggregate == "mean" else ())
        require_columns(rows, need, f"through_training({metric!r})")
    for column, value in (where or {}).items():
        if column not in rows:
            raise FigureSkipped(f"{metric!r} rows have no {column!r} column")
        rows = rows[rows[column] == value]
    note = ""
    if rows["depth"].notna().any():
        if layer in ("last", "first"):
            pick = "max" if layer == "last" else "min"
            depth = rows.groupby("run")["depth"].transform(pick)
            rows = rows[rows["depth"] == depth]
            names = sorted(rows["layer"].dropna().astype(str).unique())
            note = f"{layer} probed layer: {', '.join(names[:2])}"
        elif layer is not None:
            rows = rows[rows["layer"] == layer]
            note = f"layer {layer}"
        elif aggregate == "mean":
            rows = rows[rows["depth"].notna()]
            keys = ["run", "normalizer", "seed", "lr", "step"]  # lr NaN: a Monitor without one
            rows = rows.groupby(keys, as_index=False, dropna=False)["value"].mean()
            note = "mean over probed layers"
        else:
            raise ValueError(
                f"{metric} is per layer: pass layer='last'|'first'|<name> or aggregate='mean'"
            )
    if logy:
        rows = rows[rows["value"] > 0]
    if rows.empty:
        raise FigureSkipped(f"no {metric!r} rows for layer {layer!r}")
    if rows["step"].nunique() < 2:
        raise FigureSkipped(f"{metric!r} was measured at one step only; nothing to draw over time")
    with style_context():
        ax = _axes(ax)
        _lines(ax, rows, "step")
        ax.set_xlabel("training step (SGD updates)")
        ax.set_ylabel(ylabel or metric)
        if logy:
            log_y(ax)
        return _finish(ax, data, title or f"{metric} through training", note)


def _gaussian_density(nodes: pd.DataFrame, grid: np.ndarray, width: float) -> np.ndarray:
    """Average over start vectors of ``sum_i w_i N(grid; node_i, width^2)``.

    The same smoothing as :func:`normprobe.hessian.lanczos.gaussian_density`,
    restated here so that plotting depends on the stored tables only.
    """
    out = np.zeros_like(grid)
    groups = list(nodes.groupby("vector")) if "vector" in nodes else [(0, nodes)]
    for _, g in groups:
        z = (grid[:, None] - g["value"].to_numpy(float)[None, :]) / width
        out += np.exp(-0.5 * z * z) @ g["weight"].to_numpy(float)
    return out / (width * math.sqrt(2.0 * math.pi) * len(groups))


def hessian_density_panels(
    data: Results,
    *,
    step: int = 50,
    fig: Figure | None = None,
    normalizers: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Figure 4: the SLQ spectral density at ``step``, one panel per normalizer, shared x axis.

    Densities are re-smoothed from the stored nodes and weights on one grid
    spanning every panel's spectrum (Gaussian kernel, 1% of that range) and
    drawn on a log scale. Uses the selected learning rate and the first seed.
    Reads the ``hessian_nodes`` columns ``normalizer, seed, step, value,
    weight`` (``vector`` when there are several start vectors, ``run`` to
    pick the selected runs).
    """
    nodes = data.hessian_nodes if isinstance(data, Results) else data
    if nodes is None or nodes.empty:
        raise FigureSkipped(
            "no Hessian nodes in the results (the Hessian is off, or its pieces leave out density)"
        )
    require_columns(nodes, ("normalizer", "seed", "step", "value", "weight"), "the Hessian density")
    if isinstance(data, Results) and len(data.runs) and "selected" in data.runs:
        chosen = data.runs[data.runs["selected"].fillna(False).astype(bool)]["run"]
        if len(chosen):
            nodes = nodes[nodes["run"].isin(set(chosen))]
    nodes = nodes[np.isfinite(nodes["value"]) & np.isfinite(nodes["weight"])]
    if nodes.empty:
        raise FigureSkipped("no finite Hessian nodes for the selected runs")
    nodes, at = _at_step(nodes, step, "the Hessian")
    first_seed = nodes.groupby("normalizer")["seed"].transform("min")
    nodes = nodes[nodes["seed"] == first_seed]
    order = [
        n
        for n in norm_order(nodes["normalizer"].unique())
        if normalizers is None or n in normalizers
    ]
    if not order:
        raise FigureSkipped("no normalizer has Hessian nodes at that step")
    lo, hi = float(nodes["value"].min()), float(nodes["value"].max())
    spread = hi - lo if hi > lo else max(abs(hi), 1.0)
    width = 0.01 * spread
    grid = np.linspace(lo - 5 * width, hi + 5 * width, 800)
    cols = min(4, len(order))
    rows_n = math.ceil(len(order) / cols)
    with style_context():
        if fig is None:
            fig = plt.figure(figsize=(2.5 * cols + 0.5, 1.75 * rows_n + 1.0))
        axes = fig.subplots(rows_n, cols, sharex=True, sharey=True, squeeze=False)
        densities = {
            n: _gaussian_density(nodes[nodes["normalizer"] == n], grid, width) for n in order
        }
        peak = max(float(d.max()) for d in densities.values())
        floor = peak * 1e-7  # seven decades below the highest peak: the visible range
        for ax, norm in zip(axes.flat, order):
            density = np.maximum(densities[norm], floor)
            ax.plot(grid, density, color=color(norm), lw=1.1)
            ax.fill_between(grid, floor, density, color=color(norm), alpha=0.18, lw=0)
            ax.set_yscale("log")
            ax.set_ylim(floor, peak * 3)
            ax.set_title(label(norm), loc="left", fontsize=9, color=color(norm))
            ax.axvline(0.0, color="#888888", lw=0.6, ls=":")
        for ax in list(axes.flat)[len(order) :]:
            ax.set_visible(False)
        for i, ax in enumerate(axes.flat):
            # the last visible panel of each column carries the x label
            below = i + cols
            if i < len(order) and below >= len(order):
                ax.set_xlabel("Hessian eigenvalue λ")
                ax.xaxis.set_tick_params(labelbottom=True)
        for ax in axes[:, 0]:
            ax.set_ylabel("density")
        head = title or with_model(f"4  Hessian spectral density at step {at}", data)
        fig.suptitle(head, x=0.01, ha="left", fontsize=10)
        text = caption(
            data,
            f"SLQ nodes smoothed with a Gaussian of width {width:.3g} (1% of the range) "
            f"· first seed · step {at}",
        )
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.text(0.01, 0.01, text, fontsize=7, color="#444444", va="bottom")
    return fig


# --------------------------------------------------------------------------- the paper's figures


def _repr_at_init(data: Data, ax: Axes | None, title: str) -> Axes:
    metric = repr_metric(data)
    return depth_profile(
        data, metric, ax=ax, ylabel=REPR_LABEL[metric], title=with_model(title, data)
    )


def fig1a(data: Data, ax: Axes | None = None) -> Axes:
    """1a: MLP at initialization: representation correlation against depth.

    Reads the metric ``repr_corr_noise`` (or ``repr_corr_independent``, ``repr_cos_within``).
    """
    return _repr_at_init(data, ax, "1a  Representation correlation at init")


def fig1b(data: Data, ax: Axes | None = None) -> Axes:
    """1b: MLP at initialization: gradient correlation against depth (metric ``grad_corr``)."""
    return depth_profile(
        data,
        "grad_corr",
        ax=ax,
        ylabel="gradient cosine, two minibatches",
        xlabel=WEIGHT_DEPTH,
        title=with_model("1b  Gradient correlation at init", data),
    )


def fig2a(data: Data, ax: Axes | None = None) -> Axes:
    """2a: WRN at initialization: representation correlation against depth (as 1a)."""
    return _repr_at_init(data, ax, "2a  Representation correlation at init")


def fig2b(data: Data, ax: Axes | None = None) -> Axes:
    """2b: WRN at initialization: gradient norm against depth, log scale (metric ``grad_norm``)."""
    return depth_profile(
        data,
        "grad_norm",
        ax=ax,
        logy=True,
        ylabel="‖∂L/∂W‖ (Frobenius)",
        xlabel=WEIGHT_DEPTH,
        title=with_model("2b  Gradient norm at init", data),
    )


def fig3a(data: Data, ax: Axes | None = None) -> Axes:
    """3a: test accuracy through training (metric ``test_acc``: ``Monitor(eval_data=...)``)."""
    return through_training(
        data,
        "test_acc",
        ax=ax,
        ylabel="test accuracy (fraction)",
        title=with_model("3a  Test accuracy", data),
    )


def fig3b(data: Data, ax: Axes | None = None) -> Axes:
    """3b: representation correlation at the last probed layer (the logits when probed).

    Reads the metric of 1a, per layer (``run, depth, layer``).
    """
    metric = repr_metric(data)
    return through_training(
        data,
        metric,
        layer="last",
        ax=ax,
        ylabel=REPR_LABEL[metric],
        title=with_model("3b  Correlation at the final pre-activation layer", data),
    )


def fig3c(data: Data, ax: Axes | None = None) -> Axes:
    """3c: gradient correlation (mean over layers) through training (metric ``grad_corr``)."""
    return through_training(
        data,
        "grad_corr",
        aggregate="mean",
        ax=ax,
        ylabel="gradient cosine, two minibatches",
        title=with_model("3c  Gradient correlation", data),
    )


def fig4(data: Results, fig: Figure | None = None, *, step: int = 50) -> Figure:
    """4: Hessian spectral density 50 steps into training, one panel per normalizer."""
    return hessian_density_panels(data, step=step, fig=fig)


def fig6a(data: Data, ax: Axes | None = None) -> Axes:
    """6a: outlier ratio lambda_1 / lambda_K through training, log scale (``outlier_ratio``)."""
    return through_training(
        data,
        "outlier_ratio",
        ax=ax,
        logy=True,
        ylabel="λ₁ / λ_K  (K = classes)",
        title=with_model("6a  Hessian outlier ratio", data),
    )


def fig6b(data: Data, ax: Axes | None = None) -> Axes:
    """6b: the largest Hessian eigenvalue lambda_1 through training, log scale.

    Reads the metric ``eigenvalue`` with its ``index`` column (1: the largest).
    """
    return through_training(
        data,
        "eigenvalue",
        where={"index": 1},
        ax=ax,
        logy=True,
        ylabel="largest eigenvalue λ₁",
        title=with_model("6b  Largest Hessian eigenvalue", data),
    )
