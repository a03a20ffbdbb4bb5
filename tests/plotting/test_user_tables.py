"""Figures from tables made outside an analysis: missing columns named with their fix,
legends kept in files saved without a tight bounding box, matplotlib's interactive state kept."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from normprobe.errors import NormprobeError  # noqa: E402
from normprobe.plotting import figures as F  # noqa: E402
from normprobe.plotting.style import style_context  # noqa: E402


def _frame() -> pd.DataFrame:
    rows = []
    for norm in ("batch", "layer"):
        for step in (0, 50):
            for depth in range(1, 4):
                for metric in ("repr_corr_noise", "grad_corr"):
                    rows.append(
                        {"run": norm, "normalizer": norm, "seed": 0, "lr": 0.1, "step": step,
                         "layer": f"l{depth}", "depth": depth, "metric": metric,
                         "value": 0.5 + 0.1 * depth}
                    )  # fmt: skip
            rows.append(
                {"run": norm, "normalizer": norm, "seed": 0, "lr": 0.1, "step": step,
                 "layer": None, "depth": np.nan, "metric": "test_acc", "value": 0.5 + step / 100}
            )  # fmt: skip
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("draw", "column", "fix"),
    [
        (F.fig1a, "normalizer", "frame['normalizer'] = 'batch'"),
        (F.fig1b, "depth", "the probed layer's position"),
        (F.fig3a, "step", "Monitor.step(step)"),
        (F.fig3c, "run", "frame['run'] = 'mine'"),
        (F.fig3c, "lr", "frame['lr'] = 0.1"),
        (F.fig3b, "layer", "the probed layer's name"),
    ],
)
def test_a_missing_column_is_named_with_how_to_add_it(draw, column: str, fix: str) -> None:
    frame = _frame().drop(columns=column)
    with pytest.raises(F.MissingColumnError, match=rf"reads the column '{column}'") as err:
        draw(frame)
    assert fix in str(err.value)
    assert isinstance(err.value, NormprobeError) and not isinstance(err.value, KeyError)
    plt.close("all")


def test_the_hessian_density_names_a_missing_node_column() -> None:
    nodes = pd.DataFrame({"normalizer": ["batch"], "seed": [0], "step": [0], "value": [1.0]})
    with pytest.raises(F.MissingColumnError, match="reads the column 'weight'"):
        F.hessian_density_panels(nodes, step=0)


def test_the_full_table_draws_every_line_figure() -> None:
    frame = _frame()
    for draw in (F.fig1a, F.fig1b, F.fig3a, F.fig3b, F.fig3c):
        assert len(draw(frame).get_lines()) == 2
    plt.close("all")


def test_a_figure_saved_without_bbox_tight_keeps_its_legend_and_caption(tmp_path: Path) -> None:
    ax = F.fig1a(_frame())
    fig = ax.figure
    fig.savefig(tmp_path / "f.png", bbox_inches=None)  # outside the style: no tight bbox
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    legend = ax.get_legend().get_window_extent(renderer)
    assert box.x0 <= legend.x0 and legend.x1 <= box.x1 and legend.y1 <= box.y1
    for text in ax.texts:  # the caption under the axes
        extent = text.get_window_extent(renderer)
        assert extent.y0 >= box.y0 and extent.x1 <= box.x1
    plt.close("all")


@pytest.mark.parametrize("before", [True, False])
def test_the_style_context_leaves_the_interactive_state_as_found(before: bool) -> None:
    was = matplotlib.is_interactive()
    try:
        matplotlib.interactive(before)
        F.fig1a(_frame())
        assert matplotlib.is_interactive() is before
        with style_context():
            pass
        assert matplotlib.is_interactive() is before
    finally:
        matplotlib.interactive(was)
        plt.close("all")


def test_a_backend_that_turns_interactive_on_inside_the_style_keeps_it_on(tmp_path: Path) -> None:
    """A notebook's inline backend turns interactive mode on when the first figure loads it;
    if that first figure is normprobe's, the style context must not switch it off again."""
    (tmp_path / "fake_inline.py").write_text(
        textwrap.dedent(
            """
            import matplotlib
            from matplotlib.backends.backend_agg import FigureCanvasAgg as FigureCanvas
            from matplotlib.backends.backend_agg import FigureManagerBase as FigureManager
            matplotlib.interactive(True)  # what the inline backend does when loaded
            """
        )
    )
    script = textwrap.dedent(
        """
        import matplotlib, pandas as pd
        from normprobe.plotting import figures as F
        assert not matplotlib.is_interactive()
        frame = pd.DataFrame({"run": "a", "normalizer": "batch", "seed": 0, "lr": 0.1, "step": 0,
                              "layer": ["l1", "l2"], "depth": [1, 2], "metric": "grad_corr",
                              "value": [0.5, 0.4]})
        F.fig1b(frame)  # the first figure: the backend loads inside the style context
        print(matplotlib.get_backend(), matplotlib.is_interactive())
        """
    )
    env = {**os.environ, "MPLBACKEND": "module://fake_inline"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "True", done.stdout
