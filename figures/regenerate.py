#!/usr/bin/env python
"""Regenerate every figure of the gallery: run each analysis in analyses/, then plot.

    python figures/regenerate.py                  quick scale (digits, CPU, about two hours)
    python figures/regenerate.py --scale paper    the paper's settings (datasets, GPU)
    python figures/regenerate.py --plot-only      redraw from runs/figures without training

The same as ``normprobe figures``; run it from anywhere, paths are relative to
the repository root. Results go to runs/figures/<group>, PNGs to figures/.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from normprobe.cli import main

if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parents[1])
    raise SystemExit(main(["figures", *sys.argv[1:]]))
