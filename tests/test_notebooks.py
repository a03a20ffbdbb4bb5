"""The example notebooks run from top to bottom, and are committed with their outputs.

Each notebook is executed as committed (nbclient, a fresh IPython kernel) in a
temporary folder, so what it writes stays out of the repository.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def test_there_are_the_three_examples() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "01_probes_and_hessian.ipynb",
        "02_monitor_in_your_loop.ipynb",
        "03_analysis_from_yaml.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs_and_figures(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "run make_notebooks.py"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    # every figure cell shows its figure: drawing one never turns interactive mode off
    for cell in code:
        if cell.source.rstrip().endswith(";"):
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source
    text = nbformat.writes(nb)
    assert "/tmp/" not in text and str(Path.home()) + "/" not in text  # no machine's paths


@pytest.fixture(scope="module")
def executed(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[nbformat.NotebookNode | BaseException, Path]]:
    """Every notebook executed as committed, each in its own fresh kernel and folder, all
    three at once: one torch thread per kernel, so on two cores they take about as long as
    the longest of them rather than their sum. Per notebook: the executed notebook (or what
    its execution raised) and the folder it ran in."""
    folders = {path.stem: tmp_path_factory.mktemp(path.stem) for path in NOTEBOOKS}
    clients = {
        path.stem: NotebookClient(
            nbformat.read(path, as_version=4),
            timeout=300,
            kernel_name="python3",
            resources={"metadata": {"path": str(folders[path.stem])}},
        )
        for path in NOTEBOOKS
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("MKL_NUM_THREADS", "1")
        # the kernel imports this checkout's normprobe, installed or not
        root = str(EXAMPLES.parent)
        patch.setenv(
            "PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        )

        async def run_all() -> list[object]:
            runs = (client.async_execute() for client in clients.values())
            return await asyncio.gather(*runs, return_exceptions=True)

        outcomes = asyncio.run(run_all())
    return {
        stem: (outcome if isinstance(outcome, BaseException) else clients[stem].nb, folders[stem])
        for stem, outcome in zip(clients, outcomes)
    }


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(
    path: Path, executed: dict[str, tuple[nbformat.NotebookNode | BaseException, Path]]
) -> None:
    nb, folder = executed[path.stem]
    if isinstance(nb, BaseException):  # CellExecutionError names the cell that failed
        raise nb
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert (folder / "runs").is_dir() or path.stem.startswith("01")
