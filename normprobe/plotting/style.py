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
_FALLBACK = ("#999999", ".", None)


def color(norm: str) -> str:
    """The normalizer's color, the same in every figure."""
    return NORM_STYLE.get(norm, _FALLBACK)[0]


def marker(norm: str) -> str:
    return NORM_STYLE.get(norm, _FALLBACK)[1]


def label(norm: str) -> str:
    return NORM_STYLE.get(norm, _FALLBACK)[2] or norm


def norm_order(names) -> list[str]:
    """Normalizers in the fixed legend order (unknown names last, alphabetically)."""
    known = [n for n in NORM_STYLE if n in set(names)]
    return known + sorted(set(names) - set(NORM_STYLE))


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
    """The figure style, applied only inside the block."""
    with mpl.rc_context(RC):
        yield


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
