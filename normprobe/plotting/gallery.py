"""Every figure a results directory supports, drawn to files: what ``normprobe plot`` runs.

The figure names follow Rao & Sohl-Dickstein 2020 and the analysed model: an MLP gives
``fig1a``/``fig1b``, a WideResNet without skips ``fig2a``/``fig2b``, with
skips ``fig2a_skip``/``fig2b_skip``; the training figures (3, 4, 6) carry no
suffix for the WRN without skips (the paper's network), ``_skip`` with
skips, ``_mlp`` for the MLP and ``_custom`` for a user factory. A figure the
tables cannot support is skipped with its reason, never an error.

>>> import tempfile
>>> import pandas as pd
>>> from normprobe.results import Results
>>> empty = Results(Path("."), pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), {})
>>> report = plot_results(empty, tempfile.mkdtemp())
>>> report.written, report.skipped["fig4_custom"]
({}, 'no Hessian nodes in the results (the Hessian is off, or its pieces leave out density)')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from normprobe.errors import NormprobeError
from normprobe.plotting import experiments as E
from normprobe.plotting import figures as F
from normprobe.plotting.properties import properties_figure
from normprobe.plotting.style import parse_formats, style_context
from normprobe.properties import PropertyTable
from normprobe.results import Results, load_results

__all__ = [
    "FIGURES",
    "FigureSpec",
    "PlotReport",
    "model_variant",
    "describe_models",
    "figure_name",
    "plot_results",
]

Variant = Literal["mlp", "wrn", "wrn-skip", "transformer", "custom"]
SUFFIX: dict[str, str] = {
    "mlp": "_mlp",
    "wrn": "",
    "wrn-skip": "_skip",
    "transformer": "_transformer",
    "custom": "_custom",
}
ALL = ("mlp", "wrn", "wrn-skip", "transformer", "custom")
#: each variant as a config writes it (``model.name``, ``model.options``, ``model.factory``)
MODEL_WORDS: dict[str, str] = {
    "mlp": "model mlp",
    "wrn": "model wrn with options.skip: false",
    "wrn-skip": "model wrn with options.skip: true",
    "transformer": "model transformer",
    "custom": "a model.factory of your own",
}


@dataclass(frozen=True)
class FigureSpec:
    """One figure: its base name, drawing function, and the models it is drawn for."""

    base: str
    draw: Callable[[Results], Axes | Figure]
    summary: str
    variants: tuple[str, ...] = ("mlp", "wrn", "wrn-skip", "custom")
    #: at-init figures named for their model (1 for the MLP, 2 for the WRN) take no _mlp suffix
    plain_for: tuple[str, ...] = ()
    #: the analyses (``analyses/<name>.yaml``) of the figure set that this figure is drawn from
    analyses: tuple[str, ...] = ()


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec(
        "fig1a",
        F.fig1a,
        "representation correlation against depth at init",
        ("mlp", "custom"),
        ("mlp",),
        analyses=("fig1_mlp_init",),
    ),
    FigureSpec(
        "fig1b",
        F.fig1b,
        "gradient correlation against depth at init",
        ("mlp", "custom"),
        ("mlp",),
        analyses=("fig1_mlp_init",),
    ),
    FigureSpec(
        "fig2a",
        F.fig2a,
        "representation correlation against depth at init",
        ("wrn", "wrn-skip"),
        analyses=("fig2_wrn_init", "fig2_wrn_skip_init"),
    ),
    FigureSpec(
        "fig2b",
        F.fig2b,
        "gradient norm against depth at init",
        ("wrn", "wrn-skip"),
        analyses=("fig2_wrn_init", "fig2_wrn_skip_init"),
    ),
    FigureSpec(
        "fig3a", F.fig3a, "test accuracy through training", analyses=("fig3_4_6_wrn_training",)
    ),
    FigureSpec(
        "fig3b",
        F.fig3b,
        "final-layer representation correlation through training",
        analyses=("fig3_4_6_wrn_training",),
    ),
    FigureSpec(
        "fig3c",
        F.fig3c,
        "gradient correlation through training",
        analyses=("fig3_4_6_wrn_training",),
    ),
    FigureSpec(
        "fig4",
        F.fig4,
        "Hessian spectral density at step 50, one panel per normalizer",
        analyses=("fig3_4_6_wrn_training", "fig4_wrn_skip_training"),
    ),
    FigureSpec(
        "fig6a",
        F.fig6a,
        "Hessian outlier ratio λ1/λK through training",
        analyses=("fig3_4_6_wrn_training",),
    ),
    FigureSpec(
        "fig6b",
        F.fig6b,
        "largest Hessian eigenvalue λ1 through training",
        analyses=("fig3_4_6_wrn_training",),
    ),
    FigureSpec(
        "fig5",
        E.fig5,
        "final test accuracy against batch size, with and without aggregated statistics",
        plain_for=ALL,
        analyses=("fig5_batch_size",),
    ),
    FigureSpec(
        "figA_renorm",
        E.fig_renorm,
        "BatchNorm vs Batch Renorm on microbatches and non-i.i.d. batches (Ioffe 2017)",
        plain_for=ALL,
        analyses=("renorm_small_noniid",),
    ),
    FigureSpec(
        "figA_balnorm",
        E.fig_balnorm,
        "BalNorm vs BatchNorm and GroupNorm: loss and accuracy through training (Defazio & Bottou 2018)",
        plain_for=ALL,
        analyses=("balnorm_convergence",),
    ),
    FigureSpec(
        "figT_transformer",
        E.fig_transformer,
        "Transformer LM: test perplexity, representations at init, Hessian outlier ratio",
        ("transformer",),
        ("transformer",),
        analyses=("transformer",),
    ),
    FigureSpec(
        "properties",
        properties_figure,
        "the measured properties table (Rao & Sohl-Dickstein 2020, Table 2) as a heatmap: verdicts and numbers",
        plain_for=ALL,
        analyses=("properties",),
    ),
    FigureSpec(
        "figA_regnorm_mean",
        E.fig_regnorm_mean,
        "each layer's batch mean R_l through training, RegNorm vs LayerNorm (Rao & Sohl-Dickstein 2020, appendix)",
        plain_for=ALL,
        analyses=("regnorm_batch_mean",),
    ),
)


def model_variant(results: Results) -> Variant:
    """Which of the paper's networks the results come from (from the manifest's config)."""
    model = (results.manifest or {}).get("config", {}).get("model", {}) or {}
    if model.get("name") == "wrn":
        return "wrn-skip" if (model.get("options") or {}).get("skip", True) else "wrn"
    if model.get("name") == "mlp":
        return "mlp"
    if model.get("name") == "transformer":
        return "transformer"
    return "custom"


def describe_models(variants: Sequence[str]) -> str:
    """The models of ``variants`` as a config names them, for messages: a user never
    writes ``wrn-skip``, but ``model: {name: wrn, options: {skip: true}}``.

    >>> describe_models(["wrn-skip"])
    'model wrn with options.skip: true'
    >>> describe_models(["mlp", "wrn", "wrn-skip", "custom"])
    'model mlp, model wrn or a model.factory of your own'
    """
    words = [
        "model wrn" if v == "wrn" and "wrn-skip" in variants else MODEL_WORDS[v]
        for v in variants
        if not (v == "wrn-skip" and "wrn" in variants)
    ]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def figure_name(spec: FigureSpec, variant: str) -> str:
    """The file stem of ``spec`` drawn for ``variant`` (e.g. ``fig4_skip``)."""
    if variant in spec.plain_for:
        return spec.base
    return spec.base + SUFFIX[variant]


@dataclass
class PlotReport:
    """What :func:`plot_results` wrote (name -> files) and skipped (name -> reason)."""

    written: dict[str, list[Path]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [
            f"wrote {name}: {', '.join(str(p) for p in paths)}"
            for name, paths in self.written.items()
        ]
        out += [f"skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return out


def plot_results(
    results: Results | str | Path,
    out: str | Path,
    *,
    formats: str | Sequence[str] = ("png",),
    only: Sequence[str] | None = None,
    property_table: PropertyTable | None = None,
) -> PlotReport:
    """Draw every figure ``results`` supports into ``out`` as ``<name>.<format>``.

    ``only`` restricts to figure names (``fig4_skip``) or base names
    (``fig4``). Figures without data are reported in ``skipped`` with the
    reason; nothing is trained or probed. ``property_table``: the properties
    table to draw as the ``properties`` heatmap (default: judged from
    ``results`` alone, see :func:`normprobe.plotting.properties.properties_figure`;
    the CLI passes :func:`normprobe.measure_properties`, which adds every zoo
    normalizer and the sequence leaks). It overwrites same-named files and
    records nothing; ``normprobe plot`` and ``normprobe figures`` record in
    ``out`` which results they drew (:mod:`normprobe.plotting.record`).
    """
    if not isinstance(results, Results):
        results = load_results(results)
    kinds = parse_formats(formats)
    out = Path(out)
    if only is not None:
        known = {spec.base for spec in FIGURES} | {
            figure_name(spec, v) for spec in FIGURES for v in spec.variants
        }
        unknown = [name for name in only if name not in known]
        if unknown:
            raise NormprobeError(
                f"only: no figure named {', '.join(map(repr, unknown))}; the figures are: "
                f"{', '.join(sorted({spec.base for spec in FIGURES}))}"
            )
    variant = model_variant(results)
    report = PlotReport()
    for spec in FIGURES:
        name = figure_name(spec, variant)
        if only is not None and name not in only and spec.base not in only:
            continue
        if variant not in spec.variants:  # by its base name: it has none for these results
            report.skipped[spec.base] = (
                f"drawn for {describe_models(spec.variants)}; these results are of "
                f"{MODEL_WORDS[variant]}"
            )
            continue
        try:
            with style_context():
                if spec.base == "properties":
                    drawn = properties_figure(results, property_table)
                else:
                    drawn = spec.draw(results)
                fig = drawn if isinstance(drawn, Figure) else drawn.figure
                out.mkdir(parents=True, exist_ok=True)
                paths = []
                for kind in kinds:
                    path = out / f"{name}.{kind}"
                    fig.savefig(path)
                    paths.append(path)
            report.written[name] = paths
        except F.FigureSkipped as err:
            report.skipped[name] = str(err)
        finally:
            plt.close("all")
    bases = {spec.base for spec in FIGURES}
    for wanted in only or ():
        if wanted not in bases and wanted not in report.written and wanted not in report.skipped:
            report.skipped[wanted] = _named_for_another_model(wanted, variant)
    return report


def _named_for_another_model(name: str, variant: str) -> str:
    """Why ``--only``'s ``name`` (a figure's name for another model, e.g. ``fig4_skip``) was
    not drawn from results of ``variant``, and the name to ask for instead."""
    spec, other = next((s, v) for s in FIGURES for v in s.variants if figure_name(s, v) == name)
    why = f"the name for results of {MODEL_WORDS[other]}; these are of {MODEL_WORDS[variant]}"
    if variant in spec.variants:
        name = figure_name(spec, variant)
        return f"{why}; ask for {name}" + (f" (or {spec.base})" if name != spec.base else "")
    return f"{why}, which {spec.base} is not drawn for"


def describe() -> dict[str, Any]:
    """Figure base name -> one line on what it shows (for help texts)."""
    return {spec.base: spec.summary for spec in FIGURES}
