"""Figures of the training-time experiments: batch size (Rao & Sohl-Dickstein 2020, fig. 5) and the appendix studies.

(Over 500 lines on purpose: five multi-panel figures, one function each, with
the variant and panel helpers only they use.)

- :func:`fig5`: final test accuracy against the training batch size, with
  aggregated statistics at test time (eval mode) and without them (each test
  batch's own statistics), one panel per normalizer;
- :func:`fig_renorm`: BatchNorm against Batch Renorm on i.i.d., microbatch
  and non-i.i.d. minibatches (Ioffe 2017), test accuracy through training in
  eval mode and in training mode;
- :func:`fig_balnorm`: BalNorm against BatchNorm and GroupNorm (Defazio & Bottou 2018),
  train and test loss and accuracy through training;
- :func:`fig_regnorm_mean`: each layer's batch mean ``R_l`` through training
  (Rao & Sohl-Dickstein 2020, appendix), RegNorm against LayerNorm;
- :func:`fig_transformer`: a Transformer language model (Rao & Sohl-Dickstein 2020, sec. 7, LM1B):
  test perplexity through training, representation correlation with depth
  at initialization and the Hessian outlier ratio at a few steps, one line
  per normalizer and placement (pre-LN solid, post-LN dashed).

Each analysis is one config with ``variants`` (a ``variant`` column in the
tables); lines are the median over seeds with the interquartile range as a
band (Defazio & Bottou 2018, sec. 6.5: the asymmetry of accuracy across seeds is the point), at
the learning rate selected per normalizer and variant. Like every figure,
these read stored tables only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from normprobe.plotting.figures import (
    REPR_LABEL,
    FigureSkipped,
    caption,
    config_of,
    log_y,
    repr_metric,
    rows_of,
    with_model,
)
from normprobe.plotting.style import color, label, marker, norm_order, style_context
from normprobe.results import Results, final_rows

__all__ = [
    "fig5",
    "fig_renorm",
    "fig_balnorm",
    "fig_regnorm_mean",
    "fig_transformer",
    "variant_setting",
]

IQR = ("pi", 50)  # seaborn's percentile interval of width 50: the 25th to the 75th percentile


def variant_setting(data: Results, variant: str | None, dotted: str) -> Any:
    """The value of config key ``dotted`` (e.g. ``train.batch_size``) in a variant's runs.

    Read from the stored config: the base value, replaced by the variant's own
    setting of that key or of a section holding it.

    >>> r = Results(".", pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), pd.DataFrame(),
    ...     {"config": {"train": {"batch_size": 64}, "variants": {"bs8": {"train.batch_size": 8},
    ...      "lab": {"train": {"batch_size": 32}}}}})
    >>> [variant_setting(r, v, "train.batch_size") for v in (None, "bs8", "lab", "other")]
    [64, 8, 32, 64]
    """
    config = copy.deepcopy(config_of(data))
    changes = (config.get("variants") or {}).get(variant, {}) if variant is not None else {}
    for key, value in changes.items():
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _need_variants(rows: pd.DataFrame, what: str) -> None:
    if "variant" not in rows or rows["variant"].isna().all():
        raise FigureSkipped(f"{what} needs an analysis with variants (a 'variant' column)")


def _figure_caption(fig: Figure, data: Results, extra: str) -> None:
    text = caption(data, extra, band="interquartile range")
    variants = config_of(data).get("variants") or {}
    base = variant_setting(data, None, "train.batch_size")
    if any(variant_setting(data, v, "train.batch_size") != base for v in variants):
        text = text.replace(f", batch {base},", ", batch per variant,")
    fig.text(
        0.01,
        0.005,
        text,
        fontsize=7,
        color="#444444",
        va="bottom",
        wrap=True,
    )


def _panel_grid(count: int, cols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    cols = min(cols, count)
    rows = math.ceil(count / cols)
    fig = plt.figure(figsize=(size[0] * cols + 1.6, size[1] * rows + 0.9))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, axes


def _line(ax: Axes, rows: pd.DataFrame, x: str, **style: Any) -> None:
    """One median line with an interquartile band over seeds."""
    sns.lineplot(
        data=rows,
        x=x,
        y="value",
        estimator="median",
        errorbar=IQR,
        err_kws={"alpha": 0.15, "linewidth": 0},
        markersize=4,
        markeredgewidth=0.6,
        ax=ax,
        **style,
    )


# --------------------------------------------------------------------------- figure 5


def fig5(data: Results, fig: Figure | None = None) -> Figure:
    """5: final test accuracy against training batch size, with and without aggregated stats.

    One panel per normalizer; solid: eval mode (running statistics, "aggregated");
    dashed: each test batch normalized with its own statistics, test batches
    as large as the training batches (``train.eval_batch_stats``). The batch
    size of each variant is read from the stored config.
    """
    agg = final_rows(rows_of(data, "test_acc", columns=("run",)))
    own = final_rows(rows_of(data, "test_acc_batchstats", columns=("run",)))
    _need_variants(agg, "figure 5")
    sizes = {v: variant_setting(data, v, "train.batch_size") for v in agg["variant"].unique()}
    if any(s is None for s in sizes.values()):
        raise FigureSkipped("figure 5 could not read each variant's train.batch_size")
    if len(set(sizes.values())) < 2:
        raise FigureSkipped("figure 5 needs variants with at least two training batch sizes")
    frames = []
    for rows, how in ((agg, "aggregated"), (own, "batch")):
        rows = rows.copy()
        rows["batch_size"] = rows["variant"].map(sizes)
        rows["evaluation"] = how
        frames.append(rows)
    rows = pd.concat(frames, ignore_index=True)
    order = norm_order(rows["normalizer"].unique())
    with style_context():
        if fig is None:
            fig, axes = _panel_grid(len(order), 4, (2.5, 2.1))
        else:
            axes = np.atleast_2d(fig.subplots(math.ceil(len(order) / 4), min(4, len(order))))
        ticks = sorted(set(sizes.values()))
        for ax, norm in zip(axes.flat, order):
            mine = rows[rows["normalizer"] == norm]
            low = mine["value"].min()
            for how, dashes in (("aggregated", ""), ("batch", (4, 2))):
                part = mine[mine["evaluation"] == how]
                if len(part):
                    _line(
                        ax,
                        part,
                        "batch_size",
                        color=color(norm),
                        marker=marker(norm),
                        dashes=dashes,
                        linestyle="-" if how == "aggregated" else "--",
                    )
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
            ax.minorticks_off()
            ax.set_ylim(max(0.0, low - 0.02), 1.0 + 0.1 * (1.0 - low) / 4)
            ax.set_title(label(norm), loc="left", fontsize=9, color=color(norm))
            ax.set_xlabel("training batch size")
            ax.set_ylabel("final test accuracy")
        handles = [
            Line2D([], [], color="#333333", ls="-", label="aggregated statistics (eval mode)"),
            Line2D([], [], color="#333333", ls="--", label="test batch's own statistics"),
        ]
        fig.legend(handles=handles, loc="upper right", ncols=2, frameon=False, fontsize=8)
        fig.suptitle(with_model("5  Test accuracy against batch size", data), x=0.01, ha="left")
        fig.tight_layout(rect=(0, 0.05, 1, 0.95))
        steps = agg["step"].max()
        _figure_caption(
            fig,
            data,
            f"accuracy after {steps} steps · test batches as large as the training batches "
            "for the dashed lines · y axes differ per panel",
        )
    return fig


# --------------------------------------------------------------------------- Ioffe 2017


def _variant_text(data: Results, variant: str) -> str:
    sampler = variant_setting(data, variant, "train.sampler") or {}
    norm_options = variant_setting(data, variant, "model.norm_options") or {}
    micro = {o.get("norm_batch") for o in norm_options.values() if isinstance(o, dict)} - {None}
    batch = variant_setting(data, variant, "train.batch_size")
    if isinstance(sampler, dict) and sampler.get("kind") == "labels":
        return (
            f"{variant}: non-i.i.d., {sampler['labels_per_batch']} labels x "
            f"{sampler['per_label']} per batch"
        )
    if micro:
        return f"{variant}: batches of {batch} normalized in microbatches of {min(micro)}"
    return f"{variant}: i.i.d. batches of {batch}"


def fig_renorm(data: Results, fig: Figure | None = None) -> Figure:
    """Ioffe 2017: test accuracy through training, BatchNorm vs Batch Renorm, one panel per variant.

    Solid: eval mode (moving averages); dashed: "training mode", each test
    batch normalized with its own statistics (for a non-i.i.d. variant with
    ``batches: sampler``, test batches drawn like the training batches).
    """
    agg = rows_of(data, "test_acc")
    _need_variants(agg, "the Batch Renorm figure")
    if "batch-renorm" not in set(agg["normalizer"]):
        raise FigureSkipped("the Batch Renorm figure needs runs of batch-renorm")
    try:
        own = rows_of(data, "test_acc_batchstats")
    except FigureSkipped:
        own = agg.iloc[0:0]
    variants = list(dict.fromkeys(agg["variant"]))
    order = norm_order(agg["normalizer"].unique())
    with style_context():
        if fig is None:
            fig, axes = _panel_grid(len(variants), 3, (3.2, 2.6))
        else:
            axes = np.atleast_2d(fig.subplots(1, len(variants)))
        for ax, variant in zip(axes.flat, variants):
            for norm in order:
                for rows, ls in ((agg, "-"), (own, "--")):
                    part = rows[(rows["variant"] == variant) & (rows["normalizer"] == norm)]
                    if len(part):
                        _line(
                            ax,
                            part,
                            "step",
                            color=color(norm),
                            linestyle=ls,
                            marker=marker(norm),
                            markevery=3,
                        )
            ax.set_title(_variant_text(data, variant), loc="left", fontsize=8)
            ax.set_xlabel("training step")
            ax.set_ylabel("test accuracy")
            ax.set_ylim(max(0.0, min(agg["value"].quantile(0.05), 0.9) - 0.05), 1.0)
        handles = [
            Line2D([], [], color=color(n), marker=marker(n), label=label(n)) for n in order
        ] + [
            Line2D([], [], color="#333333", ls="-", label="eval mode (moving averages)"),
            Line2D([], [], color="#333333", ls="--", label="training mode (batch statistics)"),
        ]
        fig.legend(handles=handles, loc="upper right", ncols=2, frameon=False, fontsize=8)
        fig.suptitle(with_model("Batch Renorm vs BatchNorm (Ioffe 2017)", data), x=0.01, ha="left")
        fig.tight_layout(rect=(0, 0.06, 1, 0.9))
        _figure_caption(fig, data, "")
    return fig


# --------------------------------------------------------------------------- Defazio & Bottou 2018


def _line_key(data: Results, norm: str, variant: Any) -> str:
    """``BalNorm`` or ``BalNorm, quarter-batch statistics`` from the variant's options."""
    if variant is None or (isinstance(variant, float) and math.isnan(variant)):
        return label(norm)
    options = variant_setting(data, variant, "model.norm_options") or {}
    mine = {**(options.get("default") or {}), **(options.get(norm) or {})}
    fraction = mine.get("stat_fraction")
    if fraction is not None and fraction != 1:
        share = {0.25: "quarter", 0.5: "half"}.get(fraction, f"{fraction:g}")
        return f"{label(norm)}, {share}-batch statistics"
    return label(norm)


def fig_balnorm(data: Results, fig: Figure | None = None, *, panels: Sequence[str] = ()) -> Figure:
    """Defazio & Bottou 2018: train and test loss and accuracy through training, one line per normalizer setting.

    Runs that differ only in their variant and give the same line (e.g. a
    BatchNorm run in every variant) are drawn once, from the first variant.
    """
    metrics = list(panels) or ["train_loss", "test_loss", "train_acc", "test_acc"]
    if "balanced" not in set(rows_of(data, metrics[0])["normalizer"]):
        raise FigureSkipped("the BalNorm figure needs runs of the balanced normalizer")
    frames = []
    for metric in metrics:
        rows = rows_of(data, metric).copy()
        if "variant" in rows:
            first = rows.groupby("normalizer")["variant"].transform("first")
            keys = {
                (n, v): _line_key(data, n, v)
                for n, v in rows[["normalizer", "variant"]].drop_duplicates().itertuples(False)
            }
            rows["line"] = [keys[(n, v)] for n, v in zip(rows["normalizer"], rows["variant"])]
            # one line per distinct setting: drop a variant that repeats the first one's line
            repeat = (rows["variant"] != first) & (
                rows["line"] == [keys[(n, f)] for n, f in zip(rows["normalizer"], first)]
            )
            rows = rows[~repeat]
        else:
            rows["line"] = rows["normalizer"].map(label)
        frames.append(rows)
    rows = pd.concat(frames, ignore_index=True)
    rank = {n: i for i, n in enumerate(norm_order(rows["normalizer"].unique()))}
    declared = list(config_of(data).get("variants") or {})
    place = {v: i for i, v in enumerate(declared)}
    keyed = (
        rows[["normalizer", "line"]]
        .assign(variant=rows["variant"] if "variant" in rows else None)
        .drop_duplicates()
    )
    keyed["order"] = [
        (rank[n], place.get(v, len(place))) for n, v in zip(keyed["normalizer"], keyed["variant"])
    ]
    lines = list(dict.fromkeys(keyed.sort_values("order")["line"]))
    norm_of = dict(zip(rows["line"], rows["normalizer"]))
    titles = {
        "train_loss": "training loss",
        "test_loss": "test loss",
        "train_acc": "training accuracy",
        "test_acc": "test accuracy",
    }
    with style_context():
        if fig is None:
            fig, axes = _panel_grid(len(metrics), 2, (3.3, 2.4))
        else:
            axes = np.atleast_2d(fig.subplots(math.ceil(len(metrics) / 2), 2))
        for ax, metric in zip(axes.flat, metrics):
            part = rows[rows["metric"] == metric]
            for line in lines:
                mine = part[part["line"] == line]
                if len(mine):
                    dashed = line != label(norm_of[line])
                    _line(
                        ax,
                        mine,
                        "step",
                        color=color(norm_of[line]),
                        marker=marker(norm_of[line]),
                        linestyle="--" if dashed else "-",
                    )
            ax.set_xscale("symlog", linthresh=100)
            ax.set_xlabel("training step (linear to 100, log after)")
            ax.set_ylabel(titles.get(metric, metric))
            if metric.endswith("loss"):
                log_y(ax)
        handles = [
            Line2D(
                [],
                [],
                color=color(norm_of[line]),
                marker=marker(norm_of[line]),
                ls="--" if line != label(norm_of[line]) else "-",
                label=line,
            )
            for line in lines
        ]
        fig.legend(handles=handles, loc="upper right", ncols=2, frameon=False, fontsize=8)
        fig.suptitle(with_model("BalNorm vs BatchNorm (Defazio & Bottou 2018)", data), x=0.01, ha="left")
        fig.tight_layout(rect=(0, 0.05, 1, 0.9))
        _figure_caption(fig, data, "")
    return fig


# --------------------------------------------------------------------------- RegNorm batch mean


def fig_regnorm_mean(data: Results, fig: Figure | None = None) -> Figure:
    """Rao & Sohl-Dickstein 2020, appendix: each normalization layer's batch mean ``R_l`` through training (log scale).

    One panel per normalizer, one line per layer (darker: deeper), median over
    seeds with the interquartile band. RegNorm's loss term drives ``R_l`` to zero.
    """
    rows = rows_of(data, "batch_mean_sq")
    rows = rows[rows["value"] > 0]
    if rows.empty or rows["step"].nunique() < 2:
        raise FigureSkipped("batch_mean_sq was measured at one step only")
    order = norm_order(rows["normalizer"].unique())
    depths = sorted(rows["depth"].dropna().unique())
    shades = sns.color_palette("viridis_r", n_colors=len(depths))
    lo, hi = rows["value"].min(), rows["value"].max()
    with style_context():
        if fig is None:
            fig, axes = _panel_grid(len(order), 4, (2.6, 2.3))
        else:
            axes = np.atleast_2d(fig.subplots(1, len(order)))
        for ax, norm in zip(axes.flat, order):
            mine = rows[rows["normalizer"] == norm]
            for shade, depth in zip(shades, depths):
                part = mine[mine["depth"] == depth]
                if len(part):
                    _line(ax, part, "step", color=shade)
            ax.set_yscale("log")
            ax.set_ylim(lo / 2, hi * 2)
            log_y(ax)
            ax.set_title(label(norm), loc="left", fontsize=9, color=color(norm))
            ax.set_xlabel("training step")
            ax.set_ylabel("R_l = mean_c (mean_B u)²")
        handles = [
            Line2D([], [], color=shades[0], label=f"layer {int(depths[0])} (first)"),
            Line2D([], [], color=shades[-1], label=f"layer {int(depths[-1])} (last)"),
        ]
        fig.legend(handles=handles, loc="upper right", ncols=2, frameon=False, fontsize=8)
        fig.suptitle(
            with_model("Batch mean of each normalized layer (Rao & Sohl-Dickstein 2020, appendix)", data),
            x=0.01,
            ha="left",
        )
        fig.tight_layout(rect=(0, 0.06, 1, 0.92))
        lam = config_of(data).get("train", {}).get("regnorm_lambda")
        _figure_caption(
            fig,
            data,
            f"RegNorm/PreRegNorm loss term λ = {lam} · probe batch of "
            f"{config_of(data).get('data', {}).get('probe_batch')} training examples, train mode",
        )
    return fig


# --------------------------------------------------------------------------- transformer


def _placement(data: Results, variant: Any) -> str:
    """``pre`` or ``post``: the transformer's ``model.options.placement`` in a variant's runs."""
    if variant is None or (isinstance(variant, float) and math.isnan(variant)):
        variant = None
    options = variant_setting(data, variant, "model.options") or {}
    placement = variant_setting(data, variant, "model.options.placement")
    return str(placement or options.get("placement") or "pre")


def _with_lines(data: Results, rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with a ``line`` column: normalizer and placement (``LayerNorm, post-LN``)."""
    rows = rows.copy()
    variants = rows["variant"] if "variant" in rows else pd.Series(None, index=rows.index)
    placements = {v: _placement(data, v) for v in variants.drop_duplicates()}
    rows["placement"] = [placements[v] for v in variants]
    rows["line"] = [
        label(n) if n == "none" else f"{label(n)}, {p}-LN"
        for n, p in zip(rows["normalizer"], rows["placement"])
    ]
    return rows


def fig_transformer(data: Results, fig: Figure | None = None) -> Figure:
    """Rao & Sohl-Dickstein 2020, sec. 7 (LM1B) at small scale: a Transformer language model under each normalizer.

    Three panels, one line per normalizer and placement (pre-LN solid,
    post-LN dashed), median over seeds with the interquartile band, at the
    learning rate with the lowest final test loss: test perplexity through
    training (log scale); representation correlation against depth at
    initialization; the Hessian outlier ratio ``lambda_1 / lambda_K`` at the
    steps it was measured (log scale). The caption gives each line's final
    median perplexity.
    """
    ppl = _with_lines(data, rows_of(data, "test_perplexity"))
    metric = repr_metric(data)
    rep = _with_lines(data, rows_of(data, metric))
    rep = rep[rep["step"] == rep["step"].min()]
    try:
        ratio = _with_lines(data, rows_of(data, "outlier_ratio"))
    except FigureSkipped:
        ratio = None
    rank = {n: i for i, n in enumerate(norm_order(ppl["normalizer"].unique()))}
    keyed = ppl[["normalizer", "placement", "line"]].drop_duplicates()
    keyed = keyed.assign(
        order=[(rank[n], p != "pre") for n, p in zip(keyed.normalizer, keyed.placement)]
    )
    lines = list(keyed.sort_values("order")["line"])
    norm_of = dict(zip(keyed["line"], keyed["normalizer"]))
    post = {line for line, p in zip(keyed["line"], keyed["placement"]) if p == "post"}

    def draw(ax: Axes, rows: pd.DataFrame | None, x: str) -> None:
        if rows is None:
            return
        for line in lines:
            mine = rows[rows["line"] == line]
            if len(mine):
                _line(
                    ax,
                    mine,
                    x,
                    color=color(norm_of[line]),
                    marker=marker(norm_of[line]),
                    linestyle="--" if line in post else "-",
                )

    with style_context():
        if fig is None:
            fig, axes = _panel_grid(3, 3, (3.3, 2.7))
        else:
            axes = np.atleast_2d(fig.subplots(1, 3))
        ax_ppl, ax_rep, ax_ratio = axes.flat[:3]
        draw(ax_ppl, ppl, "step")
        ax_ppl.set_xlabel("training step")
        ax_ppl.set_ylabel("test perplexity (bytes)")
        # the scale of training, not of initialization: an unnormalized stream can start with
        # enormous logits (a perplexity of 1e10 and more), which the caption reports instead
        medians = ppl.groupby(["line", "step"])["value"].median()
        trained = medians[medians.index.get_level_values("step") > ppl["step"].min()]
        off_scale = ""
        if len(trained):
            hi = float(trained.max()) * 1.5
            ax_ppl.set_ylim(float(ppl["value"].min()) * 0.9, hi)
            start = medians[medians.index.get_level_values("step") == ppl["step"].min()]
            above = start[start > hi]
            if len(above):
                off_scale = " · off scale at step 0: " + ", ".join(
                    f"{line} {value:.3g}" for (line, _), value in above.items()
                )
        log_y(ax_ppl)
        ax_ppl.set_title("a  test perplexity", loc="left", fontsize=9)
        draw(ax_rep, rep, "depth")
        ax_rep.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_rep.set_xlabel("depth (layer in execution order; 0: input)")
        ax_rep.set_ylabel(REPR_LABEL.get(metric, metric))
        ax_rep.set_title("b  representations at initialization", loc="left", fontsize=9)
        if ratio is not None:
            draw(ax_ratio, ratio, "step")
            k = ratio["index"].dropna().unique() if "index" in ratio else []
            ax_ratio.set_ylabel(f"λ1 / λ{int(k[0])}" if len(k) == 1 else "λ1 / λK")
            log_y(ax_ratio)
        else:
            ax_ratio.text(
                0.5, 0.5, "no Hessian in the results", ha="center", transform=ax_ratio.transAxes
            )
        ax_ratio.set_xlabel("training step")
        ax_ratio.set_title("c  Hessian outlier ratio", loc="left", fontsize=9)
        handles = [
            Line2D(
                [],
                [],
                color=color(norm_of[line]),
                marker=marker(norm_of[line]),
                ls="--" if line in post else "-",
                label=line,
            )
            for line in lines
        ]
        fig.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(0.01, 0.93),
            ncols=len(handles),
            frameon=False,
            fontsize=8,
        )
        fig.suptitle(
            with_model("Normalizers in a language model (Rao & Sohl-Dickstein 2020, sec. 7)", data), x=0.01, ha="left"
        )
        fig.tight_layout(rect=(0, 0.08, 1, 0.88))
        final = final_rows(ppl).groupby("line")["value"].median()
        summary = ", ".join(f"{line} {final[line]:.2f}" for line in lines if line in final)
        _figure_caption(fig, data, f"final median test perplexity: {summary}{off_scale}")
    return fig
