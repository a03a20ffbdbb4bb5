"""Figures from stored results: one function per figure of Rao & Sohl-Dickstein 2020, one look for all.

- :mod:`normprobe.plotting.style`: the fixed color and marker of every normalizer.
- :mod:`normprobe.plotting.figures`: ``fig1a`` ... ``fig6b`` and the generic
  :func:`depth_profile`, :func:`through_training`, :func:`hessian_density_panels`.
- :mod:`normprobe.plotting.experiments`: :func:`fig5` (batch size) and the
  appendix studies :func:`fig_renorm`, :func:`fig_balnorm`, :func:`fig_regnorm_mean`,
  and :func:`fig_transformer` (a Transformer language model, Rao & Sohl-Dickstein 2020, sec. 7).
- :mod:`normprobe.plotting.gallery`: :func:`plot_results`, every figure a
  results directory supports, written to files (``normprobe plot``).
- :mod:`normprobe.plotting.properties`: the properties table as a heatmap.
- :mod:`normprobe.plotting.record`: which results a figure folder was drawn
  from (``normprobe-figures.json``), so that figures of two analyses do not
  mix in one folder unnoticed.

Everything here reads stored results (:mod:`normprobe.results`) and the
properties table (:mod:`normprobe.properties`); nothing trains or probes.
Running the analyses behind the figure set is :mod:`normprobe.figureset`.

>>> from normprobe.plotting import color
>>> color("batch") == color("batch")
True
"""

from normprobe.plotting.experiments import (
    fig5,
    fig_balnorm,
    fig_regnorm_mean,
    fig_renorm,
    fig_transformer,
)
from normprobe.plotting.figures import (
    FigureSkipped,
    caption,
    depth_profile,
    fig1a,
    fig1b,
    fig2a,
    fig2b,
    fig3a,
    fig3b,
    fig3c,
    fig4,
    fig6a,
    fig6b,
    hessian_density_panels,
    through_training,
)
from normprobe.plotting.gallery import FIGURES, PlotReport, plot_results
from normprobe.plotting.properties import heatmap, properties_figure, write_properties
from normprobe.plotting.record import (
    RECORD_NAME,
    check_figure_folder,
    figure_sources,
    record_figures,
)
from normprobe.plotting.style import (
    FORMATS,
    NORM_STYLE,
    color,
    label,
    marker,
    parse_formats,
    style_context,
)

__all__ = [
    # style
    "NORM_STYLE",
    "color",
    "marker",
    "label",
    "style_context",
    "FORMATS",
    "parse_formats",
    # the properties table
    "heatmap",
    "properties_figure",
    "write_properties",
    # figures
    "FigureSkipped",
    "caption",
    "depth_profile",
    "through_training",
    "hessian_density_panels",
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
    "fig5",
    "fig_renorm",
    "fig_balnorm",
    "fig_regnorm_mean",
    "fig_transformer",
    # files
    "FIGURES",
    "PlotReport",
    "plot_results",
    # the figure folder's record
    "RECORD_NAME",
    "figure_sources",
    "check_figure_folder",
    "record_figures",
]
