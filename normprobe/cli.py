"""The ``normprobe`` command: argument wiring only, each command a few lines over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

EXAMPLES = """\
examples:
  normprobe analyze analyses/quickstart.yaml            every normalizer, MLP on digits
  normprobe analyze my.yaml --set train.steps=100 --out runs/short
  normprobe list                 show the registered normalizers, models and datasets
  normprobe list normalizers     only the normalizers
"""

ANALYZE_EXAMPLES = """\
examples:
  normprobe analyze analyses/quickstart.yaml
  normprobe analyze analyses/quickstart.yaml --set normalizers=[batch,layer] --set train.steps=50
  normprobe analyze my.yaml --out runs/again --force

Finished runs are kept: run the same command again after an interruption and
it does only what is missing (--force redoes everything). Results:
OUT/results.parquet (and .csv), OUT/hessian_*.parquet, OUT/manifest.json,
OUT/runs.jsonl; in Python: normprobe.load_results(OUT).
"""


def build_parser() -> argparse.ArgumentParser:
    from normprobe import __version__

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
    p_an.add_argument("--force", action="store_true", help="redo every run, discarding old results")
    p_an.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")
    p_an.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by its dotted key (repeatable), e.g. train.steps=100",
    )
    p_an.set_defaults(func=cmd_analyze)

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


def cmd_analyze(args: argparse.Namespace) -> int:
    from normprobe.analyze import analyze, summary_line

    results = analyze(
        args.config, out=args.out, force=args.force, quiet=args.quiet, overrides=args.overrides
    )
    print(summary_line(results))
    failed = int((results.runs["status"] == "failed").sum()) if len(results.runs) else 0
    return 1 if failed else 0


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
    from normprobe.errors import NormprobeError

    parser = build_parser()
    args = parser.parse_args(argv)
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
        print("normprobe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
