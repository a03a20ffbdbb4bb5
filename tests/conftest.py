"""Fixtures shared across the test folders."""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Callable

import pytest

from normprobe.cli import main

Cli = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def cli_here(capsys: pytest.CaptureFixture[str]) -> Cli:
    """``cli_here(*args)``: the CLI as its entry point runs it (``main(argv)``, exit code from
    its return value or argparse's ``SystemExit``), in this process: a process start imports
    torch and the rest again, seconds per call. Warnings go to stderr as a process would print
    them, so "one line" still counts them. Returns what ``subprocess.run`` would."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                code = main(list(args))
            except SystemExit as exit:
                code = exit.code
        out = capsys.readouterr()
        said = "".join(
            warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught
        )
        return subprocess.CompletedProcess(list(args), code, out.out, out.err + said)

    return run
