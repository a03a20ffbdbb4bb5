"""Executors: local worker processes and Ray give the tables of one process, bit for bit;
a worker that dies is retried without losing finished runs; a run that raises fails once."""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import pandas as pd
import pytest

from normprobe import executors
from normprobe.analyze import analyze
from normprobe.cli import main
from normprobe.executors import RAY_MISSING, ExecutorError
from normprobe.results import Results

# 3 normalizers, 12 steps, the Hessian at two steps; one torch thread for every
# executor, since CPU reductions may depend on the thread count
CONFIG = {
    "model": {"name": "mlp", "options": {"depth": 3, "width": 32}},
    "normalizers": ["batch", "layer", "regnorm"],
    "data": {"probe_batch": 32, "hessian_samples": 64},
    "train": {"steps": 12, "batch_size": 32, "lr": 0.05, "threads": 1},
    "probes": {"schedule": [0, 6, 12]},
    "hessian": {"schedule": [0, 12], "lanczos_steps": 12, "chunk_size": 32},
}
NO_HESSIAN = {**CONFIG, "hessian": {"enabled": False}}
TIMINGS = ["seconds", "measure_seconds"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Results:
    """The grid run one run after another in this process (today's behaviour)."""
    return analyze(CONFIG, out=tmp_path_factory.mktemp("in-process"), quiet=True)


def assert_same_tables(a: Results, b: Results) -> None:
    pd.testing.assert_frame_equal(a.metrics, b.metrics, check_exact=True)
    pd.testing.assert_frame_equal(a.hessian_nodes, b.hessian_nodes, check_exact=True)
    pd.testing.assert_frame_equal(a.hessian_density, b.hessian_density, check_exact=True)
    pd.testing.assert_frame_equal(
        a.runs.drop(columns=TIMINGS), b.runs.drop(columns=TIMINGS), check_exact=True
    )


def stamps(directory: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (directory / "runs").glob("*/run.json")}


def write_failing_factory(root: Path) -> Path:
    """A user model whose forward pass raises once training starts, for ``layer`` only.

    Each time it raises it appends a line to ``attempts``, so a test can count
    how often the run was tried.
    """
    package = root / "failpkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(
        textwrap.dedent("""\
        import torch.nn as nn
        import normprobe

        class Net(nn.Module):
            def __init__(self, norm, attempts):
                super().__init__()
                self.norm, self.attempts, self.calls = norm, attempts, 0
                self.body = nn.Sequential(
                    nn.Flatten(), normprobe.build_norm(norm, nn.Linear(64, 16), nn.ReLU()),
                    nn.Linear(16, 10))

            def forward(self, x):
                self.calls += 1
                if self.norm == "layer" and self.calls == 3:
                    with open(self.attempts, "a") as f:
                        f.write("raised\\n")
                    raise RuntimeError("simulated bug in a worker")
                return self.body(x)

        def make(norm, attempts):
            return Net(norm, attempts)
        """)
    )
    return root


def failing_config(attempts: Path) -> dict:
    return {
        **NO_HESSIAN,
        "normalizers": ["batch", "layer"],
        "model": {"factory": "failpkg.nets:make", "options": {"attempts": str(attempts)}},
    }


@pytest.mark.slow
def test_two_local_workers_give_the_same_tables(reference: Results, tmp_path: Path) -> None:
    lines: list[str] = []
    results = analyze(CONFIG, out=tmp_path, jobs=2, log=lines.append)
    assert_same_tables(reference, results)
    # one line per finished run, counted in the order they finish
    assert [line.split()[0] for line in lines] == ["[1/3]", "[2/3]", "[3/3]"]
    assert sorted(line.split()[1] for line in lines) == sorted(
        f"{run}:" for run in reference.runs["run"]
    )
    assert results.manifest["threads"] == 1
    assert results.manifest["executor"] == {"kind": "local", "jobs": 2, "address": None}
    assert not list(tmp_path.glob(".*.tmp"))  # the data file the workers read is gone


@pytest.mark.slow
def test_a_killed_local_worker_loses_nothing_finished_and_its_run_is_retried(
    reference: Results, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(executors.KILL_RUN_ENV, "regnorm_lr0.05_seed0")
    monkeypatch.setenv(executors.KILL_MARKER_ENV, str(marker))
    out = tmp_path / "out"
    lines: list[str] = []
    on_disk_at_death: dict[str, int] = {}

    def log(line: str) -> None:
        lines.append(line)
        if "worker process died" in line and not on_disk_at_death:
            on_disk_at_death.update(stamps(out))

    results = analyze(CONFIG, out=out, jobs=2, log=log)
    assert marker.exists()  # the worker did die halfway through regnorm
    assert any(line.startswith("regnorm_lr0.05_seed0:") and "died" in line for line in lines)
    assert set(results.runs["status"]) == {"done"}
    # runs written before the death were neither lost nor redone
    after = stamps(out)
    assert {name: after[name] for name in on_disk_at_death} == on_disk_at_death
    assert_same_tables(reference, results)


@pytest.mark.slow
def test_a_run_that_keeps_killing_its_worker_fails_after_the_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(executors.KILL_RUN_ENV, "layer_lr0.05_seed0")  # no marker: every time
    monkeypatch.delenv(executors.KILL_MARKER_ENV, raising=False)
    lines: list[str] = []
    results = analyze(NO_HESSIAN, out=tmp_path, jobs=2, log=lines.append)
    runs = results.runs.set_index("normalizer")
    assert runs["status"].to_dict() == {"batch": "done", "layer": "failed", "regnorm": "done"}
    assert "WorkerDied" in runs.loc["layer", "error"]
    retried = [
        line for line in lines if line.startswith("layer_lr0.05_seed0:") and "retrying" in line
    ]
    assert len(retried) == executors.RETRIES
    assert any(line.startswith("[") and "layer_lr0.05_seed0: failed" in line for line in lines)


@pytest.mark.slow
def test_a_run_that_raises_in_a_worker_is_failed_once_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(write_failing_factory(tmp_path / "pkg")))
    attempts = tmp_path / "attempts.txt"
    results = analyze(failing_config(attempts), out=tmp_path / "out", jobs=2, quiet=True)
    runs = results.runs.set_index("normalizer")
    assert runs["status"].to_dict() == {"batch": "done", "layer": "failed"}
    assert "simulated bug in a worker" in runs.loc["layer", "error"]
    assert attempts.read_text().splitlines() == ["raised"]


@pytest.mark.slow
def test_ray_gives_the_same_tables_survives_a_killed_worker_and_fails_a_raising_run_once(
    reference: Results, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    # Ray's workers take their environment from the instance: set it up first
    packages = write_failing_factory(tmp_path / "pkg")
    monkeypatch.syspath_prepend(str(packages))
    monkeypatch.setenv("PYTHONPATH", str(packages))
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(executors.KILL_RUN_ENV, "layer_lr0.05_seed0")
    monkeypatch.setenv(executors.KILL_MARKER_ENV, str(marker))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        lines: list[str] = []
        results = analyze(CONFIG, out=tmp_path / "out", executor="ray", log=lines.append)
        assert marker.exists()  # a worker died halfway through layer, and Ray retried it
        assert_same_tables(reference, results)
        assert sorted(line.split()[0] for line in lines) == ["[1/3]", "[2/3]", "[3/3]"]
        assert ray.is_initialized()  # an instance started by the caller is left running

        attempts = tmp_path / "attempts.txt"
        failing = analyze(
            failing_config(attempts), out=tmp_path / "failing", executor="ray", quiet=True
        )
        runs = failing.runs.set_index("normalizer")
        assert runs["status"].to_dict() == {"batch": "done", "layer": "failed"}
        assert "simulated bug in a worker" in runs.loc["layer", "error"]
        assert attempts.read_text().splitlines() == ["raised"]
    finally:
        ray.shutdown()


def test_ray_executor_without_ray_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ExecutorError, match=r"pip install 'normprobe\[ray\]'"):
        analyze(CONFIG, out=tmp_path / "api", executor="ray")
    config = tmp_path / "small.yaml"
    config.write_text("normalizers: [layer]\ntrain: {steps: 2}\n")
    assert main(["analyze", str(config), "--out", str(tmp_path / "cli"), "--executor", "ray"]) == 2
    assert capsys.readouterr().err.strip() == f"normprobe: error: {RAY_MISSING}"
    assert not (tmp_path / "cli").exists()  # refused before any work


def test_executor_flags_are_checked_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "small.yaml"
    config.write_text("normalizers: [layer]\ntrain: {steps: 2}\n")
    out = str(tmp_path / "out")
    for flags in (["--jobs", "0"], ["--executor", "dask"], ["--jobs", "two"]):
        with pytest.raises(SystemExit) as exit_:
            main(["analyze", str(config), "--out", out, *flags])
        assert exit_.value.code == 2, flags
    assert main(["analyze", str(config), "--out", out, "--address", "auto"]) == 2
    assert "use it with executor 'ray'" in capsys.readouterr().err
    with pytest.raises(ExecutorError, match="jobs"):
        analyze(CONFIG, out=out, jobs=0)
    assert not Path(out).exists()


def test_ray_tasks_ask_for_a_gpu_when_the_device_is_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task options, checked against a stand-in for ray (no GPU needed)."""
    from normprobe.plan import RunSpec
    from normprobe.results import RunRecord

    asked: dict = {}

    class Task:
        def __init__(self, fn):
            self.fn = fn

        def options(self, **options):
            asked.update(options)
            return self

        def remote(self, spec, key, box, threads, device):
            asked.setdefault("devices", []).append(device)
            return spec

    class RayError(Exception):
        pass

    fake = types.SimpleNamespace(
        is_initialized=lambda: True,
        remote=Task,
        put=lambda value: "ref",
        wait=lambda refs, num_returns: (refs[:num_returns], refs[num_returns:]),
        get=lambda spec: RunRecord(spec.run, spec.normalizer, spec.lr, spec.seed, "done"),
        exceptions=types.SimpleNamespace(RayTaskError=RayError, RayError=RayError),
    )
    monkeypatch.setitem(sys.modules, "ray", fake)
    specs = [RunSpec("batch", 0.1, seed) for seed in range(3)]
    records: list[RunRecord] = []
    executors.run_on_ray(
        specs,
        b"",
        jobs=2,
        address=None,
        threads=4,
        device="cuda:1",
        on_record=records.append,
        log=lambda line: None,
    )
    assert [r.run for r in records] == [s.run for s in specs]
    assert asked["num_gpus"] == 1 and asked["num_cpus"] == 4
    assert asked["max_retries"] == executors.RETRIES and asked["retry_exceptions"] is False
    assert set(asked["devices"]) == {"cuda"}  # the task's own GPU, whatever the config's index
