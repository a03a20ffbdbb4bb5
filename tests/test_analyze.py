"""The analysis grid: results tables, resume after SIGKILL, determinism, divergence, failures."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch

import normprobe
from normprobe.analyze import analyze
from normprobe.config import ConfigError, load_config
from normprobe.plan import plan_runs, prepare_data
from normprobe.results import load_results
from normprobe.run import run_one

SMALL = {
    "model": {"name": "mlp", "options": {"depth": 3, "width": 32}},
    "normalizers": ["batch", "layer", "regnorm"],
    "data": {"probe_batch": 32, "hessian_samples": 64},
    "train": {"steps": 12, "batch_size": 32, "lr": 0.05},
    "probes": {"schedule": [0, 6, 12]},
    "hessian": {"schedule": [0, 12], "lanczos_steps": 12, "chunk_size": 32},
}


def _metrics(directory: Path) -> pd.DataFrame:
    return pd.read_parquet(directory / "results.parquet")


def _user_package(tmp_path: Path, monkeypatch, name: str, nets: str) -> None:
    """A package ``name`` on the path whose module ``nets`` holds ``nets`` (dedented source),
    as a user's own factories would be."""
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(nets))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_results_tables_have_the_promised_columns(tmp_path: Path) -> None:
    results = analyze(SMALL, out=tmp_path, quiet=True)
    for column in ("run", "normalizer", "lr", "seed", "step", "layer", "depth", "metric", "value"):
        assert column in results.metrics.columns
    metrics = set(results.metrics["metric"])
    assert {"train_loss", "train_acc", "test_loss", "test_acc", "batch_loss"} <= metrics
    assert {"grad_norm", "grad_corr", "grad_growth_rate"} <= metrics
    assert len(results.hessian_nodes) and len(results.hessian_density)
    assert set(results.runs["status"]) == {"done"}
    # files on disk: parquet, csv, manifest, one line per run
    for name in (
        "results.parquet",
        "results.csv",
        "manifest.json",
        "runs.jsonl",
        "hessian_nodes.parquet",
        "hessian_density.parquet",
    ):
        assert (tmp_path / name).exists(), name
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["normalizers"] == ["batch", "layer", "regnorm"]
    assert manifest["versions"]["torch"].startswith("2.13")
    assert len(manifest["config_hash"]) == 16 and manifest["normprobe_version"]
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["seconds"] > 0 for line in lines)
    loaded = load_results(tmp_path)
    pd.testing.assert_frame_equal(loaded.metrics, results.metrics)
    csv = pd.read_csv(tmp_path / "results.csv")
    assert len(csv) == len(results.metrics)


def test_same_run_same_results_bit_for_bit() -> None:
    """One run (BatchNorm: running statistics, the Hessian in train mode) twice, from freshly
    prepared data: the same tables to the bit. That the runs of a grid do not depend on each
    other is what the executor tests show (each run alone in a worker process gives the
    in-process grid's tables)."""
    config, _ = load_config(SMALL)
    spec = plan_runs(config, ["batch"])[0]
    a = run_one(spec, prepare_data(config))
    b = run_one(spec, prepare_data(config))
    assert a.status == b.status == "done"
    a_metrics, b_metrics = a.tables["metrics"], b.tables["metrics"]
    pd.testing.assert_frame_equal(a_metrics, b_metrics, check_exact=True)
    a_nodes, b_nodes = a.tables["hessian_nodes"], b.tables["hessian_nodes"]
    pd.testing.assert_frame_equal(a_nodes, b_nodes, check_exact=True)


def test_probes_do_not_change_the_training_trajectory(tmp_path: Path) -> None:
    quiet = {
        **SMALL,
        "probes": {"representation": False, "gradient_correlation": False, "gradient_norms": False},
        "hessian": {"enabled": False},
    }
    with_probes = analyze(SMALL, out=tmp_path / "on", quiet=True).metric("batch_loss")
    without = analyze(quiet, out=tmp_path / "off", quiet=True).metric("batch_loss")
    assert len(with_probes) == 3 * 12
    assert with_probes["value"].tolist() == without["value"].tolist()


def test_label_sampler_and_batch_stats_evaluation_in_an_analysis(tmp_path: Path) -> None:
    config = {
        **SMALL,
        "normalizers": ["batch", "layer"],
        "probes": {"schedule": [0, 12], "gradient_correlation": False},
        "hessian": {"enabled": False},
        "train": {
            **SMALL["train"],
            "sampler": {"kind": "labels", "labels_per_batch": 4, "per_label": 8},
            "eval_batch_stats": {"enabled": True, "batch_size": 2},
        },
    }
    a = analyze(config, out=tmp_path / "a", quiet=True)
    b = analyze(config, out=tmp_path / "b", quiet=True)
    pd.testing.assert_frame_equal(a.metrics, b.metrics, check_exact=True)
    m = a.metrics
    new = ["test_acc_batchstats", "test_loss_batchstats", "train_acc_batchstats"]
    for metric in new:
        assert sorted(m[m["metric"] == metric]["step"]) == [0, 0, 12, 12], metric

    def final(norm: str, metric: str) -> float:
        rows = m[(m["normalizer"] == norm) & (m["metric"] == metric) & (m["step"] == 12)]
        return float(rows["value"].iloc[0])

    # BatchNorm on test batches of 2 is far from its running statistics; LayerNorm has none
    assert final("batch", "test_loss_batchstats") > final("batch", "test_loss") + 0.05
    assert final("layer", "test_acc_batchstats") == final("layer", "test_acc")
    assert final("layer", "test_loss_batchstats") == pytest.approx(final("layer", "test_loss"))

    # the extra evaluation changes neither the trajectory nor the other metrics
    plain = {**config, "train": {**config["train"], "eval_batch_stats": False}}
    c = analyze(plain, out=tmp_path / "c", quiet=True).metrics
    kept = m[~m["metric"].isin([*new, "train_loss_batchstats"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(
        kept.drop(columns="selected"), c.drop(columns="selected"), check_exact=True
    )
    # the label sampler trains on other batches than the i.i.d. one
    iid = {**plain, "train": {**plain["train"], "sampler": "iid"}}
    d = analyze(iid, out=tmp_path / "d", quiet=True).metric("batch_loss")
    assert d["value"].tolist() != c[c["metric"] == "batch_loss"]["value"].tolist()


def test_learning_rate_grid_marks_the_best_rate_per_normalizer(tmp_path: Path) -> None:
    config = {
        **SMALL,
        "normalizers": ["batch", "layer"],
        "probes": {"gradient_norms": False},
        "hessian": {"enabled": False},
        "train": {**SMALL["train"], "lr": [0.01, 0.1], "seeds": [0, 1]},
    }
    results = analyze(config, out=tmp_path, quiet=True)
    runs = results.runs
    assert len(runs) == 2 * 2 * 2
    for norm, group in runs.groupby("normalizer"):
        best = group.groupby("lr")["final_test_acc"].mean().idxmax()
        assert set(group[group["selected"]]["lr"]) == {best}, norm
    selected = results.metric("test_acc", selected_only=True)
    assert set(selected["lr"]) <= {0.01, 0.1} and len(selected) < len(results.metric("test_acc"))


def test_divergence_ends_that_run_only(tmp_path: Path) -> None:
    config = {
        **SMALL,
        "normalizers": ["none", "batch"],
        "hessian": {"enabled": False},
        "train": {**SMALL["train"], "lr": {"none": 1e6, "batch": 0.05}},
    }
    results = analyze(config, out=tmp_path, quiet=True)
    status = dict(zip(results.runs["normalizer"], results.runs["status"], strict=True))
    assert status == {"none": "diverged", "batch": "done"}
    row = results.runs[results.runs["normalizer"] == "none"].iloc[0]
    assert 0 <= row["diverged_step"] < 12


def test_a_failing_run_is_recorded_and_the_others_go_on(tmp_path: Path, monkeypatch) -> None:
    import normprobe.training as training

    real = training.training_loss

    def broken(model, output, target, lam):
        if any(isinstance(m, normprobe.norms.LayerNorm) for m in model.modules()):
            raise RuntimeError("simulated bug")
        return real(model, output, target, lam)

    monkeypatch.setattr(training, "training_loss", broken)
    config = {**SMALL, "normalizers": ["batch", "layer"], "hessian": {"enabled": False}}
    results = analyze(config, out=tmp_path, quiet=True)
    status = dict(zip(results.runs["normalizer"], results.runs["status"], strict=True))
    assert status == {"batch": "done", "layer": "failed"}
    assert "simulated bug" in results.runs.set_index("normalizer").loc["layer", "error"]


@pytest.mark.filterwarnings("ignore::normprobe.norms.balanced.BalancedInputWarning")
def test_all_normalizers_skip_the_ones_the_model_cannot_take(tmp_path: Path) -> None:
    config = {
        **SMALL,
        "normalizers": "all",
        "probes": {"schedule": [0]},
        "hessian": {"enabled": False},
        "train": {**SMALL["train"], "steps": 2},
    }
    lines: list[str] = []
    results = analyze(config, out=tmp_path, log=lines.append)
    assert "instance" not in set(results.runs["normalizer"])
    assert set(results.runs["normalizer"]) == set(normprobe.normalizers()) - {"instance"}
    assert any(line.startswith("skipping instance:") for line in lines)
    assert "instance" in results.manifest["skipped"]


def test_hessian_pieces_can_be_chosen(tmp_path: Path) -> None:
    config = {
        **SMALL,
        "normalizers": ["layer"],
        "probes": {"schedule": [0]},
        "hessian": {**SMALL["hessian"], "pieces": ["top"], "top_k": 3},
    }
    results = analyze(config, out=tmp_path, quiet=True)
    hessian = results.metrics[results.metrics["lanczos_steps"].notna()]
    assert set(hessian["metric"]) == {"eigenvalue", "outlier_ratio", "weight_norm"}
    assert len(results.hessian_nodes) == 0 and len(results.hessian_density) == 0
    assert not (tmp_path / "hessian_nodes.parquet").exists()
    with pytest.raises(ConfigError, match="hessian.pieces"):
        analyze({**config, "hessian": {"pieces": ["spectrum"]}}, out=tmp_path / "x", quiet=True)


def test_threads_setting_applies_during_the_analysis_only(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    config = {**SMALL, "normalizers": ["layer"], "hessian": {"enabled": False}}
    config["train"] = {**SMALL["train"], "steps": 2, "threads": 1}
    config["probes"] = {"schedule": [0, 2]}  # steps past train.steps are an error
    results = analyze(config, out=tmp_path, quiet=True)
    assert results.manifest["threads"] == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="train.threads"):
        analyze({**config, "train": {"threads": 0}}, out=tmp_path / "x", quiet=True)


def test_resume_skips_finished_runs_and_force_redoes_them(tmp_path: Path) -> None:
    config = {**SMALL, "hessian": {"enabled": False}}
    analyze(config, out=tmp_path, quiet=True)
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").iterdir()}
    lines: list[str] = []
    analyze(config, out=tmp_path, log=lines.append)
    assert lines == []  # nothing left to do
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").iterdir()} == stamp
    analyze(config, out=tmp_path, force=True, log=lines.append)
    assert len([line for line in lines if ": done" in line]) == 3


def test_a_different_config_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    config = {**SMALL, "hessian": {"enabled": False}, "normalizers": ["batch"]}
    analyze(config, out=tmp_path, quiet=True)
    changed = {**config, "train": {**SMALL["train"], "steps": 5}, "probes": {"schedule": [0, 5]}}
    with pytest.raises(ConfigError, match="holds results of a different config.*--force") as err:
        analyze(changed, out=tmp_path, quiet=True)
    # which fields differ, and what --force would delete
    assert "changed: train.steps 12 -> 5, probes.schedule" in str(err.value)
    runs = len(list((tmp_path / "runs").iterdir()))
    assert f"(the {runs} run folder{'' if runs == 1 else 's'} there move to" in str(err.value)
    assert "/.replaced' and stay there until the new analysis has finished)" in str(err.value)


#: A two-run analysis of a few steps, for the tests of --force
QUICK = {
    **SMALL,
    "normalizers": ["layer", "batch"],
    "train": {**SMALL["train"], "steps": 2},
    "probes": {"schedule": [0, 2]},
    "hessian": {"enabled": False},
}


def _stop_at_run(monkeypatch, number: int, error: BaseException) -> None:
    """Make the analysis stop with ``error`` when its run number ``number`` (from 1) starts."""
    analyze_module = sys.modules["normprobe.analyze"]  # the package's `analyze` is the function
    real = analyze_module.run_one
    started = []

    def stopping(spec, data, **kwargs):
        started.append(spec.run)
        if len(started) == number:
            raise error
        return real(spec, data, **kwargs)

    monkeypatch.setattr(analyze_module, "run_one", stopping)


def test_an_interrupted_force_keeps_the_results_it_replaces(tmp_path: Path, monkeypatch) -> None:
    old = analyze(QUICK, out=tmp_path, quiet=True)
    new = {**QUICK, "train": {**QUICK["train"], "lr": 0.1}}  # runs named ..._lr0.1_...
    # Ctrl-C in the second run of the new analysis
    _stop_at_run(monkeypatch, 2, KeyboardInterrupt())
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        analyze(new, out=tmp_path, force=True, log=lines.append)
    # the old results are whole, and readable as a results folder of their own
    kept = load_results(tmp_path / ".replaced")
    pd.testing.assert_frame_equal(kept.metrics, old.metrics, check_exact=True)
    assert kept.manifest["config_hash"] == old.manifest["config_hash"]
    # the folder itself holds the new analysis so far, and none of the old runs
    partial = load_results(tmp_path)
    assert partial.manifest["config"]["train"]["lr"] == 0.1
    assert list(partial.runs["run"]) == ["layer_lr0.1_seed0"]
    assert set(_metrics(tmp_path)["run"]) == {"layer_lr0.1_seed0"}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["layer_lr0.1_seed0"]
    assert any(
        line.startswith("--force: the earlier results (2 run folders) are moved to")
        and line.endswith(".replaced and deleted once this analysis has finished")
        for line in lines
    )
    assert any(
        line.startswith("interrupted: the results this analysis replaces stay in") for line in lines
    )
    # another config without --force is refused, and told where the old results are
    other = {**QUICK, "train": {**QUICK["train"], "lr": 0.2}}
    with pytest.raises(ConfigError, match=r"unfinished results of an interrupted --force") as err:
        analyze(other, out=tmp_path, quiet=True)
    assert "replacing the 2 run folders in" in str(err.value) and ".replaced'" in str(err.value)
    # a second --force, stopped by an error in its first run: the oldest complete results stay,
    # the unfinished runs of the first --force are gone
    _stop_at_run(monkeypatch, 1, RuntimeError("disk full"))
    lines.clear()
    with pytest.raises(RuntimeError, match="disk full"):
        analyze(other, out=tmp_path, force=True, log=lines.append)
    assert lines[0].startswith("an earlier --force was interrupted: deleting the 1 run folder")
    assert "the 2 run folders it was replacing stay in" in lines[0]
    pd.testing.assert_frame_equal(
        load_results(tmp_path / ".replaced").metrics, old.metrics, check_exact=True
    )
    assert load_results(tmp_path).runs.empty and not (tmp_path / "runs").exists()
    # resumed without --force, the new analysis finishes, and only then the old results go
    monkeypatch.undo()
    lines.clear()
    done = analyze(other, out=tmp_path, log=lines.append)
    assert lines[0].startswith("resuming the analysis of an interrupted --force")
    assert not (tmp_path / ".replaced").exists() and not (tmp_path / ".replaced.tmp").exists()
    assert sorted(done.runs["run"]) == ["batch_lr0.2_seed0", "layer_lr0.2_seed0"]
    assert set(done.runs["status"]) == {"done"}
    assert set(_metrics(tmp_path)["run"]) == set(done.runs["run"])


def test_a_finished_force_leaves_only_the_new_results(tmp_path: Path) -> None:
    analyze(QUICK, out=tmp_path, quiet=True)
    new = {**QUICK, "train": {**QUICK["train"], "lr": 0.1}}
    lines: list[str] = []
    results = analyze(new, out=tmp_path, force=True, log=lines.append)
    assert "--force: the earlier results (2 run folders) are moved to" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".replac")) == []
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "batch_lr0.1_seed0",
        "layer_lr0.1_seed0",
    ]
    loaded = load_results(tmp_path)
    assert set(loaded.metrics["lr"]) == {0.1} and set(loaded.runs["lr"]) == {0.1}
    assert loaded.manifest["config_hash"] == results.manifest["config_hash"]
    assert loaded.manifest["finished"]


def test_a_force_cut_short_while_moving_the_old_results_puts_them_back(tmp_path: Path) -> None:
    old = analyze(QUICK, out=tmp_path, quiet=True)
    # killed half way through the move: runs/ and the tables set aside, the manifest not yet
    (tmp_path / ".replacing").mkdir()
    for name in ("runs", "results.parquet", "results.csv", "runs.jsonl"):
        (tmp_path / name).rename(tmp_path / ".replacing" / name)
    lines: list[str] = []
    again = analyze(QUICK, out=tmp_path, log=lines.append)
    assert lines == []  # every run was there: nothing to do
    assert not (tmp_path / ".replacing").exists()
    pd.testing.assert_frame_equal(again.metrics, old.metrics, check_exact=True)
    # and the same with the manifest set aside too: the folder is still taken for results
    (tmp_path / ".replacing").mkdir()
    for name in ("runs", "results.parquet", "results.csv", "runs.jsonl", "manifest.json"):
        (tmp_path / name).rename(tmp_path / ".replacing" / name)
    other = {**QUICK, "train": {**QUICK["train"], "lr": 0.1}}
    with pytest.raises(ConfigError, match="holds results of a different config"):
        analyze(other, out=tmp_path, quiet=True)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(old.runs["run"])


KILL_CONFIG = """\
model: {name: mlp, options: {depth: 4, width: 64}}
normalizers: [none, batch, layer, bmlv, prelayer, regnorm]
data: {probe_batch: 64}
train: {steps: 150, batch_size: 64, lr: 0.05}
probes: {schedule: {every: 10}}
hessian: {enabled: false}
"""


@pytest.mark.slow
def test_sigkill_loses_only_the_run_in_progress_and_resume_completes(tmp_path: Path) -> None:
    cfg = tmp_path / "kill.yaml"
    cfg.write_text(textwrap.dedent(KILL_CONFIG))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "normprobe", "analyze", str(cfg), "--out", str(out), "--quiet"]
    # the uninterrupted analysis to compare with runs meanwhile, in a process of its own (one
    # torch thread each under threads: auto on two cores)
    clean = tmp_path / "clean"
    with open(tmp_path / "clean.err", "w") as clean_err:
        reference = subprocess.Popen(
            [*command[:-3], "--out", str(clean), "--quiet"],
            stdout=subprocess.DEVNULL,
            stderr=clean_err,
        )
    try:
        _kill_and_resume(command, out)
        reference.wait(timeout=600)
    finally:
        if reference.poll() is None:
            reference.kill()
    assert reference.returncode == 0, (tmp_path / "clean.err").read_text()
    # the interrupted-and-resumed analysis equals an uninterrupted one, bit for bit
    pd.testing.assert_frame_equal(_metrics(out), _metrics(clean), check_exact=True)


def _kill_and_resume(command: list[str], out: Path) -> None:
    """Run ``command``, SIGKILL it once two of its six runs are done, check what survived,
    and run it again to the end."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = out / "runs"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            finished = [p for p in runs.glob("*/run.json")] if runs.exists() else []
            if len(finished) >= 2:
                break
            if proc.poll() is not None:
                pytest.fail(f"analyze ended before it could be killed: {proc.stderr.read()}")
            time.sleep(0.05)
        else:
            pytest.fail("no run finished within the time limit")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    survivors = {p.name: p.stat().st_mtime_ns for p in runs.iterdir() if not p.name.startswith(".")}
    assert 2 <= len(survivors) < 6
    for name in survivors:  # every visible run folder is complete
        status = json.loads((runs / name / "run.json").read_text())
        assert status["status"] == "done"
        assert (runs / name / "metrics.parquet").exists()

    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    after = {p.name: p.stat().st_mtime_ns for p in runs.iterdir() if not p.name.startswith(".")}
    assert len(after) == 6
    assert {k: after[k] for k in survivors} == survivors  # finished runs were not redone
    assert not [p for p in runs.iterdir() if p.name.startswith(".")]  # temporaries cleaned


def test_cli_analyze_prints_a_summary_and_writes_results(
    tmp_path: Path, cli_here: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    cfg = tmp_path / "small.yaml"
    cfg.write_text(
        "model: {name: mlp, options: {depth: 2, width: 16}}\nnormalizers: [layer]\n"
        "train: {steps: 3, batch_size: 16}\nhessian: {enabled: false}\n"
        "probes: {schedule: [0, 3]}\n"
    )
    result = cli_here("analyze", str(cfg), "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    header, row, selected_by, single, last = result.stdout.strip().splitlines()
    assert selected_by == "learning rates selected on test_acc (final value, mean over seeds)"
    assert single.startswith("not settled: one learning rate, nothing selected it: layer")
    assert header.split() == [
        "normalizer",
        "lr",
        "seed",
        "status",
        "test_acc",
        "repr_corr",
        "grad_corr",
        "growth",
        "lambda_1",
        "lambda_1_step",
    ]
    assert row.split()[:4] == ["layer", "0.1", "0", "done"]
    assert row.split()[-2:] == ["-", "-"]  # the Hessian was off
    assert last == f"1 runs: 1 done; results in {tmp_path / 'o'}"
    assert "[1/1] layer_lr0.1_seed0: done" in result.stderr  # one line per finished run
    assert (tmp_path / "o" / "results.parquet").exists()


def test_user_factory_and_norm_swapping(tmp_path: Path, monkeypatch) -> None:
    _user_package(
        tmp_path,
        monkeypatch,
        "userpkg",
        """\
        import torch.nn as nn
        import normprobe

        def with_norm(norm, width=16):
            return nn.Sequential(
                nn.Flatten(),
                normprobe.build_norm(norm, nn.Linear(64, width), nn.ReLU()),
                nn.Linear(width, 10),
            )

        def torch_bn(width=16):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.BatchNorm1d(width),
                                 nn.ReLU(), nn.Linear(width, 10))
        """,
    )
    base = {**SMALL, "hessian": {"enabled": False}, "normalizers": ["prelayer", "layer"]}
    results = analyze(
        {**base, "model": {"factory": "userpkg.nets:with_norm", "options": {"width": 8}}},
        out=tmp_path / "factory",
        quiet=True,
    )
    assert set(results.runs["status"]) == {"done"}
    swapped = analyze(
        {
            **base,
            "normalizers": ["layer", "bmlv"],
            "model": {"factory": "userpkg.nets:torch_bn", "swap_norms": True},
        },
        out=tmp_path / "swap",
        quiet=True,
    )
    assert set(swapped.runs["status"]) == {"done"}
    with pytest.raises(ConfigError, match="'prelayer' needs the affine op's input or weight"):
        analyze(
            {**base, "model": {"factory": "userpkg.nets:torch_bn", "swap_norms": True}},
            out=tmp_path / "bad",
            quiet=True,
        )


def test_a_factory_s_output_width_and_its_use_of_norm_are_checked_before_any_run(
    tmp_path: Path, monkeypatch
) -> None:
    """More scores than the data has classes trained without an error (scored over classes
    that never occur), fewer failed every run at its first loss; a factory that ignores its
    norm argument gave runs labelled as two normalizers with the same numbers."""
    _user_package(
        tmp_path,
        monkeypatch,
        "widepkg",
        """\
        import torch.nn as nn

        def scores(norm, k=10):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, k))
        """,
    )
    base = {**SMALL, "hessian": {"enabled": False}, "normalizers": ["batch", "layer"]}
    for k in (12, 7):
        model = {"factory": "widepkg.nets:scores", "options": {"k": k}}
        with pytest.raises(ConfigError, match=rf"outputs {k} scores per example, but dataset "
                           r"'digits' has 10 classes"):  # fmt: skip
            analyze({**base, "model": model}, out=tmp_path / f"k{k}", quiet=True)
        assert not (tmp_path / f"k{k}" / "runs").exists()
    with pytest.warns(UserWarning, match=r"built the same model for normalizers 'batch' and "
                      r"'layer'.*Does the factory use its norm argument"):  # fmt: skip
        results = analyze(
            {**base, "model": {"factory": "widepkg.nets:scores"}}, out=tmp_path / "same",
            quiet=True,
        )  # fmt: skip
    assert set(results.runs["status"]) == {"done"}


def test_a_factory_model_s_dropout_draws_from_the_run_s_seed(tmp_path: Path, monkeypatch) -> None:
    """A factory model with dropout trained on torch's global generator, which torch seeds at
    random in every process: the same analysis gave other numbers each time (test accuracy
    0.958, then 0.964). Each run now draws from its own seed, whatever ran before it, and
    leaves the caller's random stream alone."""
    _user_package(
        tmp_path,
        monkeypatch,
        "droppkg",
        """\
        import torch.nn as nn

        def net(norm):
            return nn.Sequential(
                nn.Flatten(), nn.Linear(64, 32), nn.LayerNorm(32), nn.ReLU(), nn.Dropout(0.3),
                nn.Linear(32, 10),
            )
        """,
    )
    config = {**SMALL, "hessian": {"enabled": False}, "normalizers": ["none"]}
    config["model"] = {"factory": "droppkg.nets:net"}
    config["train"] = {**SMALL["train"], "seeds": [0, 1]}
    tables = []
    for before in (1, 2):  # two processes' states
        torch.manual_seed(before)
        stream = torch.random.get_rng_state()
        analyze(config, out=tmp_path / str(before), quiet=True)
        assert torch.equal(torch.random.get_rng_state(), stream)  # the caller's stream, untouched
        tables.append(_metrics(tmp_path / str(before)))
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=True)
    loss = tables[0].query("metric == 'train_loss' and step == 12").set_index("seed")["value"]
    assert loss[0] != loss[1]  # each run its own seed


def test_a_lazy_factory_is_made_and_a_scripted_one_refused(tmp_path: Path, monkeypatch) -> None:
    """A factory with nn.LazyLinear failed in the preflight (an uninitialized parameter's numel)
    and one returning TorchScript trained and then failed every run: the lazy one's parameters
    are now made from the run's seed by one forward pass on training examples (the same
    weights, bit for bit, as the eager model that draws them in that order), and the scripted
    one is refused before any run."""
    _user_package(
        tmp_path,
        monkeypatch,
        "lazypkg",
        """\
        import torch
        import torch.nn as nn

        def lazy(norm):
            first, head = nn.LazyLinear(16), nn.Linear(16, 10)  # first drawn when made
            return nn.Sequential(nn.Flatten(), first, nn.LayerNorm(16), nn.ReLU(), head)

        def eager(norm):
            head = nn.Linear(16, 10)
            first = nn.Linear(64, 16)
            return nn.Sequential(nn.Flatten(), first, nn.LayerNorm(16), nn.ReLU(), head)

        def scripted(norm):
            return torch.jit.script(eager(norm))
        """,
    )
    base = {**SMALL, "hessian": {"enabled": False}, "normalizers": ["none"]}
    tables = {
        name: analyze(
            {**base, "model": {"factory": f"lazypkg.nets:{name}"}}, out=tmp_path / name, quiet=True
        )
        for name in ("lazy", "eager")
    }
    assert set(tables["lazy"].runs["status"]) == {"done"}
    pd.testing.assert_frame_equal(
        _metrics(tmp_path / "lazy").drop(columns="run", errors="ignore"),
        _metrics(tmp_path / "eager").drop(columns="run", errors="ignore"),
        check_exact=True,
    )
    with pytest.raises(ConfigError, match=r"^model.factory: lazypkg.nets:scripted returned a "
                       r"model that cannot be measured: the model is TorchScript"):  # fmt: skip
        analyze({**base, "model": {"factory": "lazypkg.nets:scripted"}}, out=tmp_path / "s")
    assert not (tmp_path / "s" / "runs").exists()


def test_norm_swap_replaces_torch_layers() -> None:
    from normprobe.models.swap import swap_norms, swappable

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.GroupNorm(2, 8),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(4),
        torch.nn.LayerNorm(4),
    )
    assert swap_norms(net, "bmlv") == ["1", "4", "7"]
    assert isinstance(net[1], normprobe.norms.BMLVNorm) and isinstance(
        net[4], normprobe.norms.BMLVNorm
    )
    out = net(torch.randn(5, 3, 8, 8))
    assert out.shape == (5, 4)
    assert "prelayer" not in swappable() and "batch" in swappable() and "none" in swappable()


def test_per_normalizer_options_with_microbatches_run_to_done(tmp_path: Path) -> None:
    """norm_batch for every normalizer, stat_fraction for balanced only, batch-stats eval on.

    The test set (377 examples) and eval_train_samples (90) are multiples neither of the
    evaluation batch sizes nor of norm_batch, so the last batches are widened (training._split).
    Balanced overrides the default norm_batch: with microbatches of 4, a quarter is a single
    example, whose input sums can be zero (non-finite loss at step 0).
    """
    config = {
        **SMALL,
        "model": {
            "name": "mlp",
            "options": {"depth": 2, "width": 16},
            "norm_options": {
                "default": {"norm_batch": 4},
                "balanced": {"stat_fraction": 0.25, "norm_batch": 8},
            },
        },
        "normalizers": ["batch", "balanced", "layer"],
        "data": {**SMALL["data"], "options": {"normalize": "unit", "test_fraction": 0.21}},
        "train": {
            "steps": 6,
            "batch_size": 32,
            "lr": 0.05,
            "eval_batch_size": 64,
            "eval_train_samples": 90,
            "eval_batch_stats": 24,
        },
        "probes": {"schedule": [0, 6], "gradient_correlation": False},
        "hessian": {"schedule": [6], "lanczos_steps": 4, "chunk_size": 24, "pieces": ["trace"]},
    }
    results = analyze(config, out=tmp_path, quiet=True)
    assert set(results.runs["status"]) == {"done"}, results.runs.get("error")
    assert sorted(results.runs["normalizer"]) == ["balanced", "batch", "layer"]
    m = results.metrics
    assert {"test_acc_batchstats", "train_acc_batchstats", "trace"} <= set(m["metric"])
    assert m.loc[m["metric"] == "test_acc_batchstats", "value"].notna().all()
    assert len(m[m["metric"] == "test_acc_batchstats"]) == 3 * 2
    # the options reach the layers
    from normprobe.config import parse_config
    from normprobe.plan import build_run_model, prepare_data

    cfg = parse_config(config)
    data = prepare_data(cfg)
    balanced = build_run_model(cfg, "balanced", 0, data.dataset)
    norms = [m for m in balanced.modules() if hasattr(m, "stat_fraction")]
    assert len(data.dataset.test.x) % 8 and len(data.dataset.test.x) % 24
    assert norms and all((n.stat_fraction, n.norm_batch) == (0.25, 8) for n in norms)
    batch = build_run_model(cfg, "batch", 0, data.dataset)
    assert {getattr(m, "norm_batch", 0) for m in batch.modules()} >= {4}


def test_variants_run_as_one_analysis_with_a_variant_column(tmp_path: Path) -> None:
    config = {
        **SMALL,
        "normalizers": ["batch", "regnorm"],
        "train": {**SMALL["train"], "lr": [0.01, 0.05]},
        "probes": {
            "representation": False,
            "gradient_correlation": False,
            "gradient_norms": False,
            "batch_mean": True,
            "schedule": [0, 12],
        },
        "hessian": {"enabled": False},
        "variants": {
            "labels": {
                "train.sampler": {"kind": "labels", "labels_per_batch": 4, "per_label": 8},
                "train.eval_batch_stats": {"enabled": True, "batches": "sampler"},
            },
            "bs16": {"train.batch_size": 16, "normalizers": ["batch"]},
        },
    }
    results = analyze(config, out=tmp_path, quiet=True)
    runs = results.runs.set_index("run")
    assert sorted(runs.index) == sorted(
        f"{n}_{v}_lr{lr}_seed0"
        for n, v in [("batch", "labels"), ("regnorm", "labels"), ("batch", "bs16")]
        for lr in ("0.01", "0.05")
    )
    assert set(runs["status"]) == {"done"}
    # one selected learning rate per (normalizer, variant)
    assert runs.groupby(["normalizer", "variant"])["selected"].sum().tolist() == [1, 1, 1]
    m = results.metrics
    assert m.columns[:5].tolist() == ["run", "normalizer", "variant", "lr", "seed"]
    assert (m["run"].str.split("_").str[1] == m["variant"]).all()
    # label-grouped evaluation only where asked for
    stats = m[m["metric"] == "test_acc_batchstats"]
    assert set(stats["variant"]) == {"labels"} and len(stats) == 8
    assert results.manifest["config"]["variants"]["bs16"] == {
        "train.batch_size": 16,
        "normalizers": ["batch"],
    }
    assert results.summary().columns[:3].tolist() == ["normalizer", "variant", "lr"]
    # batch_mean rows for the normalization layers (3 in an MLP of depth 3) at both steps
    means = m[m["metric"] == "batch_mean_sq"]
    assert len(means) == 6 * 3 * 2
    batch = means[means["normalizer"] == "batch"]["value"]
    assert batch.abs().max() < 1e-10  # Batch Norm centres every channel of its batch
    assert means[means["normalizer"] == "regnorm"]["value"].min() > 1e-6
    # resume: nothing left to do, the same tables come back
    again = analyze(config, out=tmp_path, quiet=True)
    pd.testing.assert_frame_equal(results.metrics, again.metrics, check_exact=True)


# --------------------------------------------------------------------------- language models


def _text_file(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    words = ["def", "return", "self", "import", "for", "in", "if", "else", "x", "(", ")", ":"]
    picks = torch.randint(0, len(words), (4000,), generator=g).tolist()
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(words[i] for i in picks))
    return path


def _lm_config(tmp_path: Path) -> dict:
    return {
        "model": {
            "name": "transformer",
            "options": {"depth": 2, "width": 16, "heads": 2, "mlp_ratio": 2},
        },
        "normalizers": ["layer", "prelayer"],
        "data": {
            "name": "text",
            "options": {"path": str(_text_file(tmp_path)), "window": 16},
            "probe_batch": 16,
            "hessian_samples": 16,
        },
        "train": {"optimizer": "adam", "lr": [0.003, 0.01], "steps": 6, "batch_size": 16},
        "probes": {"representation": {"pairing": "independent"}, "schedule": [0, 6]},
        "hessian": {
            "schedule": [0, 6],
            "pieces": ["top", "trace"],
            "top_k": 4,
            "outlier_k": 4,
            "trace_samples": 4,
            "chunk_size": 8,
        },
        "variants": {
            "pre": {},
            "post": {"normalizers": ["layer"], "model.options.placement": "post"},
        },
    }


def test_a_transformer_on_text_records_perplexity_probes_and_the_hessian(tmp_path: Path) -> None:
    lines: list[str] = []
    results = analyze(_lm_config(tmp_path), out=tmp_path / "out", log=lines.append)
    runs = results.runs
    assert set(runs["status"]) == {"done"} and len(runs) == 3 * 2
    assert set(zip(runs["normalizer"], runs["variant"])) == {
        ("layer", "pre"),
        ("prelayer", "pre"),
        ("layer", "post"),
    }
    m = results.metrics
    metrics = set(m["metric"])
    assert {"test_perplexity", "train_perplexity", "repr_corr_independent"} <= metrics
    assert {"grad_corr", "grad_norm", "outlier_ratio", "trace"} <= metrics
    ppl, loss = (
        m[m["metric"] == k].set_index(["run", "step"])["value"]
        for k in ("test_perplexity", "test_loss")
    )
    pd.testing.assert_series_equal(ppl, loss.map(math.exp), check_names=False)
    # per-token accuracy is a fraction of the tokens
    acc = m[m["metric"] == "test_acc"]["value"]
    assert ((acc >= 0) & (acc <= 1)).all()
    # the outlier ratio uses K = hessian.outlier_k
    assert set(m[m["metric"] == "outlier_ratio"]["index"]) == {4}
    # representations of (N, T, D) activations, probed at the MLP activations of each block
    rep = m[(m["metric"] == "repr_corr_independent") & (m["step"] == 0)]
    assert set(rep["layer"]) == {"input", "blocks.0.mlp.act", "blocks.1.mlp.act"}
    assert set(rep[rep["layer"] != "input"]["shape"]) == {"16x32"}  # T x (mlp_ratio * D)
    # learning rate chosen by the lowest final test loss, and the runs table has the perplexity
    for _, group in runs.groupby(["normalizer", "variant"]):
        best = group.groupby("lr")["final_test_loss"].mean().idxmin()
        assert set(group[group["selected"]]["lr"]) == {best}
    assert runs["final_test_perplexity"].notna().all()
    assert any("ppl" in line for line in lines)


def test_language_model_config_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    config = _lm_config(tmp_path)
    config.pop("variants")
    bad = [
        ({"normalizers": ["batch"]}, r"normalizers\[0\]: 'batch' does not fit.*causal mask"),
        (
            {"model": {**config["model"], "options": {"context": 8}}},
            r"model\.options\.context: 8 is shorter than the data's windows of 16 tokens",
        ),
        (
            {"model": {"name": "mlp"}},
            r"model\.name: 'mlp' classifies real-valued inputs.*name: transformer",
        ),
        (
            {"data": {"name": "digits"}},
            r"model\.name: the transformer reads token ids.*data: \{name: text\}",
        ),
        (
            {"probes": {"representation": {"pairing": "noise"}}},
            r"probes\.representation\.pairing: 'noise' adds Gaussian noise.*independent",
        ),
    ]
    for change, pattern in bad:
        with pytest.raises(ConfigError, match=pattern) as err:
            analyze({**config, **change}, out=tmp_path / "bad", quiet=True, force=True)
        assert "\n" not in str(err.value)
    # with normalizers: all, the ones the transformer refuses are skipped with their reason
    lines: list[str] = []
    quick = {**config, "normalizers": "all", "hessian": {"enabled": False}}
    quick["train"] = {**config["train"], "steps": 1, "lr": 0.003}
    quick["probes"] = {"representation": {"pairing": "independent"}, "schedule": [0]}
    results = analyze(quick, out=tmp_path / "all", log=lines.append)
    assert set(results.runs["normalizer"]) == set(
        normprobe.models.transformer.sequence_normalizers("pre")
    )
    assert any(line.startswith("skipping batch:") and "causal" in line for line in lines)


def test_structural_probes_run_on_the_schedule_and_feed_the_properties_table(
    tmp_path: Path,
) -> None:
    from normprobe.zoo_measures import measure_properties

    config = {
        **SMALL,
        "normalizers": ["none", "batch", "layer"],
        "probes": {
            "representation": False,
            "gradient_correlation": False,
            "gradient_norms": False,
            "batch_dependence": True,
            "train_eval_gap": True,
            "signal": True,
            "schedule": [0, 12],
        },
        "hessian": {"enabled": False},
    }
    results = analyze(config, out=tmp_path, quiet=True)
    m = results.metrics
    depend = m[m["metric"] == "batch_dependence"]
    # 3 activation layers and the output, train and eval mode, at both steps
    assert len(depend) == 3 * 4 * 2 * 2
    by = depend.groupby(["normalizer", "mode"])["value"].max()
    assert by[("layer", "train")] == 0 and by[("none", "train")] == 0
    assert by[("batch", "train")] > 1e-3 and by[("batch", "eval")] == 0
    gap = m[(m["metric"] == "train_eval_gap") & (m["layer"] == "output")]
    assert len(gap) == 3 * 2 and gap.groupby("normalizer")["value"].max()["batch"] > 1e-3
    signal = m[m["metric"].isin(["signal_sq_mean", "signal_var"])]
    assert len(signal) == 3 * 3 * 2 * 2
    table = measure_properties(results, normalizers=["none", "batch", "layer"])
    verdicts = table.wide("verdict")
    assert verdicts["batch_size"].tolist() == ["+", "-", "+"]
    assert verdicts["train_test"].tolist() == ["+", "-", "+"]
    assert verdicts.loc["batch", "scaling"] == "+"
    assert verdicts.loc["none", "depth"] == "not measured"  # no deep variant


def test_an_undefined_growth_rate_is_recorded_as_nan_not_a_failed_run() -> None:
    """A dead network (zero gradients in early layers) has no log-linear growth rate."""
    import torch.nn.functional as F
    from torch import nn

    from normprobe.measures import _growth_or_nan
    from normprobe.probes import gradient_norms, growth_rate

    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].bias.fill_(-100.0)  # every unit of the first layer is dead
    frame = gradient_norms(net, F.cross_entropy, (torch.randn(8, 3), torch.zeros(8).long()))
    assert frame[frame["metric"] == "grad_norm"]["value"].tolist()[:2] == [0.0, 0.0]
    assert math.isnan(_growth_or_nan(frame))
    alive = gradient_norms(
        nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
        F.cross_entropy,
        (torch.randn(8, 3), torch.zeros(8).long()),
    )
    assert _growth_or_nan(alive) == growth_rate(alive)


def test_tables_are_written_once_at_the_end_and_on_interruption(
    tmp_path: Path, monkeypatch
) -> None:
    analyze_module = sys.modules["normprobe.analyze"]  # the package's `analyze` is the function
    config = {**SMALL, "normalizers": ["layer", "batch"], "hessian": {"enabled": False}}
    config["train"] = {**SMALL["train"], "steps": 2}
    config["probes"] = {"schedule": [0, 2]}  # steps past train.steps are an error
    calls: list[Path] = []
    real = analyze_module.assemble
    monkeypatch.setattr(
        analyze_module, "assemble", lambda d, **kw: calls.append(d) or real(d, **kw)
    )
    results = analyze(config, out=tmp_path / "a", quiet=True)
    assert len(calls) == 1 and len(results.runs) == 2  # not once per run
    # Ctrl-C in the second run: the tables hold the first, whose folder a rerun keeps
    real_run = analyze_module.run_one

    def interrupted(spec, data, **kwargs):
        if spec.normalizer == "batch":
            raise KeyboardInterrupt
        return real_run(spec, data, **kwargs)

    monkeypatch.setattr(analyze_module, "run_one", interrupted)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        analyze(config, out=tmp_path / "b", quiet=True)
    assert len(calls) == 1
    assert set(_metrics(tmp_path / "b")["normalizer"]) == {"layer"}
    monkeypatch.setattr(analyze_module, "run_one", real_run)
    lines: list[str] = []
    resumed = analyze(config, out=tmp_path / "b", log=lines.append)
    assert "resuming: 1 of 2 runs already finished" in lines
    pd.testing.assert_frame_equal(resumed.metrics, results.metrics, check_exact=True)
