"""Every quick benchmark in one run, and one table of their ratios.

    python benchmarks/summary.py [--only hessian probes] [--timeout 400] [--logs DIR]

Runs each script in ``benchmarks/`` that has a ``--quick`` flag as a
subprocess, one after the other (never two at once: they would time each
other), with ``OMP_NUM_THREADS=1`` unless the script manages its threads
itself (its source names ``OMP_NUM_THREADS``), and collects the lines
they print as

    RATIO <name> <value>
    TARGET <name> <target>      (optional, e.g. "<=2.5")

into one table (name, value, target, script), with the load average before
and after each script and the whole run: every number on this machine is
a ratio of two timings taken side by side, and the load says how much to
trust it. The quick runs together take a few minutes at one thread.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: targets for ratios whose script prints none (by name prefix), from the issues that set them
KNOWN_TARGETS = {
    "hvp_over_gradient": "<=2.5",
    "slq": "<=1.05",
    "probe_overhead": "<=1.10",
    "contention": "<2",
    "pyhessian_over_ours": ">=3",
    "hutchpp_over_hutchinson": "<1",
}

LINE = re.compile(r"^(RATIO|TARGET)\s+(\S+)\s+(\S+)\s*$")


def quick_scripts(only: list[str] | None = None) -> list[Path]:
    """The benchmark scripts with a ``--quick`` flag (this one excluded), by name."""
    found = []
    for path in sorted(HERE.glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        if only and path.stem not in only:
            continue
        if '"--quick"' in path.read_text() or "'--quick'" in path.read_text():
            found.append(path)
    return found


def environment(script: Path) -> dict[str, str]:
    """The subprocess's environment: one torch thread unless the script sets threads itself."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    if "OMP_NUM_THREADS" not in script.read_text():
        env["OMP_NUM_THREADS"] = "1"
    return env


def parse(output: str) -> tuple[dict[str, float], dict[str, str]]:
    """The ``RATIO`` values and ``TARGET`` texts printed in ``output``."""
    ratios: dict[str, float] = {}
    targets: dict[str, str] = {}
    for line in output.splitlines():
        match = LINE.match(line.strip())
        if not match:
            continue
        kind, name, value = match.groups()
        if kind == "RATIO":
            try:
                ratios[name] = float(value)
            except ValueError:
                ratios[name] = float("nan")
        else:
            targets[name] = value
    return ratios, targets


def known_target(name: str) -> str:
    for prefix, target in KNOWN_TARGETS.items():
        if name.startswith(prefix):
            return target
    return ""


def meets(value: float, target: str) -> str:
    """ "yes"/"no" when ``target`` is a comparison with a number, else ""."""
    match = re.match(r"^(<=|>=|<|>)([-+0-9.eE]+)$", target)
    if not match or value != value:
        return ""
    op, bound = match.group(1), float(match.group(2))
    ok = {
        "<=": value <= bound,
        ">=": value >= bound,
        "<": value < bound,
        ">": value > bound,
    }[op]
    return "yes" if ok else "no"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="script names without .py (default: all)")
    parser.add_argument("--timeout", type=float, default=420, help="seconds per script")
    parser.add_argument("--logs", type=Path, help="folder for each script's full output")
    args = parser.parse_args()
    scripts = quick_scripts(args.only)
    if not scripts:
        print("no benchmark script with a --quick flag found")
        return 1
    rows: list[tuple[str, float, str, str]] = []
    status: list[str] = []
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    print(
        f"nproc {os.cpu_count()}, load average {load_start:.2f}; scripts: "
        f"{', '.join(p.name for p in scripts)}"
    )
    failed = False
    for script in scripts:
        env = environment(script)
        before = os.getloadavg()[0]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, str(script), "--quick"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            output, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as err:
            out = err.stdout or b""
            output = out.decode() if isinstance(out, bytes) else out
            code = "timeout"
        seconds = time.perf_counter() - t0
        after = os.getloadavg()[0]
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            (args.logs / f"{script.stem}.txt").write_text(output)
        ratios, targets = parse(output)
        threads = env.get("OMP_NUM_THREADS", "its own")
        line = (
            f"{script.name}: {seconds:.0f} s, exit {code}, {len(ratios)} ratios, "
            f"OMP_NUM_THREADS={threads}, load {before:.2f} -> {after:.2f}"
        )
        status.append(line)
        print(line, flush=True)
        if code != 0:
            failed = True
            print("  last lines:\n    " + "\n    ".join(output.strip().splitlines()[-8:]))
        for name, value in ratios.items():
            rows.append((name, value, targets.get(name) or known_target(name), script.stem))
    total = time.perf_counter() - start
    print(f"\n{'ratio':58s} {'value':>9s}  {'target':8s} {'met':4s} script")
    for name, value, target, script_name in rows:
        print(f"{name:58s} {value:9.3f}  {target:8s} {meets(value, target):4s} {script_name}")
    print(
        f"\n{len(rows)} ratios from {len(scripts)} scripts in {total:.0f} s; load average "
        f"{load_start:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
