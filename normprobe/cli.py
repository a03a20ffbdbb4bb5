"""The ``normprobe`` command: argument wiring only, each command a few lines over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

EXAMPLES = """\
examples:
  normprobe list                 show the registered normalizers, models and datasets
  normprobe list normalizers     only the normalizers
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
