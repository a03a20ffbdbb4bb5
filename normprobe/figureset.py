"""Rerun every figure group's analysis and redraw all figures (``normprobe figures``).

Each group is one YAML in ``analyses/``: ``<group>.yaml`` at the quick scale
(digits, small networks, minutes on a 2-core CPU) and ``<group>.paper.yaml``
at the paper's scale (MNIST / CIFAR-10, WRN-26-2, 512 Hessian samples).
The results go to ``runs/figures/<group>`` (finished runs are kept, so a
second call resumes) and the group's figures to one folder, which records
the results each figure was drawn from (:mod:`normprobe.plotting.record`).

This module runs analyses and then draws; :mod:`normprobe.plotting` itself
only reads stored tables.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from normprobe.analyze import analyze, summary_line
from normprobe.errors import NormprobeError
from normprobe.plotting import FIGURES, plot_results, record_figures
from normprobe.properties import PropertiesError, PropertyTable
from normprobe.results import Results, load_results
from normprobe.threads import check_threads
from normprobe.zoo_measures import measure_properties

__all__ = [
    "GROUPS",
    "ORDER",
    "Group",
    "RegenerateReport",
    "regenerate",
    "config_path",
    "property_table",
]


@dataclass(frozen=True)
class Group:
    """One analysis (``analyses/<name>.yaml``) and the figures drawn from it (base names:
    the gallery names each for the analysis' model, e.g. ``fig4`` drawn as ``fig4_skip``)."""

    name: str
    figures: tuple[str, ...]


#: the figure set's analyses, in the order they run (each ``analyses/<name>.yaml``)
ORDER = (
    "fig1_mlp_init",
    "fig2_wrn_init",
    "fig2_wrn_skip_init",
    "fig3_4_6_wrn_training",
    "fig4_wrn_skip_training",
    "fig5_batch_size",
    "renorm_small_noniid",
    "balnorm_convergence",
    "regnorm_batch_mean",
    "transformer",
    "properties",
)
#: each analysis and the figures drawn from it (as each figure of the gallery names them)
GROUPS: tuple[Group, ...] = tuple(
    Group(name, tuple(spec.base for spec in FIGURES if name in spec.analyses)) for name in ORDER
)


@dataclass
class RegenerateReport:
    """Seconds per group, figures written, and groups that failed (with the reason)."""

    seconds: dict[str, float] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def config_path(analyses: str | Path, group: str, scale: str) -> Path:
    """``analyses/<group>.yaml`` (quick) or ``analyses/<group>.paper.yaml`` (paper)."""
    suffix = ".yaml" if scale == "quick" else f".{scale}.yaml"
    return Path(analyses) / f"{group}{suffix}"


def regenerate(
    *,
    scale: str = "quick",
    analyses: str | Path = "analyses",
    runs: str | Path | None = None,
    out: str | Path | None = None,
    formats: str | Sequence[str] = "png",
    groups: Sequence[str] | None = None,
    plot_only: bool = False,
    force: bool = False,
    quiet: bool = False,
    threads: int | None = None,
    log=None,
) -> RegenerateReport:
    """Run each group's analysis at ``scale`` (unless ``plot_only``) and draw its figures.

    ``runs`` defaults to ``runs/figures`` (``runs/figures-paper``), ``out`` to
    ``figures`` (``figures/paper``). A group whose analysis fails is reported
    and the others still run. ``threads`` sets the torch threads of every
    run in place of each analysis' ``train.threads`` (default 1 at quick
    scale: the small networks gain nothing from more, and on a busy machine
    two threads made a run several times slower; at paper scale, each
    analysis' own setting, ``auto`` unless it says otherwise).
    """
    if scale not in ("quick", "paper"):
        raise NormprobeError(f"--scale: {scale!r} is not a scale; use quick or paper")
    if log is None:
        log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    runs = Path(runs or ("runs/figures" if scale == "quick" else "runs/figures-paper"))
    out = Path(out or ("figures" if scale == "quick" else "figures/paper"))
    known = {g.name: g for g in GROUPS}
    chosen = list(GROUPS)
    if groups is not None:
        unknown = [g for g in groups if g not in known]
        if unknown:
            raise NormprobeError(
                f"--only: no group {', '.join(map(repr, unknown))}; groups: {', '.join(known)}"
            )
        chosen = [known[g] for g in groups]
    for group in chosen:
        path = config_path(analyses, group.name, scale)
        if not path.exists():
            raise NormprobeError(
                f"{path} does not exist; run from the repository root or pass --analyses DIR"
            )
    if threads is None and scale == "quick":
        threads = 1
    if threads is not None and not plot_only:
        check_threads(threads, "--threads")
    report = RegenerateReport()
    total = time.perf_counter()
    for group in chosen:
        start = time.perf_counter()
        directory = runs / group.name
        try:
            if plot_only:
                results = load_results(directory)
            else:
                log(f"== {group.name}: {config_path(analyses, group.name, scale)} -> {directory}")
                results = analyze(
                    config_path(analyses, group.name, scale),
                    out=directory,
                    force=force,
                    quiet=quiet,
                    threads=threads,
                )
                log(summary_line(results))
            drawn = plot_results(
                results,
                out,
                formats=formats,
                only=group.figures,
                property_table=property_table(results, group.figures),
            )
            # the folder holds every group's figures: each group's are recorded with its
            # results, so `normprobe plot` of other results there is refused
            written = [path for paths in drawn.written.values() for path in paths]
            if written:
                record_figures(out, results, written)
        except NormprobeError as err:
            report.failed[group.name] = str(err)
            log(f"{group.name}: failed: {err}")
            continue
        finally:
            report.seconds[group.name] = time.perf_counter() - start
        for paths in drawn.written.values():
            report.written.extend(paths)
            log(f"  wrote {', '.join(str(p) for p in paths)}")
        for name, reason in drawn.skipped.items():
            report.skipped[name] = reason
            log(f"  skipped {name}: {reason}")
        log(f"  {group.name} took {report.seconds[group.name]:.0f} s")
    log(
        f"{len(report.written)} figure files in {out}; {len(report.skipped)} skipped, "
        f"{len(report.failed)} groups failed; {time.perf_counter() - total:.0f} s in all"
    )
    return report


def property_table(results: Results, figures: Sequence[str] | None) -> PropertyTable | None:
    """The properties table for the heatmap when ``figures`` (None: all) include it.

    :func:`normprobe.measure_properties`: every zoo normalizer, and the
    sequence leaks measured on the normalizers; None when the results hold
    no measurements (the heatmap is then skipped with the reason).
    """
    if figures is not None and "properties" not in figures:
        return None
    try:
        return measure_properties(results)
    except PropertiesError:
        return None
