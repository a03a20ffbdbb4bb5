"""The ``normprobe`` command: argument wiring only, each command a few lines over the library."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from normprobe import __version__
from normprobe.errors import NormprobeError, listed

if TYPE_CHECKING:
    from normprobe.results import Results

# Each command imports the library it runs (torch, pandas, scipy: about 3 s) when it runs,
# so that `normprobe --help`, a mistyped command and a wrong argument answer at once.

__all__ = ["main", "build_parser", "add_figures_arguments"]

EXAMPLES = """\
examples:
  normprobe analyze analyses/quickstart.yaml            every normalizer, MLP on digits
  normprobe analyze my.yaml --set train.steps=100 --out runs/short
  normprobe plot runs/quickstart                       every figure its results support
  normprobe figures                                    rerun analyses/ and redraw figures/
  normprobe properties runs/figures/properties                 Rao & Sohl-Dickstein's Table 2, measured
  normprobe list                 show the registered normalizers, models and datasets
  normprobe list normalizers     only the normalizers
"""

PROPERTIES_EXAMPLES = """\
examples:
  normprobe analyze analyses/properties.yaml && normprobe properties runs/figures/properties
  normprobe properties runs/figures/properties --out figures --format png,pdf
  normprobe properties runs/figures/fig3_4_6_wrn_training   what those results measure

Each cell is +, - or "not measured" next to the measured number; the
criteria (quantity, comparison, threshold) are the table's footnotes and
the docstring of normprobe.properties. Relative criteria compare with the
none and batch rows of the same results.
"""

PLOT_EXAMPLES = """\
examples:
  normprobe plot runs/quickstart
  normprobe plot runs/quickstart --out paper/figs --format png,pdf
  normprobe plot runs/quickstart --only fig4,fig6a
  normprobe plot runs/other --out paper/figs --force   replace the figures of other results

Figure names follow Rao & Sohl-Dickstein 2020 (1a/1b MLP at init, 2a/2b WRN at init, 3a-c
through training, 4 Hessian density at step 50, 6a/6b outlier ratio and
largest eigenvalue); WRN with skips adds _skip, the MLP's training figures
_mlp. Analyses with variants also give fig5 (accuracy against batch size)
and the appendix figures figA_renorm, figA_balnorm and figA_regnorm_mean.
Plotting reads the stored tables only; it never trains or probes. The figure
folder records which results its figures come from (normprobe-figures.json):
figures of other results there are refused unless --force, which removes
them. With no figure to draw, the command says why and exits with 2.
"""

FIGURES_EXAMPLES = """\
examples:
  normprobe figures                       quick scale: every analysis in minutes on a CPU
  normprobe figures --scale paper         the paper's settings (datasets + GPU)
  normprobe figures --plot-only           redraw figures/ from the stored results
  normprobe figures --only fig1_mlp_init  one analysis group
"""

ANALYZE_EXAMPLES = """\
examples:
  normprobe analyze analyses/quickstart.yaml
  normprobe analyze analyses/quickstart.yaml --set normalizers=[batch,layer] --set train.steps=50
  normprobe analyze my.yaml --out runs/again --force
  normprobe analyze my.yaml --jobs 2                   two runs at once, in worker processes
  normprobe analyze my.yaml --executor ray --address auto      each run a task on a Ray cluster

Finished runs are kept: run the same command again after an interruption and
it does only what is missing (--force redoes everything). Results:
OUT/results.parquet (and .csv), OUT/hessian_*.parquet, OUT/manifest.json,
OUT/runs.jsonl; in Python: normprobe.load_results(OUT).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normprobe",
        description="Probe what normalization layers do to a network.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"normprobe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_an = sub.add_parser(
        "analyze",
        help="train every (normalizer, lr, seed) of a YAML config and record every probe",
        description="Train every (normalizer, learning rate, seed) run of a YAML config, "
        "measuring accuracy, the probes and the Hessian spectrum at the scheduled steps.",
        epilog=ANALYZE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_an.add_argument("config", help="the analysis YAML file")
    p_an.add_argument("--out", metavar="DIR", help="output folder (default: the config's output)")
    p_an.add_argument(
        "--force",
        action="store_true",
        help="redo every run; the old results are kept in OUT/.replaced until the new "
        "analysis has finished",
    )
    p_an.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")
    p_an.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by its dotted key (repeatable), e.g. train.steps=100",
    )
    p_an.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="where the runs execute: local (this machine, the default) or ray (each run a "
        "Ray task; needs pip install 'normprobe[ray]')",
    )
    p_an.add_argument(
        "--jobs",
        type=_positive_int,
        metavar="N",
        help="runs at once: local, N worker processes (default: one run at a time, in this "
        "process); ray, the CPUs of the local Ray instance and the most runs in flight. "
        "Each run uses train.threads torch threads (auto: from the model's size, the cores "
        "and N)",
    )
    p_an.add_argument(
        "--threads",
        type=_threads_arg,
        metavar="N",
        help="torch CPU threads of every run, a number or auto, for this call only: it replaces "
        "train.threads without changing the config (its hash), so a folder's runs resume "
        "under it; a number other than the finished runs' count is refused",
    )
    p_an.add_argument(
        "--address",
        metavar="ADDR",
        help="the Ray cluster to submit to (with --executor ray): 'auto' for the cluster this "
        "machine joined with `ray start`, or HEAD_IP:6379; default: a local Ray instance",
    )
    p_an.set_defaults(func=cmd_analyze)

    p_plot = sub.add_parser(
        "plot",
        help="draw every figure the stored results of an analysis support",
        description="Draw every figure the stored results of an analysis support, and say "
        "which figures were skipped for lack of data.",
        epilog=PLOT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_plot.add_argument("results", metavar="RESULTS_DIR", help="output folder of an analysis")
    p_plot.add_argument(
        "--out", metavar="DIR", help="where to write (default: RESULTS_DIR/figures)"
    )
    p_plot.add_argument(
        "--format", default="png", help="comma-separated file formats: png, pdf, svg (default png)"
    )
    p_plot.add_argument(
        "--only", metavar="NAMES", help="comma-separated figure names, e.g. fig4,fig6a"
    )
    p_plot.add_argument(
        "--force",
        action="store_true",
        help="draw into a folder that holds figures of other results, removing those "
        "(only the files its normprobe-figures.json lists, unchanged) once these are drawn",
    )
    p_plot.set_defaults(func=cmd_plot)

    p_fig = sub.add_parser(
        "figures",
        help="run every analysis in analyses/ and redraw figures/ (figures/regenerate.py)",
        description="Run every figure group's analysis at the chosen scale, then draw all "
        "figures into one folder. Finished runs are kept, so an interrupted call resumes.",
        epilog=FIGURES_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_figures_arguments(p_fig)
    p_fig.set_defaults(func=cmd_figures)

    p_prop = sub.add_parser(
        "properties",
        help="the measured properties table (Rao & Sohl-Dickstein 2020, Table 2) of an analysis' results",
        description="Judge every normalizer on the ten properties of Rao & Sohl-Dickstein's Table 2 from "
        "the stored results of an analysis, and write the table as Markdown "
        "(properties.md, with the paper's verdicts alongside), CSV (properties.csv) and a "
        "heatmap (properties.png). Prints the Markdown table.",
        epilog=PROPERTIES_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_prop.add_argument("results", metavar="RESULTS_DIR", help="output folder of an analysis")
    p_prop.add_argument(
        "--out", metavar="DIR", help="where to write (default: RESULTS_DIR/properties)"
    )
    p_prop.add_argument(
        "--format", default="png", help="comma-separated heatmap formats: png, pdf, svg"
    )
    p_prop.set_defaults(func=cmd_properties)

    p_list = sub.add_parser(
        "list",
        help="list the registered normalizers, models and datasets",
        description="List the registered normalizers, models and datasets, one per line, grouped.",
    )
    p_list.add_argument(
        "what",
        nargs="?",
        choices=["all", "normalizers", "models", "datasets"],
        default="all",
        help="which group to list (default: all)",
    )
    p_list.set_defaults(func=cmd_list)
    return parser


def add_figures_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``normprobe figures``, shared with figures/regenerate.py."""
    parser.add_argument(
        "--scale",
        choices=["quick", "paper"],
        default="quick",
        help="quick: digits, small networks, minutes on a CPU (default); paper: the "
        "paper's settings from analyses/<group>.paper.yaml (needs the datasets, and a GPU)",
    )
    parser.add_argument(
        "--analyses", metavar="DIR", default="analyses", help="folder of the group YAML files"
    )
    parser.add_argument(
        "--runs",
        metavar="DIR",
        help="where the analyses write their results (default: runs/figures[-paper])",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default="figures",
        help="where to draw the figures (default figures)",
    )
    parser.add_argument("--format", default="png", help="comma-separated: png, pdf, svg")
    parser.add_argument(
        "--only", metavar="GROUPS", help="comma-separated group names (default: every group)"
    )
    parser.add_argument(
        "--plot-only", action="store_true", help="draw from the stored results; run nothing"
    )
    parser.add_argument("--force", action="store_true", help="redo every run of every analysis")
    parser.add_argument("--quiet", action="store_true", help="no per-run lines")
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads of every run (default: 1 at quick scale, where the networks "
        "are too small to gain from more and a busy machine makes extra threads much slower; "
        "each analysis' train.threads, auto unless set, at paper scale)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"give a positive number, got {value}")
    return value


def _threads_arg(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def cmd_analyze(args: argparse.Namespace) -> int:
    from normprobe.analyze import analyze, summary_line, unsettled_lines

    results = analyze(
        args.config,
        out=args.out,
        force=args.force,
        quiet=args.quiet,
        overrides=args.overrides,
        executor=args.executor,
        jobs=args.jobs,
        address=args.address,
        threads=args.threads,
    )
    if not args.quiet and len(results.runs):
        table = results.summary()
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep="-"))
    for line in unsettled_lines(results):
        print(line)
    print(summary_line(results))
    failed = int((results.runs["status"] == "failed").sum()) if len(results.runs) else 0
    return 1 if failed else 0


def cmd_plot(args: argparse.Namespace) -> int:
    from normprobe.results import UnclosedRunWarning, check_output_folder, load_results

    out = Path(args.out) if args.out is not None else Path(args.results) / "figures"
    check_output_folder(out, "--out")
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    with warnings.catch_warnings():  # said below, in the command's own words
        warnings.simplefilter("ignore", UnclosedRunWarning)
        results = load_results(args.results)
    # the plotting stack (matplotlib, seaborn, scipy.stats) loads with the commands that draw
    from normprobe.figureset import property_table
    from normprobe.plotting import check_figure_folder, plot_results, record_figures

    # before anything is drawn: figures of other results there are refused (or, with
    # --force, removed once these are drawn)
    replaced = check_figure_folder(out, results, what="--out", force=args.force)
    for run, problem in sorted(results.incomplete.items()):
        print(f"left out {run}: its folder is incomplete ({problem}); rerun `normprobe analyze`")
    for run in results.unclosed:
        print(
            f"read {run} from its part files: its monitor was not closed (still recording, or "
            f"its process died); every measurement completed before is drawn"
        )
    report = plot_results(
        results, out, formats=args.format, only=only, property_table=property_table(results, only)
    )
    for line in report.lines():
        print(line)
    if not report.written:  # a script must not take this for a redrawn folder
        raise NormprobeError(_nothing_drawn(results, args.results, only))
    written = [path for paths in report.written.values() for path in paths]
    removed, kept = record_figures(out, results, written, replaced)
    if removed:
        names = [p.name for p in removed]
        files = f"figure file{'' if len(removed) == 1 else 's'}"
        print(f"removed {len(removed)} {files} of other results: {listed(names, 6)}")
    for path in kept:
        print(
            f"kept {path}: a figure of other results, changed since normprobe drew it; "
            "delete it if it is stale"
        )
    return 0


def _nothing_drawn(results: Results, source: str, only: list[str] | None) -> str:
    """Why ``normprobe plot`` drew nothing, and what to do, in one line."""
    where = repr(str(source))
    if only:
        return (
            f"no figure drawn: the results in {where} support none of the figures --only names "
            f"({', '.join(only)}; the reason for each is printed above); name others, or leave "
            "out --only to draw every figure they support"
        )
    runs = results.runs
    statuses = runs["status"].tolist() if "status" in runs else []
    if not statuses:
        return (
            f"no figure drawn: {where} records no runs; run `normprobe analyze` with its "
            "config, then plot again"
        )
    if all(status == "failed" for status in statuses):
        errors = [str(e) for e in runs.get("error", []) if isinstance(e, str) and e.strip()]
        first = errors[0].strip().splitlines()[0][:200] if errors else ""
        return (
            f"no figure drawn: every run in {where} failed ({len(statuses)} of "
            f"{len(statuses)}{'; the first: ' + first if first else ''}); fix the cause (each "
            f"run's error is in {str(Path(source) / 'runs.jsonl')!r}), run `normprobe analyze` "
            "with its config again (failed runs run again), then plot again"
        )
    return (
        f"no figure drawn: the results in {where} support none of the figures (the reason "
        "for each is printed above: what it needs measured); measure that in the config, run "
        "`normprobe analyze` again, then plot again"
    )


def cmd_properties(args: argparse.Namespace) -> int:
    from normprobe.results import check_output_folder
    from normprobe.zoo_measures import measure_properties

    out = Path(args.out) if args.out is not None else Path(args.results) / "properties"
    check_output_folder(out, "--out")
    table = measure_properties(args.results)
    from normprobe.plotting import write_properties

    paths = write_properties(table, out, args.format)
    print(table.to_markdown())
    print("## Against Rao & Sohl-Dickstein 2020, Table 2\n")
    print(table.against_paper())
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    groups = [g.strip() for g in args.only.split(",") if g.strip()] if args.only else None
    from normprobe.figureset import regenerate

    report = regenerate(
        scale=args.scale,
        analyses=args.analyses,
        runs=args.runs,
        out=args.out,
        formats=args.format,
        groups=groups,
        plot_only=args.plot_only,
        force=args.force,
        quiet=args.quiet,
        threads=args.threads,
    )
    return 1 if report.failed else 0


def cmd_list(args: argparse.Namespace) -> int:
    from normprobe.data import describe as describe_datasets
    from normprobe.models import MODELS
    from normprobe.norms import NORMS

    def first_line(obj: object) -> str:
        return (getattr(obj, "__doc__", "") or "").strip().splitlines()[0] if obj.__doc__ else ""

    groups = {
        "normalizers": [
            (name, s.summary + (f" (alias: {', '.join(s.aliases)})" if s.aliases else ""))
            for name, s in NORMS.items()
        ],
        "models": [(name, first_line(factory)) for name, factory in MODELS.items()],
        "datasets": list(describe_datasets().items()),
    }
    chosen = groups if args.what == "all" else {args.what: groups[args.what]}
    blocks = []
    for title, rows in chosen.items():
        width = max(len(name) for name, _ in rows)
        lines = [f"{title}:"] + [f"  {name:<{width}}  {doc}" for name, doc in rows]
        blocks.append("\n".join(lines))
    print("\n\n".join(blocks))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        overrides = [a for a in extra if "=" in a and not a.startswith("-")]
        hint = (
            f"; config overrides go after --set: --set {' '.join(overrides)}" if overrides else ""
        )
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except NormprobeError as err:
        if args.debug:
            raise
        print(f"normprobe: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumes = ""
        if args.command == "analyze":
            resumes = (
                "; finished runs are kept: run the same command without --force to resume from them"
                if args.force
                else "; finished runs are kept, and the same command resumes from them"
            )
        print(f"normprobe: interrupted{resumes}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
