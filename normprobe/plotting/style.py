"""One look for every figure: a fixed color and marker per normalizer, and rc settings.

The colors group related normalizers by hue (batch-statistic family in blues
and purples, per-example family in oranges and reds, weight-space family in
greens, the rest in greys and browns), and no two normalizers share a
(color, marker) pair, so a legend reads the same in every figure. Styling is
applied inside :func:`style_context`, never through global ``rcParams``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import matplotlib as mpl

from normprobe.errors import NormprobeError

__all__ = ["NORM_STYLE", "color", "marker", "label", "style_context", "norm_order"]

# name: (color, marker, display label)
NORM_STYLE: dict[str, tuple[str, str, str]] = {
    "batch": ("#1f4e9c", "o", "BatchNorm"),
    "batch-train": ("#6a8fd0", "o", "Batch-Train"),
    "bmlv": ("#17becf", "s", "BMLV"),
    "lmbv": ("#7b3294", "D", "LMBV"),
    "batch-renorm": ("#3d2bd6", "v", "Batch Renorm"),
    "layer": ("#e66101", "^", "LayerNorm"),
    "prelayer": ("#d7191c", "P", "PreLayerNorm"),
    "regnorm": ("#f4a41c", "X", "RegNorm"),
    "preregnorm": ("#a5003a", "*", "PreRegNorm"),
    "group": ("#b15928", "h", "GroupNorm"),
    "instance": ("#e7298a", "p", "InstanceNorm"),
    "rms": ("#fb9a99", "<", "RMSNorm"),
    "weight": ("#1b7837", "s", "WeightNorm"),
    "scaled-weight": ("#5aae61", "D", "Scaled WeightNorm"),
    "weight-meanbn": ("#00441b", "v", "WeightNorm + mean-only BN"),
    "balanced": ("#8c6d31", ">", "BalNorm"),
    "none": ("#555555", "d", "no normalization"),
}
#: (color, marker) for names outside the zoo (a user's own models, named by their run or
#: ``normalizer=``), handed out in order of first appearance, so that those names differ from
#: each other (the first twelve) and keep their style in every figure of a process
_EXTRA_STYLES: tuple[tuple[str, str], ...] = (
    ("#000000", "o"),
    ("#d62728", "s"),
    ("#2ca02c", "^"),
    ("#1f77b4", "D"),
    ("#ff7f0e", "v"),
    ("#9467bd", "P"),
    ("#8c564b", "X"),
    ("#e377c2", "*"),
    ("#7f7f7f", "h"),
    ("#bcbd22", "<"),
    ("#17becf", ">"),
    ("#393b79", "p"),
)
_EXTRA: dict[str, tuple[str, str]] = {}


def _extra(norm: str) -> tuple[str, str]:
    if norm not in _EXTRA:
        _EXTRA[norm] = _EXTRA_STYLES[len(_EXTRA) % len(_EXTRA_STYLES)]
    return _EXTRA[norm]


def color(norm: str) -> str:
    """The normalizer's color, the same in every figure (a name outside the zoo: one of
    :data:`_EXTRA_STYLES`, by first appearance)."""
    return NORM_STYLE[norm][0] if norm in NORM_STYLE else _extra(norm)[0]


def marker(norm: str) -> str:
    return NORM_STYLE[norm][1] if norm in NORM_STYLE else _extra(norm)[1]


def label(norm: str) -> str:
    return NORM_STYLE[norm][2] if norm in NORM_STYLE else norm


def norm_order(names) -> list[str]:
    """Normalizers in the fixed legend order (unknown names last, alphabetically; their styles
    are handed out in that order)."""
    known = [n for n in NORM_STYLE if n in set(names)]
    unknown = sorted(set(names) - set(NORM_STYLE))
    for name in unknown:
        _extra(name)
    return known + unknown


RC = {
    "figure.dpi": 110,
    "savefig.dpi": 160,
    "savefig.bbox": "tight",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.5,
    "lines.markersize": 4,
}


@contextmanager
def style_context() -> Iterator[None]:
    """The figure style, applied only inside the block; matplotlib's interactive state is
    left as the block leaves it.

    ``rc_context`` restores every rc setting on exit, ``interactive`` included.
    In a notebook the first figure loads the inline backend, which turns
    interactive mode on; restoring the value from before would switch it off
    again, and later figures (a plain ``plt.plot`` too) would no longer show
    until ``plt.show()``. So the value the block ends with is kept.
    """
    interactive = mpl.is_interactive()
    try:
        with mpl.rc_context(RC):
            try:
                yield
            finally:
                interactive = mpl.is_interactive()
    finally:
        mpl.interactive(interactive)


#: The figure file formats the gallery and the properties heatmap write.
FORMATS = ("png", "pdf", "svg")


def parse_formats(formats: str | Iterable[str]) -> list[str]:
    """Figure formats from a list or a comma-separated string (``"png, .PDF"``); one clear error.

    >>> parse_formats("png, .PDF")
    ['png', 'pdf']
    """
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    items = [f.strip().lower().lstrip(".") for f in items if f.strip()]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise NormprobeError(
            f"--format: {', '.join(bad) or 'nothing'} is not a figure format; "
            f"use a comma-separated list of {', '.join(FORMATS)}"
        )
    return items
