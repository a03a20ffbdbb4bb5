"""``threads: auto``: the rule, the config field, the runs that record it and resume with it,
and the library calls that must leave torch's thread count as they found it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from normprobe import analyze, build_model, hessian_spectrum
from normprobe.config import ConfigError, config_hash, parse_config
from normprobe.threads import (
    PARAMETERS_PER_THREAD,
    ThreadsError,
    auto_threads,
    check_threads,
    machine_cores,
    resolve_threads,
    torch_threads,
)

TINY = {
    "name": "threads",
    "model": {"name": "mlp", "options": {"depth": 2, "width": 16}},
    "normalizers": ["batch", "layer"],
    "data": {"name": "digits", "probe_batch": 32, "hessian_samples": 64},
    "train": {"steps": 6, "batch_size": 32, "lr": 0.05, "eval_batch_size": 64},
    "probes": {"schedule": [0, 6]},
    "hessian": {
        "schedule": [6],
        "pieces": ["top", "trace"],
        "lanczos_steps": 8,
        "start_vectors": 1,
        "top_k": 2,
        "trace_samples": 2,
        "chunk_size": 32,
    },
}


def test_the_rule_depends_on_size_cores_and_jobs_only() -> None:
    # the same answer every time: nothing else goes in
    assert {auto_threads(3_000_000, 8, 2) for _ in range(5)} == {3}
    # small models: 1 thread, whatever the machine
    for cores in (1, 2, 4, 64):
        assert auto_threads(0, cores) == 1
        assert auto_threads(PARAMETERS_PER_THREAD - 1, cores) == 1
    # 1 or 2 cores: 1 thread, serially or with 2 jobs, so both give the same numbers
    for parameters in (10, 126_218, 10**9):
        assert auto_threads(parameters, 2) == auto_threads(parameters, 2, jobs=2) == 1
        assert auto_threads(parameters, 1) == 1
    # one thread per PARAMETERS_PER_THREAD, at most the cores but one, shared among the jobs
    assert auto_threads(2 * PARAMETERS_PER_THREAD, 16) == 2
    assert auto_threads(10**9, 16) == 15
    assert [auto_threads(10**9, 16, jobs) for jobs in (1, 2, 3, 4, 8, 15, 16, 40)] == [
        15,
        7,
        5,
        3,
        1,
        1,
        1,
        1,
    ]
    assert auto_threads(10**9, 3) == 2 and auto_threads(10**9, 3, jobs=2) == 1
    assert auto_threads(10**9) == max(1, machine_cores() - 1)
    for bad in ({"parameters": -1}, {"cores": 0}, {"jobs": 0}, {"jobs": True}, {"cores": 2.0}):
        kwargs = {"parameters": 10, "cores": 4, "jobs": 1, **bad}
        with pytest.raises(ThreadsError, match=next(iter(bad))):
            auto_threads(**kwargs)


def test_resolve_and_check_threads() -> None:
    model = build_model("mlp", "batch", seed=0, depth=2, width=16)
    assert resolve_threads(None, model) is None
    assert resolve_threads(3, model) == 3
    assert resolve_threads("auto", model, cores=64) == 1
    assert resolve_threads("auto", 10**9, cores=5, jobs=2) == 2
    for bad in (0, -1, "many", 1.5, True):
        with pytest.raises(ThreadsError, match=r"^hessian_spectrum: threads: give a positive"):
            check_threads(bad, "hessian_spectrum: threads")


def test_torch_threads_restores_the_count_even_on_error() -> None:
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(other):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_auto_is_the_default_and_keeps_the_hash() -> None:
    unset = parse_config({"normalizers": ["batch"]})
    assert unset.train.threads == "auto"
    for same in (None, "auto"):
        cfg = parse_config({"normalizers": ["batch"], "train": {"threads": same}})
        assert cfg.train.threads == "auto" and config_hash(cfg) == config_hash(unset)
    two = parse_config({"normalizers": ["batch"], "train": {"threads": 2}})
    assert two.train.threads == 2 and config_hash(two) != config_hash(unset)
    for bad in (0, "many", 1.5, True):
        with pytest.raises(ConfigError, match=r"train\.threads: give a positive number"):
            parse_config({"normalizers": ["batch"], "train": {"threads": bad}})


def test_auto_records_its_count_and_a_resume_keeps_it(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    results = analyze(TINY, out=tmp_path, quiet=True)
    assert torch.get_num_threads() == before
    sizes = [
        sum(p.numel() for p in build_model("mlp", n, seed=0, depth=2, width=16).parameters())
        for n in ("batch", "layer")
    ]
    chosen = auto_threads(max(sizes))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["threads"] == chosen == 1  # a small model: 1 thread on any machine
    assert manifest["config"]["train"]["threads"] == "auto"
    assert set(results.runs["threads"]) == {chosen}
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert {json.loads(line)["threads"] for line in lines} == {chosen}

    # the finished runs trained with another count (say, another machine): auto resumes
    # with the recorded count rather than mixing two
    (tmp_path / "runs" / "layer_lr0.05_seed0" / "run.json").unlink()
    run_json = tmp_path / "runs" / "batch_lr0.05_seed0" / "run.json"
    status = json.loads(run_json.read_text())
    status["threads"] = 2
    run_json.write_text(json.dumps(status))
    said: list[str] = []
    again = analyze(TINY, out=tmp_path, log=said.append)
    assert "resuming with 2 torch thread(s)" in "\n".join(said)
    assert set(again.runs["threads"]) == {2}
    assert torch.get_num_threads() == before
    # a number that contradicts the record is refused, naming the argument
    with pytest.raises(ConfigError, match=r"^threads: 3, but the finished runs"):
        analyze(TINY, out=tmp_path, quiet=True, threads=3)
    with pytest.raises(ThreadsError, match=r"^threads: give a positive number"):
        analyze(TINY, out=tmp_path, quiet=True, threads=0)
    # the threads argument does not change the config hash: the folder resumes with it
    analyze(TINY, out=tmp_path, quiet=True, threads=2)


def test_serial_and_two_jobs_give_identical_tables_under_auto(tmp_path: Path) -> None:
    # without train.threads: serial and --jobs 2 both use auto's count, so the same numbers
    serial = analyze(TINY, out=tmp_path / "serial", quiet=True)
    jobs = analyze(TINY, out=tmp_path / "jobs", quiet=True, jobs=2)
    assert serial.manifest["threads"] == jobs.manifest["threads"] == 1
    for table in ("metrics", "hessian_nodes", "hessian_density"):
        pd.testing.assert_frame_equal(
            getattr(serial, table), getattr(jobs, table), check_exact=True
        )
    timings = ["seconds", "measure_seconds"]
    pd.testing.assert_frame_equal(
        serial.runs.drop(columns=timings), jobs.runs.drop(columns=timings), check_exact=True
    )
    assert "eigenvalue" in set(serial.metrics["metric"])


def test_library_calls_leave_torch_threads_as_they_were() -> None:
    from normprobe import Monitor, gradient_correlation, gradient_norms, representation_correlation

    torch.manual_seed(1)  # not the probes' noise seed 0: x would be their noise
    model = build_model("mlp", "batch", seed=0, depth=2, width=16, input_shape=(8,), num_classes=3)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    representation_correlation(model, x)
    assert torch.get_num_threads() == before
    gradient_correlation(model, F.cross_entropy, (x[:16], y[:16]), (x[16:], y[16:]))
    assert torch.get_num_threads() == before
    gradient_norms(model, F.cross_entropy, (x, y))
    assert torch.get_num_threads() == before
    hessian = {"pieces": ["top", "trace"], "lanczos_steps": 8, "trace_samples": 2, "top_k": 2}
    monitor = Monitor(model, F.cross_entropy, (x, y), hessian=hessian, schedule=[0])
    monitor.step(0)
    assert "eigenvalue" in set(monitor.results.metrics["metric"])
    assert torch.get_num_threads() == before
    tops = []
    for threads in (None, "auto", other):
        spectrum = hessian_spectrum(
            model, F.cross_entropy, (x, y), what="top", k=2, n_samples=None, threads=threads
        )
        assert torch.get_num_threads() == before
        tops.append(spectrum.top_eigenvalues)
    for top in tops[1:]:  # float32 products: the thread count may move the last digits
        assert list(top) == pytest.approx(list(tops[0]), rel=1e-5)
    with pytest.raises(ThreadsError, match=r"^threads: give a positive number"):
        hessian_spectrum(model, F.cross_entropy, (x, y), what="top", k=2, threads=0)
    assert torch.get_num_threads() == before


def test_the_threads_argument_sets_the_runs_count_without_changing_the_hash(
    tmp_path: Path,
) -> None:
    plain = analyze(TINY, out=tmp_path / "auto", quiet=True)
    two = analyze(TINY, out=tmp_path / "two", quiet=True, threads=2)
    assert two.manifest["threads"] == 2 and set(two.runs["threads"]) == {2}
    assert two.manifest["config_hash"] == plain.manifest["config_hash"]
    assert two.manifest["config"]["train"]["threads"] == "auto"


def test_figures_refuse_a_bad_thread_count_before_running() -> None:
    from normprobe.errors import NormprobeError
    from normprobe.figureset import regenerate

    with pytest.raises(NormprobeError, match=r"^--threads: give a positive number"):
        regenerate(threads=0, analyses=Path(__file__).resolve().parents[1] / "analyses")


def test_analyze_takes_threads_on_the_command_line_and_a_resume_keeps_the_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from normprobe.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = str(tmp_path / "out")
    assert main(["analyze", str(config), "--out", out, "--quiet", "--threads", "2"]) == 0
    runs = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert {r["threads"] for r in runs} == {2}
    capsys.readouterr()
    assert main(["analyze", str(config), "--out", out, "--quiet", "--threads", "1"]) == 2
    assert "trained with 2 torch thread(s)" in capsys.readouterr().err
    assert main(["analyze", str(config), "--out", out, "--quiet"]) == 0  # auto resumes with 2
