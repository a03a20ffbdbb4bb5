"""Write the example notebooks from the cells below and execute them, saving their outputs.

    python examples/make_notebooks.py          # rewrites examples/*.ipynb with fresh outputs

The notebooks are committed with their outputs so that they read on a
repository page; ``tests/test_notebooks.py`` executes the committed files.
They run in a temporary folder, so whatever they write (``runs/...``) stays
out of the repository. Keep each one quick (well under 30 s on 2 cores).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent

PROBES = [
    (
        "md",
        """# The probes and the Hessian on your own model

normprobe's probes and Hessian take any `torch.nn.Module`. Here: a small
convolutional network of our own with a normalization layer we choose, on the
embedded scikit-learn digits (no download). Definitions of every quantity are in
`docs/definitions.md`.""",
    ),
    (
        "code",
        """import torch, torch.nn as nn, torch.nn.functional as F
import normprobe
from normprobe.plotting import depth_profile

ds = normprobe.load_dataset("digits")
x = ds.train.x.reshape(-1, 1, 8, 8)   # the digits as 8x8 images
y = ds.train.y

def net(norm: str) -> nn.Module:
    torch.manual_seed(0)
    layer = {"batch": lambda c: nn.BatchNorm2d(c), "group": lambda c: nn.GroupNorm(4, c)}[norm]
    blocks = []
    for c_in, c_out in [(1, 16), (16, 16), (16, 16), (16, 16)]:
        blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), layer(c_out), nn.ReLU()]
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(16 * 64, 10))

models = {"batch": net("batch"), "group": net("group")}""",
    ),
    (
        "md",
        """## Representation and gradient probes

Each probe returns a tidy table: one row per probed layer (chosen by role:
modules owning a weight), with its `depth` in execution order.""",
    ),
    (
        "code",
        """frames = []
for norm, model in models.items():
    rep = normprobe.representation_correlation(model, x[:64])           # X vs X + noise
    grad = normprobe.gradient_correlation(model, F.cross_entropy, (x[:64], y[:64]), (x[64:128], y[64:128]))
    frames += [rep.assign(normalizer=norm), grad.assign(normalizer=norm)]
    print(norm, "correlation at the last layer", round(rep["value"].iloc[-1], 3),
          "| gradient correlation, first layer", round(grad["value"].iloc[0], 3))
import pandas as pd
probes = pd.concat(frames, ignore_index=True).assign(step=0, seed=0)
probes[["normalizer", "layer", "depth", "metric", "value"]].head()""",
    ),
    (
        "md",
        """The figure functions read the columns they document (`normalizer, step,
metric, value`, and `depth` here); the `assign` above added the ones a bare probe
table lacks. A missing one is named with how to add it.""",
    ),
    (
        "code",
        """ax = depth_profile(probes, "repr_corr_noise", ylabel="correlation of X and X + noise")""",
    ),
    (
        "code",
        """try:
    depth_profile(probes.drop(columns="normalizer"), "grad_corr")
except Exception as err:
    print(type(err).__name__, ":", err)""",
    ),
    (
        "md",
        """## The Hessian spectrum

Lanczos on Hessian-vector products: the top eigenvalues, the trace (Hutchinson)
and the spectral density (stochastic Lanczos quadrature), in float64.""",
    ),
    (
        "code",
        """import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(5.6, 3), layout="constrained")
for norm, model in models.items():
    spec = normprobe.hessian_spectrum(model, F.cross_entropy, (x[:128], y[:128]),
                                      what=("top", "trace", "density"), n_samples=None,
                                      steps=30, num_vectors=1, k=3, trace_samples=8, num_classes=10)
    print(norm, "top eigenvalues", [round(float(v), 2) for v in spec.top_eigenvalues],
          "trace", round(spec.trace, 1))
    density = spec.density()
    ax.semilogy(density["eigenvalue"], density["density"].clip(lower=1e-7), label=norm)
ax.set_xlabel("Hessian eigenvalue"); ax.set_ylabel("density"); ax.legend();""",
    ),
]

MONITOR = [
    (
        "md",
        """# The monitor in your own training loop

`normprobe.Monitor` runs an analysis' probes and Hessian at scheduled steps
inside a loop you write, leaving the model, its gradients and the optimizer as
found. Two normalizers, trained the same way, written to one results folder.""",
    ),
    (
        "code",
        """import torch, torch.nn.functional as F
import normprobe
from normprobe.plotting import fig1a, fig3a, fig3c, fig6b, hessian_density_panels

ds = normprobe.load_dataset("digits", normalize="unit")
x, y = ds.train.x, ds.train.y
hessian = {"pieces": ["top", "trace", "density"], "lanczos_steps": 24, "trace_samples": 8}

for norm in ["batch", "layer"]:
    model = normprobe.build_model("mlp", norm=norm, depth=6, width=64, seed=0,
                                  input_shape=ds.input_shape, num_classes=ds.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    with normprobe.Monitor(model, F.cross_entropy, (x[:256], y[:256]), schedule=20,
                           hessian=hessian, optimizer=opt, total_steps=100,
                           eval_data={"test": (ds.test.x, ds.test.y)},
                           out="runs/my-loop") as monitor:
        for step in range(101):
            monitor.step(step)
            if step == 100:
                break
            i = torch.randint(len(x), (64,), generator=g)
            loss = F.cross_entropy(model(x[i]), y[i])
            monitor.log(step, batch_loss=loss.item())
            opt.zero_grad(); loss.backward(); opt.step()
    print(monitor)""",
    ),
    (
        "md",
        """The folder has the layout of `normprobe analyze`: `load_results` (and
`normprobe plot runs/my-loop` in a shell) read it.""",
    ),
    (
        "code",
        """results = normprobe.load_results("runs/my-loop")
results.summary()""",
    ),
    ("code", """fig1a(results);"""),
    ("code", """fig3a(results);"""),
    ("code", """fig3c(results);"""),
    ("code", """fig6b(results);"""),
    ("code", """hessian_density_panels(results, step=100);"""),
]

YAML = [
    (
        "md",
        """# An analysis from a YAML file

`normprobe analyze` runs every normalizer of a config with its own training
loop. The same from Python: a small version of the quickstart (two
normalizers, a narrower MLP, 60 steps) with the config written here.""",
    ),
    (
        "code",
        """from pathlib import Path
import normprobe
from normprobe.plotting import fig1b, fig3a, fig6a, plot_results

Path("small.yaml").write_text('''
name: small
model: {name: mlp, options: {depth: 6, width: 64}}
normalizers: [batch, layer, none]
data: {name: digits, options: {normalize: unit}, probe_batch: 64, hessian_samples: 128}
train: {optimizer: sgd, lr: 0.05, momentum: 0.9, batch_size: 64, steps: 60, seeds: [0]}
probes: {schedule: {every: 20}}
hessian: {schedule: [0, 20, 60], pieces: [density, top, trace], lanczos_steps: 24,
          trace_samples: 8, chunk_size: 64}
output: runs/small
''')
results = normprobe.analyze("small.yaml", quiet=True)
results.summary()""",
    ),
    ("code", """fig1b(results);"""),
    ("code", """fig3a(results);"""),
    ("code", """fig6a(results);"""),
    (
        "md",
        """Every figure the results support, as files (what `normprobe plot runs/small`
writes):""",
    ),
    (
        "code",
        """report = plot_results(results, "runs/small/figures")
sorted(report.written)""",
    ),
]

NOTEBOOKS = {
    "01_probes_and_hessian.ipynb": PROBES,
    "02_monitor_in_your_loop.ipynb": MONITOR,
    "03_analysis_from_yaml.ipynb": YAML,
}


def notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, source) in enumerate(cells):
        make = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
        nb.cells.append(make(source, id=f"cell-{i}"))  # fixed ids: rebuilds diff cleanly
    return nb


def execute(nb: nbformat.NotebookNode, folder: Path, timeout: int = 300) -> nbformat.NotebookNode:
    """Run ``nb`` in ``folder`` with one torch thread (as the tests run)."""
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(folder)}},
        ).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return nb


def main() -> int:
    names = sys.argv[1:] or list(NOTEBOOKS)
    for name in names:
        folder = Path(tempfile.mkdtemp())
        try:
            nb = execute(notebook(NOTEBOOKS[name]), folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        nbformat.write(nb, HERE / name)
        print(f"wrote examples/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
