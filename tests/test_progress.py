"""Progress bars through tqdm.auto: widgets in a notebook, a bar on a terminal, none in a log."""

from __future__ import annotations

import importlib
import io

import pytest
from tqdm.std import tqdm as std_tqdm

A = importlib.import_module("normprobe.analyze")  # the module (normprobe.analyze is the function)


class _NotebookBar(std_tqdm):  # what tqdm.auto gives in a Jupyter kernel with ipywidgets
    pass


_NotebookBar.__module__ = "tqdm.notebook"


def test_notebook_widgets_even_though_stderr_is_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(A, "tqdm", _NotebookBar)
    monkeypatch.setattr(A.sys, "stderr", io.StringIO())
    assert A._progress(quiet=False) is _NotebookBar
    assert A._progress(quiet=True) is None


def test_text_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(A, "tqdm", std_tqdm)
    monkeypatch.setattr(A.sys, "stderr", io.StringIO())  # a log file: one line per run instead
    assert A._progress(quiet=False) is None

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(A.sys, "stderr", Terminal())
    assert A._progress(quiet=False) is std_tqdm
