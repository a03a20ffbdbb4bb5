"""The measured properties table as a heatmap: normalizers by properties, verdict colours.

Green is ``+``, red ``-``, grey "not measured"; each cell carries the
measured number, and a hatched cell reads "not settled" (its verdict rests
on a learning rate at the edge of its grid). Drawn from a :class:`~normprobe.properties.PropertyTable`,
itself computed from stored results.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from normprobe.plotting.figures import FigureSkipped
from normprobe.plotting.style import parse_formats, style_context
from normprobe.properties import NOT_MEASURED, PropertiesError, PropertyTable, judge_properties
from normprobe.results import Results

__all__ = ["heatmap", "properties_figure", "write_properties"]

COLOURS = {"-": "#f4a6a6", "not measured": "#e0e0e0", "+": "#a8dba8"}
CODES = {"-": 0, "not measured": 1, "+": 2}


def heatmap(table: PropertyTable) -> Figure:
    """One row per normalizer, one column per property; the colour is the verdict."""
    verdicts = table.wide("verdict")
    shown = table.wide("shown")
    settled = table.wide("settled")
    codes = verdicts.apply(lambda col: col.map(CODES)).to_numpy(dtype=float)
    n_rows, n_cols = codes.shape
    fig, ax = plt.subplots(figsize=(2.0 + 1.45 * n_cols, 1.2 + 0.42 * n_rows))
    ax.imshow(codes, cmap=ListedColormap(list(COLOURS.values())), vmin=0, vmax=2, aspect="auto")
    for i in range(n_rows):
        for j in range(n_cols):
            verdict, number = verdicts.iat[i, j], shown.iat[i, j]
            text = "n/m" if verdict == "not measured" else f"{verdict}\n{number}"
            if verdict != "not measured" and not bool(settled.iat[i, j]):
                # the verdict rests on a learning rate at the edge of its grid: hatched
                text += "\nnot settled"
                ax.add_patch(
                    Rectangle(
                        (j - 0.5, i - 0.5),
                        1,
                        1,
                        fill=False,
                        hatch="///",
                        edgecolor="#777777",
                        linewidth=0,
                    )
                )
            ax.text(j, i, text, ha="center", va="center", fontsize=6.5, linespacing=1.1)
    ax.set_xticks(np.arange(n_cols))
    ax.set_xticklabels(
        [textwrap.fill(f"{c.short} ({i})", 14) for i, c in enumerate(table.criteria, 1)],
        fontsize=7,
        rotation=0,
    )
    ax.xaxis.tick_top()
    ax.set_yticks(np.arange(n_rows))
    ax.set_yticklabels(list(verdicts.index), fontsize=8)
    ax.set_xticks(np.arange(n_cols + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n_rows + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.grid(which="major", visible=False)
    ax.tick_params(which="both", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    source = f" ({table.source})" if table.source else ""
    fig.suptitle(
        "Measured properties (Rao & Sohl-Dickstein 2020, Table 2): + green, - red, n/m not "
        "measured, hatched: not settled (learning rate at the edge of its grid)" + source,
        fontsize=9,
        y=0.995,
    )
    fig.tight_layout()
    return fig


def properties_figure(results: Results, table: PropertyTable | None = None) -> Figure:
    """The heatmap of ``table`` (default: judged from ``results`` alone).

    Skipped when nothing but the sequence property (measured on the
    normalizers, not from results) is measured.
    """
    if table is None:
        try:
            table = judge_properties(results)
        except PropertiesError as err:  # no measurements at all
            raise FigureSkipped(str(err)) from None
    measured = table.cells[
        (table.cells["property"] != "sequential") & (table.cells["verdict"] != NOT_MEASURED)
    ]
    if measured.empty:
        raise FigureSkipped(
            "no property measured from these results; run analyses/properties.yaml "
            "(or an analysis with the probes it reads)"
        )
    return heatmap(table)


def write_properties(
    table: PropertyTable, out: str | Path, formats: str | Sequence[str] = ("png",)
) -> list[Path]:
    """``properties.md``, ``properties.csv`` and the heatmap ``properties.<format>`` in ``out``.

    ``formats``: a list or a comma-separated string of png, pdf, svg.
    """
    kinds = parse_formats(formats)
    written = table.write_text(out)
    with style_context():
        fig = heatmap(table)
        for kind in kinds:
            path = Path(out) / f"properties.{kind}"
            fig.savefig(path)
            written.append(path)
    plt.close(fig)
    return written
