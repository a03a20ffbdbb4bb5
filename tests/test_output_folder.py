"""The output folder: never someone else's, one writer at a time, complete runs only.

Regression tests for data loss: an empty ``output``, a folder holding other
files, two analyses on one folder, a run file deleted or truncated after
the run finished, a resume with another torch thread count; and for the
file formats (JSON without ``NaN``, modes from the umask).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from normprobe.analyze import analyze
from normprobe.config import ConfigError
from normprobe.lock import FolderLockedError, folder_lock
from normprobe.results import Results, ResultsError, json_safe, load_results

TINY = {
    "model": {"name": "mlp", "options": {"depth": 2, "width": 8}},
    "normalizers": ["layer", "batch"],
    "data": {"probe_batch": 16},
    "train": {"steps": 2, "batch_size": 16},
    "probes": {"schedule": [0, 2]},
    "hessian": {"enabled": False},
}

#: the cli_here fixture (tests/conftest.py): the CLI in this process
Cli = Callable[..., subprocess.CompletedProcess[str]]


def _cli(cli_here: Cli, args: list[str]) -> tuple[int, str]:
    result = cli_here(*args)
    return result.returncode, result.stderr


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_an_empty_output_is_refused_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_here: Cli
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results.csv").write_text("someone else's table\n")
    with pytest.raises(ConfigError, match="^output: empty"):
        analyze({**TINY, "output": ""}, quiet=True)
    code, err = _cli(cli_here, ["analyze", str(_config_file(tmp_path)), "--out", "", "--quiet"])
    assert code == 2 and err.startswith("normprobe: error: --out: empty")
    assert err.count("\n") == 1
    assert (tmp_path / "results.csv").read_text() == "someone else's table\n"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "manifest.json").exists()


def test_a_folder_with_other_files_is_not_written_to(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "results.csv").write_text("keep me\n")
    with pytest.raises(ResultsError, match="not empty and holds no normprobe results"):
        analyze(TINY, out=scratch, quiet=True)
    assert sorted(p.name for p in scratch.iterdir()) == ["results.csv"]


@pytest.mark.parametrize("command", ["analyze", "plot", "properties"])
def test_an_out_that_is_a_file_or_under_one_is_one_line(
    command: str, tmp_path: Path, cli_here: Cli
) -> None:
    config = _config_file(tmp_path)
    first = ["analyze", str(config), "--quiet"] if command == "analyze" else [command, str(tmp_path)]
    for out, expected in ((config, "is a file"), (config / "x", "lies under")):
        code, err = _cli(cli_here, [*first, "--out", str(out)])
        assert code == 2, err
        assert err.startswith("normprobe: error: --out: ") and expected in err, err
        assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_out_is_one_line(tmp_path: Path, cli_here: Cli) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = _cli(
            cli_here,
            ["analyze", str(_config_file(tmp_path)), "--out", str(locked / "r"), "--quiet"],
        )
    finally:
        locked.chmod(0o700)
    assert code == 2 and "is not writable" in err and err.count("\n") == 1


def test_a_second_writer_is_told_who_holds_the_folder(
    tmp_path: Path, cli_here: Cli
) -> None:
    out = tmp_path / "r"
    out.mkdir()
    with folder_lock(out):
        with pytest.raises(FolderLockedError, match=rf"in use by process {os.getpid()} on "):
            analyze(TINY, out=out, quiet=True)
        code, err = _cli(cli_here, ["analyze", str(_config_file(tmp_path)), "--out", str(out)])
        assert code == 2 and "is in use by process" in err and err.count("\n") == 1
        assert not (out / "runs").exists()
    results = analyze(TINY, out=out, quiet=True)  # released: the folder is usable again
    assert set(results.runs["status"]) == {"done"}


def test_a_missing_or_damaged_run_file_makes_the_run_unfinished(tmp_path: Path) -> None:
    first = analyze(TINY, out=tmp_path, quiet=True)
    rows = len(first.metrics)
    runs = sorted((tmp_path / "runs").iterdir())
    (runs[0] / "metrics.parquet").unlink()
    damaged = runs[1] / "metrics.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])

    loaded = load_results(tmp_path)  # a reader leaves the incomplete runs out, and says which
    assert set(loaded.incomplete) == {runs[0].name, runs[1].name}
    assert "metrics.parquet is missing" in loaded.incomplete[runs[0].name]
    assert "bytes" in loaded.incomplete[runs[1].name]
    assert loaded.metrics.empty

    lines: list[str] = []
    again = analyze(TINY, out=tmp_path, log=lines.append)
    said = "\n".join(lines)
    assert f"{runs[0].name}: its folder is incomplete (metrics.parquet is missing)" in said
    assert f"{runs[1].name}: its folder is incomplete" in said
    assert len(again.metrics) == rows and not again.incomplete
    pd.testing.assert_frame_equal(
        again.metrics.sort_values(list(again.metrics.columns[:9])).reset_index(drop=True),
        first.metrics.sort_values(list(first.metrics.columns[:9])).reset_index(drop=True),
    )


def test_the_thread_count_is_recorded_and_a_resume_keeps_it(tmp_path: Path) -> None:
    analyze({**TINY, "normalizers": ["layer", "batch"]}, out=tmp_path, quiet=True)
    (tmp_path / "runs" / "batch_lr0.1_seed0" / "run.json").unlink()  # one run left to do
    run_json = tmp_path / "runs" / "layer_lr0.1_seed0" / "run.json"
    status = json.loads(run_json.read_text())
    threads = json.loads((tmp_path / "manifest.json").read_text())["threads"]
    assert status["threads"] == threads
    # pretend the finished run trained with another count than this process would use
    other = threads + 1
    status["threads"] = other
    run_json.write_text(json.dumps(status))
    lines: list[str] = []
    # train.threads unset (as with --jobs changing between tries): pinned to the record
    results = analyze({**TINY, "normalizers": ["layer", "batch"]}, out=tmp_path, log=lines.append)
    assert f"resuming with {other} torch thread(s)" in "\n".join(lines)
    assert json.loads((tmp_path / "manifest.json").read_text())["threads"] == other
    assert set(results.runs["threads"]) == {other}
    # runs trained with different counts cannot be resumed consistently: refused
    status["threads"] = other + 1
    run_json.write_text(json.dumps(status))
    with pytest.raises(ConfigError, match=rf"different torch thread counts \({other}, {other + 1}\)"):
        analyze({**TINY, "normalizers": ["layer", "batch"]}, out=tmp_path, quiet=True)


def test_json_files_hold_null_not_nan(tmp_path: Path) -> None:
    assert json_safe([float("nan"), float("-inf"), 1.5, {"x": float("inf")}]) == [
        None,
        None,
        1.5,
        {"x": None},
    ]
    runs = pd.DataFrame({"run": ["a"], "status": ["diverged"], "final_test_acc": [float("nan")]})
    Results(tmp_path, pd.DataFrame(), runs, pd.DataFrame(), pd.DataFrame(), {}).save_tables()

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    line = (tmp_path / "runs.jsonl").read_text().splitlines()[0]
    assert json.loads(line, parse_constant=refuse)["final_test_acc"] is None


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_mode_the_umask_gives(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        analyze({**TINY, "normalizers": ["layer"]}, out=tmp_path / "r", quiet=True)
    finally:
        os.umask(old)
    out = tmp_path / "r"
    run = next((out / "runs").iterdir())
    for path in (out / "manifest.json", out / "results.parquet", out / "results.csv",
                 run / "run.json", run / "metrics.parquet"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert stat.S_IMODE(run.stat().st_mode) == 0o777 & ~umask
