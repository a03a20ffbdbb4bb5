"""The training-experiment figures (Rao & Sohl-Dickstein 2020, fig. 5 and the appendix studies) on synthetic tables."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from normprobe.plotting import experiments as E  # noqa: E402
from normprobe.plotting import style  # noqa: E402
from normprobe.plotting.figures import FigureSkipped  # noqa: E402
from normprobe.plotting.gallery import plot_results  # noqa: E402
from normprobe.results import Results  # noqa: E402

SEEDS = [0, 1, 2]
SEED_OFFSET = {0: -0.2, 1: 0.0, 2: 0.1}  # median offset 0, quartiles -0.1 and +0.05


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _results(rows: list[dict], config: dict) -> Results:
    metrics = pd.DataFrame(rows)
    metrics["selected"] = True
    runs = metrics[["run", "normalizer", "variant", "lr", "seed"]].drop_duplicates()
    runs = runs.assign(status="done", selected=True)
    return Results(Path("."), metrics, runs, pd.DataFrame(), pd.DataFrame(), {"config": config})


def _row(norm: str, variant: str, seed: int, step: int, metric: str, value: float, **extra):
    return {
        "run": f"{norm}_{variant}_lr0.1_seed{seed}",
        "normalizer": norm,
        "variant": variant,
        "lr": 0.1,
        "seed": seed,
        "step": step,
        "layer": extra.pop("layer", None),
        "depth": extra.pop("depth", np.nan),
        "metric": metric,
        "value": value,
        **extra,
    }


BASE = {
    "model": {"name": "mlp", "options": {"depth": 6, "width": 64}},
    "data": {"name": "digits", "options": {}, "probe_batch": 128},
    "train": {"optimizer": "sgd", "batch_size": 64, "steps": 100, "seeds": SEEDS},
}


def _batch_size_results() -> Results:
    sizes = {"bs8": 8, "bs64": None, "bs512": 512}
    rows = []
    for norm, gap in (("batch", 0.3), ("layer", 0.0)):
        for variant in sizes:
            for seed in SEEDS:
                acc = 0.9 + SEED_OFFSET[seed] * 0.1
                small = 1.0 if variant == "bs8" else 0.0
                rows.append(_row(norm, variant, seed, 0, "test_acc", 0.1))
                rows.append(_row(norm, variant, seed, 100, "test_acc", acc))
                rows.append(
                    _row(norm, variant, seed, 100, "test_acc_batchstats", acc - gap * small)
                )
    variants = {v: ({"train.batch_size": s} if s else {}) for v, s in sizes.items()}
    return _results(rows, {**BASE, "variants": variants})


def test_fig5_one_panel_per_normalizer_solid_aggregated_dashed_batch_statistics() -> None:
    fig = E.fig5(_batch_size_results())
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title(loc="left") for ax in panels] == ["BatchNorm", "LayerNorm"]
    batch = panels[0]
    lines = [line for line in batch.get_lines() if len(line.get_xdata())]
    assert [line.get_linestyle() for line in lines] == ["-", "--"]
    for line in lines:
        assert list(line.get_xdata()) == [8, 64, 512]  # batch sizes read from the variants
    solid, dashed = (np.asarray(line.get_ydata()) for line in lines)
    assert solid == pytest.approx([0.9, 0.9, 0.9])  # the median seed
    assert dashed == pytest.approx([0.6, 0.9, 0.9])  # batch statistics of 8 lose 0.3
    assert batch.get_xscale() == "log" and len(batch.collections) == 2  # IQR bands
    # the interquartile band, not the range: 25th/75th percentiles of the 3 seeds
    band = batch.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.9 - 0.01, abs=1e-9)
    assert band.max() == pytest.approx(0.9 + 0.005, abs=1e-9)
    assert "interquartile" in fig.texts[-1].get_text()


def test_fig5_needs_variants_with_different_batch_sizes() -> None:
    results = _batch_size_results()
    plain = results.metrics.drop(columns="variant")
    with pytest.raises(FigureSkipped, match="variants"):
        E.fig5(Results(Path("."), plain, results.runs, pd.DataFrame(), pd.DataFrame(), {}))
    same = {**BASE, "variants": {"bs8": {}, "bs64": {}, "bs512": {}}}
    with pytest.raises(FigureSkipped, match="two training batch sizes"):
        E.fig5(_results(results.metrics.drop(columns="selected").to_dict("records"), same))


def test_renorm_figure_one_panel_per_variant_named_from_its_settings() -> None:
    variants = {
        "iid": {},
        "micro4": {"model.norm_options.default.norm_batch": 4},
        "noniid": {"train.sampler": {"kind": "labels", "labels_per_batch": 4, "per_label": 8}},
    }
    rows = [
        _row(norm, v, seed, step, metric, 0.5 + step / 400 + SEED_OFFSET[seed] / 10)
        for norm in ("batch", "batch-renorm")
        for v in variants
        for seed in SEEDS
        for step in (0, 100, 200)
        for metric in ("test_acc", "test_acc_batchstats")
    ]
    fig = E.fig_renorm(
        _results(rows, {**BASE, "train": {**BASE["train"], "batch_size": 32}, "variants": variants})
    )
    panels = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title(loc="left") for ax in panels]
    assert titles == [
        "iid: i.i.d. batches of 32",
        "micro4: batches of 32 normalized in microbatches of 4",
        "noniid: non-i.i.d., 4 labels x 8 per batch",
    ]
    for ax in panels:
        lines = [line for line in ax.get_lines() if len(line.get_xdata())]
        assert len(lines) == 4  # 2 normalizers x (eval mode, training mode)
        colors = {matplotlib.colors.to_hex(line.get_color()) for line in lines}
        assert colors == {style.color("batch"), style.color("batch-renorm")}
    without = [r for r in rows if r["normalizer"] == "batch"]
    with pytest.raises(FigureSkipped, match="batch-renorm"):
        E.fig_renorm(_results(without, {**BASE, "variants": variants}))


def test_balnorm_figure_draws_each_setting_once() -> None:
    variants = {
        "whole": {},
        "quarter": {
            "normalizers": ["balanced"],
            "model.norm_options.balanced": {"stat_fraction": 0.25},
        },
    }
    rows = []
    for norm, v in (("balanced", "whole"), ("balanced", "quarter"), ("batch", "whole")):
        for seed in SEEDS:
            for step in (0, 50, 100):
                for metric in ("train_loss", "test_loss", "train_acc", "test_acc"):
                    rows.append(_row(norm, v, seed, step, metric, 1.0 / (1 + step + seed)))
    fig = E.fig_balnorm(_results(rows, {**BASE, "variants": variants}))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 4
    for ax in panels:
        lines = [line for line in ax.get_lines() if len(line.get_xdata())]
        assert [line.get_linestyle() for line in lines] == ["-", "-", "--"]
    assert [ax.get_yscale() for ax in panels] == ["log", "log", "linear", "linear"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["BatchNorm", "BalNorm", "BalNorm, quarter-batch statistics"]
    with pytest.raises(FigureSkipped, match="balanced"):
        E.fig_balnorm(_results([r for r in rows if r["normalizer"] == "batch"], BASE))


def test_regnorm_mean_figure_one_panel_per_normalizer_one_line_per_layer() -> None:
    rows = [
        _row(norm, "x", seed, step, "batch_mean_sq", value, layer=f"l{d}", depth=d)
        for norm, decay in (("regnorm", 0.9), ("layer", 0.0))
        for seed in SEEDS
        for step in (0, 50, 100)
        for d in (1, 2, 3)
        for value in [0.5 * (1 - decay) ** (step / 50) + 1e-6]
    ]
    for row in rows:
        row["variant"] = None
    fig = E.fig_regnorm_mean(
        _results(rows, {**BASE, "train": {**BASE["train"], "regnorm_lambda": 0.1}})
    )
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title(loc="left") for ax in panels] == ["LayerNorm", "RegNorm"]
    for ax in panels:
        assert ax.get_yscale() == "log"
        assert len([line for line in ax.get_lines() if len(line.get_xdata())]) == 3
    regnorm = [line for line in panels[1].get_lines() if len(line.get_xdata())][0]
    assert regnorm.get_ydata()[-1] < 0.02 * regnorm.get_ydata()[0]


def test_plot_results_skips_the_experiment_figures_for_other_analyses(tmp_path: Path) -> None:
    rows = [_row("layer", "x", 0, s, "test_acc", 0.5) for s in (0, 10)]
    results = _results(rows, BASE)
    results.metrics = results.metrics.drop(columns="variant")
    report = plot_results(
        results, tmp_path, only=["fig5", "figA_renorm", "figA_balnorm", "figA_regnorm_mean"]
    )
    assert report.written == {}
    assert set(report.skipped) == {"fig5", "figA_renorm", "figA_balnorm", "figA_regnorm_mean"}


def _transformer_results() -> Results:
    rows = []
    lines = {("none", "pre"): 20.0, ("layer", "pre"): 12.0, ("prelayer", "pre"): 11.5}
    lines[("layer", "post")] = 12.5
    for (norm, variant), final in lines.items():
        for seed in SEEDS:
            for step in (0, 50, 100):
                ppl = 256 * (final / 256) ** (step / 100) * (1 + SEED_OFFSET[seed] / 10)
                rows.append(_row(norm, variant, seed, step, "test_perplexity", ppl))
            for depth in range(4):
                value = 0.9 - 0.1 * depth + SEED_OFFSET[seed] / 10
                layer = "input" if depth == 0 else f"blocks.{depth - 1}.mlp.act"
                rows.append(
                    _row(
                        norm,
                        variant,
                        seed,
                        0,
                        "repr_corr_independent",
                        value,
                        layer=layer,
                        depth=depth,
                    )
                )
            for step in (0, 50, 100):
                rows.append(
                    _row(norm, variant, seed, step, "outlier_ratio", 2.0 + step / 50, index=10)
                )
    config = {
        "model": {"name": "transformer", "options": {"depth": 3, "width": 32}},
        "data": {"name": "text", "options": {}, "probe_batch": 64},
        "train": {"optimizer": "adam", "batch_size": 32, "steps": 100, "seeds": SEEDS},
        "variants": {"pre": {}, "post": {"model.options.placement": "post"}},
    }
    return _results(rows, config)


def test_transformer_figure_three_panels_one_line_per_normalizer_and_placement(tmp_path) -> None:
    data = _transformer_results()
    fig = E.fig_transformer(data)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 3
    ppl, rep, ratio = axes
    assert [len([ln for ln in ax.get_lines() if len(ln.get_xdata())]) for ax in axes] == [4] * 3
    assert ppl.get_yscale() == "log" and ratio.get_yscale() == "log"
    assert ratio.get_ylabel() == "λ1 / λ10"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    # the zoo's legend order, pre-LN before post-LN
    assert labels == [
        "LayerNorm, pre-LN",
        "LayerNorm, post-LN",
        "PreLayerNorm, pre-LN",
        "no normalization",
    ]
    dashed = [ln for ln in ppl.get_lines() if ln.get_linestyle() == "--" and len(ln.get_xdata())]
    assert len(dashed) == 1  # post-LN
    # the median line: seed offsets -0.2, 0, +0.1 -> the median is seed 1's curve
    none = [ln for ln in ppl.get_lines() if ln.get_color() == style.color("none")][0]
    assert none.get_ydata()[-1] == pytest.approx(20.0)
    caption = fig.texts[-1].get_text()
    assert "final median test perplexity" in caption and "PreLayerNorm, pre-LN 11.50" in caption
    report = plot_results(data, tmp_path, only=["figT_transformer"])
    assert list(report.written) == ["figT_transformer"]
    assert (tmp_path / "figT_transformer.png").exists()
