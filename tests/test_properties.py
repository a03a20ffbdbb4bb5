"""The measured properties table: each criterion on small synthetic tables with known verdicts."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

import normprobe
from normprobe.cli import main
from normprobe.properties import CRITERIA, PAPER, PropertiesError, relative_threshold
from normprobe.zoo_measures import measure_properties, sequence_leak


def _row(norm, metric, value, *, step=300, seed=0, layer=None, depth=None, **extra):
    return {
        "run": f"{norm}_{extra.get('variant') or 'x'}_lr{extra.get('lr', 0.1)}_seed{seed}",
        "normalizer": norm,
        "seed": seed,
        "step": step,
        "layer": layer,
        "depth": depth,
        "metric": metric,
        "value": value,
        **extra,
    }


def _verdicts(rows, prop, norms=None):
    metrics = pd.DataFrame(rows)
    norms = norms or list(dict.fromkeys(metrics["normalizer"]))
    table = measure_properties(metrics, properties=[prop], normalizers=norms)
    cells = table.cells.set_index("normalizer")
    return dict(cells["verdict"]), cells


def test_relative_threshold_is_the_midpoint_or_the_better_reference_minus_the_floor() -> None:
    assert relative_threshold(0.8, 1.0, "higher", 0.01) == pytest.approx(0.9)
    assert relative_threshold(1.0, 0.8, "higher", 0.01) == pytest.approx(0.9)  # order-free
    assert relative_threshold(0.99, 0.995, "higher", 0.01) == pytest.approx(0.985)
    assert relative_threshold(0.5, 0.1, "lower", 0.05) == pytest.approx(0.3)
    assert relative_threshold(0.5, 0.48, "lower", 0.05) == pytest.approx(0.53)


def test_training_needs_both_final_accuracy_and_speed() -> None:
    curves = {
        "none": [0.5, 0.80],
        "batch": [0.9, 0.98],
        "layer": [0.85, 0.95],  # final 0.95 >= 0.89 and mean 0.90 >= 0.81: +
        "weight": [0.6, 0.85],  # final below the midpoint: -
        "group": [0.6, 0.97],  # final fine, but slow (mean 0.785 < 0.81): -
    }
    rows = [_row(n, "test_acc", 0.1, step=0) for n in curves]
    rows += [
        _row(n, "test_acc", v, step=s) for n, c in curves.items() for s, v in zip((100, 300), c)
    ]
    verdicts, cells = _verdicts(rows, "training")
    assert verdicts == {"none": "-", "batch": "+", "layer": "+", "weight": "-", "group": "-"}
    assert cells.loc["layer", "threshold"] == pytest.approx(0.89)
    assert cells.loc["layer", "shown"] == "0.950 (mean 0.900)"


def test_only_the_selected_learning_rate_and_the_median_over_seeds_count() -> None:
    rows = []
    for norm, accs in {"none": [0.7, 0.8, 0.9], "batch": [0.97, 0.98, 0.99]}.items():
        for seed, acc in enumerate(accs):
            rows.append(_row(norm, "test_acc", acc, seed=seed, lr=0.1, selected=True))
            rows.append(_row(norm, "test_acc", 0.0, seed=seed, lr=1.0, selected=False))
    rows.append(_row("layer", "test_acc", 0.95, lr=0.1, selected=True))
    _, cells = _verdicts(rows, "training")
    assert cells.loc["none", "value"] == pytest.approx(0.8)  # median of 0.7, 0.8, 0.9
    assert cells.loc["batch", "value"] == pytest.approx(0.98)
    assert cells.loc["layer", "verdict"] == "+"


def test_deeper_networks_read_the_deep_variant_only() -> None:
    rows = [
        _row("none", "test_acc", 0.6, variant="deep"),
        _row("batch", "test_acc", 0.9, variant="deep"),
        _row("layer", "test_acc", 0.1, variant="deep"),
        _row("prelayer", "test_acc", 0.8, variant="deep"),
        _row("layer", "test_acc", 0.99, variant="main"),  # the main variant is not read
    ]
    verdicts, _ = _verdicts(rows, "depth")
    assert verdicts == {"none": "-", "batch": "+", "layer": "-", "prelayer": "+"}
    no_variants = [_row("none", "test_acc", 0.6), _row("batch", "test_acc", 0.9)]
    assert set(_verdicts(no_variants, "depth")[0].values()) == {"not measured"}


def test_outlier_suppression_is_judged_on_log_ratios_after_step_0() -> None:
    rows = []
    for norm, ratio in {"none": 100.0, "batch": 1.0, "layer": 30.0, "prelayer": 3.0}.items():
        rows.append(_row(norm, "outlier_ratio", 1e6, step=0))  # init is not "through training"
        rows += [_row(norm, "outlier_ratio", ratio, step=s) for s in (50, 150)]
    verdicts, cells = _verdicts(rows, "outliers")
    # threshold: log10 midpoint of 100 and 1, i.e. a ratio of 10
    assert verdicts == {"none": "-", "batch": "+", "layer": "-", "prelayer": "+"}
    assert cells.loc["layer", "shown"] == "30.000"


def test_batch_size_and_train_test_are_exact_criteria() -> None:
    rows = [
        _row("layer", "batch_dependence", 0.0, layer="a", mode="train"),
        _row("layer", "batch_dependence", 0.0, layer="output", mode="train"),
        _row("batch", "batch_dependence", 0.0, layer="a", mode="train", step=0),
        _row("batch", "batch_dependence", 0.2, layer="output", mode="train"),
        _row("batch", "batch_dependence", 0.0, layer="output", mode="eval"),
        _row("layer", "train_eval_gap", 0.0, layer="output", mode="train-eval"),
        _row("batch", "train_eval_gap", 0.0, layer="a", mode="train-eval"),
        _row("batch", "train_eval_gap", 0.3, layer="output", mode="train-eval"),
        _row("bmlv", "train_eval_gap", 0.5, layer="a", mode="train-eval"),  # not the output
        _row("bmlv", "train_eval_gap", 1e-9, layer="output", mode="train-eval"),  # float noise
        _row("bmlv", "train_eval_gap", 9.0, layer="output", mode="train-eval", step=0),  # init
    ]
    verdicts, cells = _verdicts(rows, "batch_size", ["layer", "batch"])
    assert verdicts == {"layer": "+", "batch": "-"}
    assert cells.loc["batch", "shown"] == "0.20 (eval 0)"
    verdicts, _ = _verdicts(rows, "train_test", ["layer", "batch", "bmlv"])
    assert verdicts == {"layer": "+", "batch": "-", "bmlv": "+"}


def test_sequential_models_come_from_the_normalizer_itself() -> None:
    rows = [_row("none", "test_acc", 0.5)]
    verdicts, cells = _verdicts(rows, "sequential", ["layer", "rms", "batch", "lmbv", "instance"])
    assert verdicts == {"layer": "+", "rms": "+", "batch": "-", "lmbv": "-", "instance": "-"}
    assert cells.loc["instance", "shown"] == "n/a (conv only)"
    assert sequence_leak("prelayer") == 0.0 and math.isinf(sequence_leak("instance"))


def test_gradient_confusion_reads_steps_after_init() -> None:
    rows = []
    for norm, corr in {"none": 0.8, "batch": 0.1, "layer": 0.7, "regnorm": 0.4}.items():
        rows.append(_row(norm, "grad_corr", 0.0, step=0, layer="l1"))  # init: not read
        for step in (50, 100, 300):
            rows += [
                _row(norm, "grad_corr", corr + d, step=step, layer=f"l{d}") for d in (-0.05, 0.05)
            ]
    verdicts, cells = _verdicts(rows, "confusion")
    assert verdicts == {"none": "-", "batch": "+", "layer": "-", "regnorm": "+"}
    assert cells.loc["regnorm", "value"] == pytest.approx(0.4)


def test_chaos_to_order_needs_a_rise_within_the_first_third() -> None:
    curves = {
        "batch": {0: 0.5, 50: 0.9, 300: 0.6},  # rises by 0.4 early: +
        "layer": {0: 0.99, 50: 0.99, 300: 0.99},  # ordered from the start: -
        "late": {0: 0.5, 50: 0.5, 300: 0.9},  # rises, but only late: -
    }
    rows = [
        _row(n, "repr_corr_noise", v, step=s, layer="head", depth=9)
        for n, c in curves.items()
        for s, v in c.items()
    ]
    rows += [
        _row(n, "repr_corr_noise", 1.0, step=s, layer="x", depth=1) for n in curves for s in (0, 50)
    ]
    verdicts, cells = _verdicts(rows, "chaos_order")
    assert verdicts == {"batch": "+", "layer": "-", "late": "-"}
    assert cells.loc["batch", "shown"] == "0.50 -> +0.40"


def test_gradient_explosion_uses_the_growth_rate_at_init() -> None:
    rows = []
    for norm, rate in {"none": 1.0, "batch": 1.3, "layer": 0.95, "bmlv": 1.25}.items():
        rows += [_row(norm, "grad_growth_rate", rate, step=0), _row(norm, "grad_growth_rate", 5.0)]
    verdicts, _ = _verdicts(rows, "explosion")
    assert verdicts == {"none": "-", "batch": "+", "layer": "-", "bmlv": "+"}


def test_scaling_and_centring_from_signal_statistics_at_init() -> None:
    profiles = {  # per depth: (squared channel mean, channel variance)
        "batch": [(0.0, 1.0)] * 4,
        "drift": [(0.0, 10.0 ** (d / 2)) for d in range(4)],  # 1.5 decades: -
        "mean": [(0.0, 1.0), (0.0, 1.0), (3.0, 1.0), (0.0, 1.0)],  # 3/4 of q is mean: -
        "mild": [(0.2, 1.0), (0.1, 2.0), (0.0, 3.0), (0.3, 5.0)],  # 0.7 decades, 1/6: +
    }
    rows = []
    for norm, prof in profiles.items():
        for d, (sq, var) in enumerate(prof, start=1):
            rows.append(_row(norm, "signal_sq_mean", sq, step=0, layer=f"l{d}", depth=d))
            rows.append(_row(norm, "signal_var", var, step=0, layer=f"l{d}", depth=d))
            rows.append(_row(norm, "signal_var", 1e6, step=300, layer=f"l{d}", depth=d))  # not read
            rows.append(_row(norm, "signal_sq_mean", 0.0, step=300, layer=f"l{d}", depth=d))
    verdicts, cells = _verdicts(rows, "scaling")
    assert verdicts == {"batch": "+", "drift": "-", "mean": "-", "mild": "+"}
    assert cells.loc["drift", "value"] == pytest.approx(1.5)
    assert cells.loc["mean", "shown"] == "0.60 dec / 0.75"


def test_missing_results_are_not_measured_and_relative_ones_need_both_references() -> None:
    rows = [_row("batch", "test_acc", 0.9), _row("layer", "test_acc", 0.8)]
    verdicts, cells = _verdicts(rows, "training")
    assert set(verdicts.values()) == {"not measured"}
    assert cells.loc["layer", "note"] == "needs the none and batch rows"
    verdicts, _ = _verdicts(rows, "batch_size")
    assert set(verdicts.values()) == {"not measured"}


def test_every_zoo_normalizer_and_any_other_in_the_results_gets_a_row() -> None:
    rows = [_row("none", "test_acc", 0.5), _row("my-norm", "test_acc", 0.9)]
    table = measure_properties(pd.DataFrame(rows))
    assert table.normalizers == [*normprobe.normalizers(), "my-norm"]
    wide = table.wide("verdict")
    assert wide.shape == (len(normprobe.normalizers()) + 1, len(CRITERIA))
    assert wide.loc["my-norm", "training"] == "not measured"  # no batch row to compare with
    assert wide.loc["my-norm", "sequential"] == "not measured"  # not in the zoo: cannot build it


def test_markdown_footnotes_and_the_comparison_with_the_paper() -> None:
    rows = [
        _row("none", "test_acc", 0.5),
        _row("batch", "test_acc", 0.9),
        _row("layer", "test_acc", 0.95),
        _row("prelayer", "test_acc", 0.4),
    ]
    table = measure_properties(
        pd.DataFrame(rows), normalizers=["none", "batch", "layer", "prelayer"]
    )
    text = table.to_markdown()
    assert text.splitlines()[0].startswith("| normalizer | scaling & centring (1) |")
    assert "| layer | not measured | + 0.950 |" in text
    assert "2. Faster training and better generalization: final test accuracy" in text
    assert "(here: 0.700)" in text
    paper = table.against_paper()
    # layer: the paper's -* against a measured +; prelayer: + against -
    assert "| Faster training and better generalization | + / + | -* / **+** | + / **-** |" in paper
    assert "| No dependence on batch size | - / not measured |" in paper
    dis = table.disagreements()
    assert sorted(map(tuple, dis[["normalizer", "property"]].values)) == [
        ("layer", "training"),
        ("prelayer", "training"),
    ]


def test_the_paper_table_is_complete() -> None:
    keys = {c.key for c in CRITERIA}
    assert set(PAPER) == {"batch", "bmlv", "layer", "prelayer", "regnorm"}
    assert all(set(v) == keys for v in PAPER.values())
    assert PAPER["layer"]["outliers"] == "-" and PAPER["batch"]["train_test"] == "-"


def test_unknown_property_and_empty_results_are_errors() -> None:
    with pytest.raises(PropertiesError, match="no property 'speed'; properties: scaling"):
        measure_properties(pd.DataFrame([_row("none", "test_acc", 0.5)]), properties=["speed"])
    with pytest.raises(PropertiesError, match="hold no measurements"):
        measure_properties(pd.DataFrame())


def _results_dir(tmp_path):
    rows = []
    for norm, acc, dep in [("none", 0.5, 0.0), ("batch", 0.9, 0.3), ("layer", 0.95, 0.0)]:
        rows.append(_row(norm, "test_acc", acc))
        rows.append(_row(norm, "batch_dependence", dep, layer="output", mode="train"))
    directory = tmp_path / "results"
    directory.mkdir()
    pd.DataFrame(rows).to_parquet(directory / "results.parquet")
    (directory / "manifest.json").write_text(json.dumps({"config": {}}))
    return directory


def test_cli_writes_markdown_csv_and_heatmap(tmp_path, capsys) -> None:
    directory = _results_dir(tmp_path)
    assert main(["properties", str(directory), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "| layer | not measured | + 0.950 |" in printed and "Against Rao & Sohl-Dickstein 2020" in printed
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["properties.csv", "properties.md", "properties.png"]
    csv = pd.read_csv(tmp_path / "out" / "properties.csv")
    assert set(csv["normalizer"]) == set(normprobe.normalizers())
    got = csv.set_index(["normalizer", "property"])["verdict"]
    assert got[("batch", "batch_size")] == "-" and got[("layer", "batch_size")] == "+"
    assert np.isclose(csv[csv["property"] == "training"]["threshold"].dropna().iloc[0], 0.7)


def test_cli_errors_exit_2_with_one_clear_line(tmp_path, capsys) -> None:
    assert main(["properties", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["properties", str(_results_dir(tmp_path)), "--format", "gif"]) == 2
    assert "gif is not a figure format" in capsys.readouterr().err


def test_plot_draws_the_heatmap_or_says_why_not(tmp_path) -> None:
    from normprobe.plotting import plot_results

    report = plot_results(_results_dir(tmp_path), tmp_path / "figs", only=["properties"])
    assert list(report.written) == ["properties"]
    empty = tmp_path / "empty"
    empty.mkdir()
    pd.DataFrame([_row("none", "train_loss", 1.0)]).to_parquet(empty / "results.parquet")
    (empty / "manifest.json").write_text("{}")
    report = plot_results(empty, tmp_path / "figs2", only=["properties"])
    assert "no property measured" in report.skipped["properties"]


def test_the_sequence_row_agrees_with_the_normalizers_the_transformer_takes() -> None:
    from normprobe.models.transformer import sequence_problem

    for norm in normprobe.normalizers():
        leaks = sequence_leak(norm) > 0
        assert leaks == (sequence_problem(norm, "pre") is not None), norm


def test_a_verdict_resting_on_an_edge_rate_reads_not_settled(tmp_path) -> None:
    rows = []
    for norm, acc, edge in (("none", 0.6, ""), ("batch", 0.9, ""), ("layer", 0.1, "high")):
        for lr, selected in ((0.01, False), (0.05, True)):
            for variant in ("main", "deep"):
                rows.append(
                    _row(norm, "test_acc", acc if selected else 0.0, lr=lr, variant=variant,
                         selected=selected, lr_edge=edge if variant == "deep" else "")
                )
    table = measure_properties(
        pd.DataFrame(rows), properties=["training", "depth"], normalizers=["none", "batch", "layer"]
    )
    cells = table.cells.set_index(["normalizer", "property"])
    assert not cells.loc[("layer", "depth"), "settled"]
    assert cells.loc[("layer", "training"), "settled"]  # the main variant's rate is inside
    assert cells.loc[("batch", "depth"), "settled"]
    assert "top of the grid [0.01, 0.05]" in cells.loc[("layer", "depth"), "lr_note"]
    text = table.to_markdown()
    assert "| layer | - 0.100 | - 0.100 (not settled) |" in text
    assert "Not settled:" in text and "- layer, columns (2): best rate 0.05" in text
    assert "(not settled)" in table.against_paper()
    from normprobe.plotting import write_properties

    write_properties(table, tmp_path)
    assert "settled" in pd.read_csv(tmp_path / "properties.csv").columns
