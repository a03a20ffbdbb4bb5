"""Learning-rate selection: the rule, its edge flags, the held-out split and the grid extension."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from normprobe import analyze
from normprobe.analyze import unsettled_lines
from normprobe.config import ConfigError, load_config, parse_config
from normprobe.plan import plan_runs, prepare_data
from normprobe.results import RunRecord, assemble, choose_rate, lr_note, records_results
from normprobe.run import run_one


def _scores(rows):
    return pd.DataFrame(rows, columns=["lr", "score", "seeds", "diverged"])


def test_the_best_mean_score_wins_and_ties_go_to_the_smaller_rate() -> None:
    s = _scores([(0.01, 0.5, 2, 0), (0.1, 0.9, 2, 0), (1.0, 0.7, 2, 0)])
    assert choose_rate(s, "max") == (0.1, "")
    tie = _scores([(0.01, 0.5, 1, 0), (0.1, 0.9, 1, 0), (0.3, 0.9, 1, 0), (1.0, 0.2, 1, 0)])
    assert choose_rate(tie, "max") == (0.1, "")
    # language models: the lowest loss
    loss = _scores([(0.01, 3.0, 1, 0), (0.1, 2.0, 1, 0), (1.0, 2.5, 1, 0)])
    assert choose_rate(loss, "min") == (0.1, "")


def test_diverged_runs_count_as_worst_and_an_all_diverged_rate_is_never_chosen() -> None:
    # 0.3 has the best mean of its finished seeds, but one of its two seeds diverged
    s = _scores([(0.01, 0.5, 2, 0), (0.1, 0.8, 2, 0), (0.3, 0.95, 2, 1), (1.0, float("nan"), 2, 2)])
    assert choose_rate(s, "max") == (0.1, "")
    # a rate that diverged for every seed bounds the grid from above: 0.3 is inside it
    bound = _scores([(0.1, 0.8, 1, 0), (0.3, 0.9, 1, 0), (1.0, float("nan"), 1, 1)])
    assert choose_rate(bound, "max") == (0.3, "")
    everything = _scores([(0.1, float("nan"), 1, 1), (1.0, float("nan"), 1, 1)])
    assert choose_rate(everything, "max") == (None, "diverged")


def test_edge_flags_and_their_notes() -> None:
    assert choose_rate(_scores([(0.01, 0.9, 1, 0), (0.1, 0.5, 1, 0)]), "max") == (0.01, "low")
    assert choose_rate(_scores([(0.01, 0.5, 1, 0), (0.1, 0.9, 1, 0)]), "max") == (0.1, "high")
    assert choose_rate(_scores([(0.1, 0.9, 1, 0)]), "max") == (0.1, "single")
    assert lr_note("high", 0.05, [0.05, 0.01]) == (
        "best rate 0.05 is the top of the grid [0.01, 0.05]; extend the grid upwards "
        "(train.lr_extend)"
    )
    assert "bottom of the grid [0.01, 0.05]" in lr_note("low", 0.01, [0.01, 0.05])
    assert lr_note("", 0.05, [0.01, 0.05, 0.1]) == ""


def _record(norm, lr, seed, status="done", test=0.5, val=None):
    values = {"test_acc": test} if val is None else {"test_acc": test, "val_acc": val}
    frame = pd.DataFrame(
        {
            "step": 10,
            "layer": None,
            "depth": float("nan"),
            "metric": list(values),
            "value": list(values.values()),
        }
    )
    return RunRecord(
        f"{norm}_lr{lr:g}_seed{seed}", norm, lr, seed, status, tables={"metrics": frame}
    )


def test_selection_marks_rows_with_their_edge_and_selects_on_the_held_out_split() -> None:
    records = [
        _record("layer", 0.01, 0, test=0.5, val=0.6),
        _record("layer", 0.1, 0, test=0.9, val=0.7),
        _record("layer", 1.0, 0, test=0.95, val=0.65),  # best on test, not on held-out
        _record("batch", 0.01, 0, test=0.3, val=0.3),
        _record("batch", 0.1, 0, test=0.8, val=0.8),
        _record("batch", 1.0, 0, "diverged"),
    ]
    runs = records_results(records).runs.set_index("run")
    assert runs.loc["layer_lr0.1_seed0", "selected"]
    assert not runs.loc["layer_lr1_seed0", "selected"]
    assert set(runs["selected_by"]) == {"val_acc"}
    assert runs.loc["batch_lr0.1_seed0", "selected"]
    assert set(runs["lr_edge"]) == {""}
    # on the test set, layer's best is the top of its grid: flagged, with the reason
    manifest = {"config": {"train": {"select_on": "test"}}}
    runs = records_results(records, manifest=manifest).runs.set_index("run")
    assert runs.loc["layer_lr1_seed0", "selected"]
    assert runs.loc["layer_lr1_seed0", "lr_edge"] == "high"
    assert "top of the grid [0.01, 0.1, 1]" in runs.loc["layer_lr1_seed0", "lr_note"]
    assert runs.loc["batch_lr0.1_seed0", "lr_edge"] == ""  # 1.0 diverged: 0.1 is inside


def test_summary_lines_say_what_is_not_settled() -> None:
    results = records_results([_record("layer", 0.01, 0, test=0.2), _record("layer", 0.1, 0)])
    lines = unsettled_lines(results)
    assert lines[0] == (
        "learning rates selected on test_acc (final value, mean over seeds): the test set "
        "chose them, so their test scores are optimistic; data.held_out selects on examples "
        "held out of training instead"
    )
    assert lines[1].startswith("not settled: layer: best rate 0.1 is the top of the grid")


def test_held_out_count_and_config_checks() -> None:
    cfg = parse_config({"data": {"held_out": 0.1}})
    assert cfg.data.held_out_count(1000) == 100
    assert parse_config({"data": {"held_out": 300}}).data.held_out_count(1000) == 300
    with pytest.raises(ConfigError, match="data.held_out"):
        parse_config({"data": {"held_out": 1.5}})
    with pytest.raises(ConfigError, match="train.select_on"):
        parse_config({"train": {"select_on": "held_out"}})
    assert parse_config({"train": {"lr_extend": 2}}).train.lr_extend.max_extra == 2


def _tiny(**train):
    return {
        "model": {"name": "mlp", "options": {"depth": 2, "width": 16}},
        "normalizers": ["layer"],
        "data": {"held_out": 0.1},
        "train": {"steps": 6, "batch_size": 32, **train},
        "probes": {
            "representation": False,
            "gradient_correlation": False,
            "gradient_norms": False,
            "schedule": [0, 6],
        },
        "hessian": {"enabled": False},
    }


def test_the_held_out_split_is_disjoint_from_training_and_deterministic() -> None:
    config = load_config(_tiny())[0]
    data = prepare_data(config)
    again = prepare_data(config, data.dataset)
    n = len(data.dataset.train)
    assert torch.equal(data.held_out, again.held_out)
    assert len(data.held_out) == round(0.1 * n) and len(set(data.held_out.tolist())) == len(
        data.held_out
    )
    train_x, _ = data.train_split()
    val_x, _ = data.val_split()
    assert len(train_x) + len(val_x) == n
    # every training example lands in exactly one of the two
    rows = {tuple(r.tolist()) for r in data.dataset.train.x.flatten(1)}
    trained = {tuple(r.tolist()) for r in train_x.flatten(1)}
    held = {tuple(r.tolist()) for r in val_x.flatten(1)}
    if len(rows) == n:  # no duplicate images: the sets partition them
        assert trained.isdisjoint(held) and trained | held == rows
    # another data seed holds out other examples
    other = prepare_data(load_config(_tiny() | {"data": {"held_out": 0.1, "seed": 1}})[0])
    assert not torch.equal(other.held_out, data.held_out)
    # the runs record the held-out metrics at the evaluation steps
    record = run_one(plan_runs(config)[0], data)
    metrics = record.tables["metrics"]
    assert set(metrics[metrics["metric"] == "val_acc"]["step"]) == {0, 6}


def test_a_growing_grid_reads_each_finished_run_folder_once(tmp_path, monkeypatch) -> None:
    """Each stage of the grid is assembled to choose the next rate; the folders read at one
    stage are not read again at the next, and the tables are those read afresh."""
    cfg = _tiny(lr=[0.001, 0.002], lr_extend={"max_extra": 2, "factor": 4.0}, seeds=[0])
    cfg["train"]["steps"] = 20
    cfg["probes"]["schedule"] = [0, 20]
    reads: list[str] = []
    real = pd.read_parquet
    monkeypatch.setattr(
        pd, "read_parquet", lambda path, **kw: reads.append(str(path)) or real(path, **kw)
    )
    results = analyze(cfg, out=tmp_path / "out", quiet=True)
    assert len(results.runs) >= 3  # the grid grew: assembled at least twice before the end
    metrics_reads = [p for p in reads if p.endswith("metrics.parquet")]
    assert sorted(metrics_reads) == sorted(set(metrics_reads))
    assert len(metrics_reads) == len(results.runs)
    monkeypatch.setattr(pd, "read_parquet", real)
    fresh = assemble(tmp_path / "out", write=False)
    pd.testing.assert_frame_equal(fresh.metrics, results.metrics, check_exact=True)
    pd.testing.assert_frame_equal(fresh.runs, results.runs, check_exact=True)


def test_the_grid_extends_past_its_edge_and_resumes_without_rerunning(tmp_path) -> None:
    # rates too small for 20 steps: the larger is best, so the grid grows upwards
    cfg = _tiny(lr=[0.001, 0.002], lr_extend={"max_extra": 2, "factor": 4.0}, seeds=[0])
    cfg["train"]["steps"] = 20
    cfg["probes"]["schedule"] = [0, 20]
    lines: list[str] = []
    results = analyze(cfg, out=tmp_path / "out", quiet=True, log=lines.append)
    rates = sorted(results.runs["lr"])
    assert rates[:3] == [0.001, 0.002, 0.008] and len(rates) <= 4
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [e["lr"] for e in manifest["lr_extensions"]] == rates[2:]
    assert any("adding lr 0.008 (1 of at most 2" in line for line in lines)
    chosen = results.runs[results.runs["selected"]]
    # either the best rate is inside the grid now, or the two extra rates are spent
    assert chosen["lr_edge"].iloc[0] == "" or rates == [0.001, 0.002, 0.008, 0.032]
    # resume: nothing runs again, the same runs and selection come back
    again: list[str] = []
    resumed = analyze(cfg, out=tmp_path / "out", quiet=True, log=again.append)
    assert not any(line.startswith("[") for line in again), again
    assert sorted(resumed.runs["lr"]) == sorted(results.runs["lr"])
    # an extension run that went missing is run again, and only it
    shutil.rmtree(tmp_path / "out" / "runs" / "layer_lr0.008_seed0")
    third: list[str] = []
    analyze(cfg, out=tmp_path / "out", quiet=True, log=third.append)
    ran = [line for line in third if line.startswith("[")]
    assert len(ran) == 1 and "layer_lr0.008_seed0" in ran[0]
