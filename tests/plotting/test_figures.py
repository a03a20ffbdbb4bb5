"""Every figure on a small synthetic results table: files written, panels and lines as expected."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from normprobe.cli import main  # noqa: E402
from normprobe.plotting import figures as F  # noqa: E402
from normprobe.plotting import style  # noqa: E402
from normprobe.plotting.gallery import FIGURES, figure_name, model_variant, plot_results  # noqa: E402
from normprobe.results import Results, load_results  # noqa: E402

NORMS = ["batch", "layer", "none"]
SEEDS = [0, 1]
STEPS = [0, 25, 50, 100]
DEPTHS = 4


def _manifest(model: dict) -> dict:
    return {
        "config": {
            "model": model,
            "data": {"name": "digits", "options": {"size": 8}},
            "train": {"optimizer": "sgd", "batch_size": 32, "steps": 100, "seeds": SEEDS},
        }
    }


def _synthetic(model: dict | None = None, *, hessian: bool = True) -> Results:
    """A results table shaped like analyze's: probes per layer, accuracy, Hessian pieces."""
    rng = np.random.default_rng(0)
    rows, nodes = [], []
    for n, norm in enumerate(NORMS):
        for seed in SEEDS:
            run = f"{norm}_lr0.1_seed{seed}"
            ident = {"run": run, "normalizer": norm, "lr": 0.1, "seed": seed, "selected": True}
            for step in STEPS:
                for depth in range(DEPTHS + 1):
                    for metric, value in (
                        ("repr_corr_noise", 1 - 0.1 * depth * (n + 1) * rng.uniform(0.8, 1)),
                        ("grad_corr", 0.2 + 0.1 * n + 0.01 * depth),
                        ("grad_norm", 10.0 ** (-n + 0.3 * depth)),
                    ):
                        if metric != "repr_corr_noise" and depth == 0:
                            continue
                        rows.append(
                            {
                                **ident,
                                "step": step,
                                "layer": f"l{depth}",
                                "depth": float(depth),
                                "metric": metric,
                                "value": value,
                            }
                        )
                flat = {"test_acc": 0.1 + step / 120, "outlier_ratio": 2.0 + n + step / 50}
                for metric, value in flat.items():
                    rows.append(
                        {
                            **ident,
                            "step": step,
                            "layer": None,
                            "depth": np.nan,
                            "metric": metric,
                            "value": value,
                        }
                    )
                if hessian:
                    for index in (1, 2):
                        rows.append(
                            {
                                **ident,
                                "step": step,
                                "layer": None,
                                "depth": np.nan,
                                "metric": "eigenvalue",
                                "index": index,
                                "value": 5.0 / index + n,
                            }
                        )
                    for vector in (0, 1):
                        for i, node in enumerate(np.linspace(-1, 5 + n, 8)):
                            nodes.append(
                                {
                                    **ident,
                                    "step": step,
                                    "metric": "slq_node",
                                    "index": i,
                                    "vector": vector,
                                    "value": node,
                                    "weight": 1 / 8,
                                }
                            )
    model = model or {"name": "wrn", "options": {"depth": 14, "widen": 1, "skip": False}}
    runs = pd.DataFrame(
        [
            {
                "run": f"{n}_lr0.1_seed{s}",
                "normalizer": n,
                "lr": 0.1,
                "seed": s,
                "status": "done",
                "selected": True,
            }
            for n in NORMS
            for s in SEEDS
        ]
    )
    return Results(
        directory=Path("."),
        metrics=pd.DataFrame(rows),
        runs=runs,
        hessian_nodes=pd.DataFrame(nodes),
        hessian_density=pd.DataFrame(),
        manifest=_manifest(model),
    )


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


LINE_FIGURES = ["fig1a", "fig1b", "fig2a", "fig2b", "fig3a", "fig3b", "fig3c", "fig6a", "fig6b"]


@pytest.mark.parametrize("name", LINE_FIGURES)
def test_line_figure_has_one_styled_line_per_normalizer_and_writes_a_file(
    name: str, tmp_path: Path
) -> None:
    results = _synthetic()
    ax = getattr(F, name)(results)
    fig = ax.figure
    assert len(fig.axes) == 1
    lines = ax.get_lines()
    assert len(lines) == len(NORMS)
    by_color = {matplotlib.colors.to_hex(line.get_color()): line for line in lines}
    for norm in NORMS:
        line = by_color[style.color(norm)]
        assert line.get_marker() == style.marker(norm)
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [style.label(n) for n in NORMS]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(loc="left")
    # two seeds: a shaded band per normalizer
    assert len(ax.collections) == len(NORMS)
    path = tmp_path / f"{name}.png"
    with style.style_context():
        fig.savefig(path)
    assert path.stat().st_size > 1000


def test_log_scales_where_quantities_span_decades() -> None:
    results = _synthetic()
    assert F.fig2b(results).get_yscale() == "log"
    assert F.fig6a(results).get_yscale() == "log"
    assert F.fig6b(results).get_yscale() == "log"
    assert F.fig2a(results).get_yscale() == "linear"


def test_depth_profile_uses_step_zero_and_through_training_every_step() -> None:
    results = _synthetic()
    ax = F.fig1a(results)
    xs = np.concatenate([line.get_xdata() for line in ax.get_lines()])
    assert set(xs) == set(range(DEPTHS + 1))
    ax = F.fig3a(results)
    assert set(ax.get_lines()[0].get_xdata()) == set(STEPS)


def test_fig4_has_one_log_panel_per_normalizer_with_a_shared_x_axis(tmp_path: Path) -> None:
    fig = F.fig4(_synthetic())
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == len(NORMS)
    assert [ax.get_title(loc="left") for ax in visible] == [style.label(n) for n in NORMS]
    for ax in visible:
        assert ax.get_yscale() == "log"
        assert ax.get_xlim() == visible[0].get_xlim()
        data_lines = [line for line in ax.get_lines() if len(line.get_xdata()) > 2]
        assert len(data_lines) == 1
    assert "step 50" in fig._suptitle.get_text()
    path = tmp_path / "fig4.png"
    with style.style_context():
        fig.savefig(path)
    assert path.stat().st_size > 1000


def test_names_outside_the_zoo_get_distinct_styles_that_hold_across_figures() -> None:
    """A user's own models, named by their runs or normalizer=: one line each, told apart by
    color and marker (all used to share one grey dot), the same in every figure."""
    results = _synthetic()
    names = {"batch": "my-resnet-bn", "layer": "my-resnet-ln", "none": "my-resnet-plain"}
    for table in (results.metrics, results.runs, results.hessian_nodes):
        table["normalizer"] = table["normalizer"].map(names)
    ax = F.fig3c(results)
    lines = ax.get_lines()
    styles = {(matplotlib.colors.to_hex(line.get_color()), line.get_marker()) for line in lines}
    assert len(lines) == 3 and len(styles) == 3
    for name in names.values():
        assert name not in style.NORM_STYLE
        assert (style.color(name), style.marker(name)) in styles
        assert style.label(name) == name
    again = F.fig1b(results).get_lines()
    assert {(matplotlib.colors.to_hex(line.get_color()), line.get_marker()) for line in again} == (
        styles
    )
    zoo = {(style.color(n), style.marker(n)) for n in style.NORM_STYLE}
    assert styles.isdisjoint(zoo)


def test_every_normalizer_has_a_distinct_color_and_marker_pair() -> None:
    from normprobe.norms import normalizers

    pairs = [(style.color(n), style.marker(n)) for n in normalizers()]
    assert len(set(pairs)) == len(pairs)
    assert all(n in style.NORM_STYLE for n in normalizers())
    # seaborn refuses to mix filled and line-art markers in one plot
    from matplotlib.markers import MarkerStyle

    assert all(MarkerStyle(style.marker(n)).is_filled() for n in normalizers())


@pytest.mark.parametrize(
    ("model", "variant", "drawn"),
    [
        ({"name": "mlp", "options": {}}, "mlp", {"fig1a", "fig1b", "fig3a_mlp", "fig4_mlp"}),
        ({"name": "wrn", "options": {"skip": False}}, "wrn", {"fig2a", "fig2b", "fig4", "fig6b"}),
        ({"name": "wrn", "options": {}}, "wrn-skip", {"fig2a_skip", "fig2b_skip", "fig4_skip"}),
    ],
)
def test_plot_results_names_figures_after_the_model(
    model: dict, variant: str, drawn: set[str], tmp_path: Path
) -> None:
    results = _synthetic(model)
    assert model_variant(results) == variant
    formats = "png,pdf" if variant == "mlp" else "png"
    report = plot_results(results, tmp_path, formats=formats)
    assert drawn <= set(report.written)
    for paths in report.written.values():
        assert [p.suffix for p in paths] == ["." + f for f in formats.split(",")]
        assert all(p.stat().st_size > 0 for p in paths)
    assert len(report.written) + len(report.skipped) == len(FIGURES)
    # a figure not drawn for this model is skipped under its base name (it has no other here)
    names = {figure_name(s, variant) if variant in s.variants else s.base for s in FIGURES}
    assert names == set(report.written) | set(report.skipped)


def test_missing_metrics_are_skipped_with_the_reason(tmp_path: Path) -> None:
    results = _synthetic(hessian=False)
    results.metrics = results.metrics[results.metrics["metric"] != "grad_corr"]
    results.hessian_nodes = pd.DataFrame()
    report = plot_results(results, tmp_path, only=["fig2a", "fig2b", "fig3c", "fig4", "fig6b"])
    assert set(report.written) == {"fig2a", "fig2b"}
    assert "grad_corr" in report.skipped["fig3c"]
    assert "Hessian" in report.skipped["fig4"]
    assert "eigenvalue" in report.skipped["fig6b"]


def test_a_figure_for_another_model_is_skipped_in_the_words_of_a_config(tmp_path: Path) -> None:
    """`wrn-skip` is no name a user writes: the reasons say model wrn with options.skip."""
    report = plot_results(
        _synthetic({"name": "wrn", "options": {}}, hessian=False),
        tmp_path,
        only=["fig1a", "figT_transformer", "fig2a_skip"],
    )
    assert list(report.written) == ["fig2a_skip"]
    assert report.skipped == {
        "fig1a": "drawn for model mlp or a model.factory of your own; these results are of "
        "model wrn with options.skip: true",
        "figT_transformer": "drawn for model transformer; these results are of model wrn with "
        "options.skip: true",
    }
    report = plot_results(_synthetic(hessian=False), tmp_path, only=["fig2a_skip", "fig3a_mlp"])
    assert report.skipped == {
        "fig2a_skip": "the name for results of model wrn with options.skip: true; these are of "
        "model wrn with options.skip: false; ask for fig2a",
        "fig3a_mlp": "the name for results of model mlp; these are of model wrn with "
        "options.skip: false; ask for fig3a",
    }
    assert not any("wrn-skip" in reason for reason in report.skipped.values())


def _write_results_dir(results: Results, directory: Path) -> None:
    directory.mkdir()
    results.metrics.to_parquet(directory / "results.parquet", index=False)
    (directory / "manifest.json").write_text(json.dumps(results.manifest))
    lines = "".join(json.dumps(r) + "\n" for r in results.runs.to_dict("records"))
    (directory / "runs.jsonl").write_text(lines)


def test_cli_plot_on_a_directory_with_missing_metrics_skips_instead_of_failing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _synthetic(hessian=False)
    keep = results.metrics["metric"].isin(["repr_corr_noise", "test_acc"])
    results.metrics = results.metrics[keep]
    _write_results_dir(results, tmp_path / "res")
    assert load_results(tmp_path / "res").hessian_nodes.empty
    out = tmp_path / "figs"
    assert main(["plot", str(tmp_path / "res"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote fig2a" in printed
    assert "skipped fig2b: no 'grad_norm' rows" in printed
    assert "skipped fig4:" in printed
    # the properties heatmap reads test accuracy and representation correlation too
    assert sorted(p.name for p in out.iterdir()) == [
        "fig2a.png",
        "fig3a.png",
        "fig3b.png",
        "normprobe-figures.json",  # which results they were drawn from
        "properties.png",
    ]


def test_cli_plot_rejects_an_unknown_format_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_results_dir(_synthetic(), tmp_path / "res")
    assert main(["plot", str(tmp_path / "res"), "--format", "jpg"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "png, pdf, svg" in err


def test_cli_figures_names_an_unknown_group(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["figures", "--only", "fig9", "--plot-only"]) == 2
    assert "fig1_mlp_init" in capsys.readouterr().err


def test_every_group_has_a_quick_and_a_paper_config_that_validate() -> None:
    from normprobe.config import load_config
    from normprobe.figureset import GROUPS, config_path

    root = Path(__file__).resolve().parents[2] / "analyses"
    for group in GROUPS:
        quick, _ = load_config(config_path(root, group.name, "quick"))
        paper, _ = load_config(config_path(root, group.name, "paper"))
        if quick.model.name == "transformer":  # language models: text at both scales
            assert quick.data.name == paper.data.name == "text"
            assert paper.model.options["width"] > quick.model.options["width"]
        else:
            assert quick.data.name == "digits"
            assert paper.data.name in ("mnist", "cifar10")
        assert paper.train.steps >= quick.train.steps
        assert list(paper.variants) == list(quick.variants)  # the same figure panels


# ------------------------------------------------ what `normprobe plot` says it drew


def _results_dir(directory: Path, model: dict, config_hash: str, name: str = "a") -> Path:
    """A results folder of the synthetic tables, its manifest naming the analysis and hash."""
    results = _synthetic(model, hessian=False)
    results.manifest["config_hash"] = config_hash
    results.manifest["config"]["name"] = name
    _write_results_dir(results, directory)
    return directory


WRN = {"name": "wrn", "options": {"skip": False}}
MLP = {"name": "mlp", "options": {}}


def _one_line_error(code: int, capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("normprobe: error: ") and err.count("\n") == 1, err
    return err


def test_cli_plot_of_results_whose_every_run_failed_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    res = tmp_path / "res"
    res.mkdir()
    (res / "manifest.json").write_text(json.dumps({"config_hash": "h", **_manifest(WRN)}))
    failed = [
        {
            "run": f"{n}_lr0.1_seed0",
            "normalizer": n,
            "lr": 0.1,
            "seed": 0,
            "status": "failed",
            "error": "RuntimeError: CUDA out of memory\nTraceback ...",
        }
        for n in NORMS
    ]
    (res / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in failed))
    out = tmp_path / "figs"
    err = _one_line_error(main(["plot", str(res), "--out", str(out)]), capsys)
    assert (
        "no figure drawn: every run in" in err and "(3 of 3; the first: RuntimeError: CUDA" in err
    )
    assert "runs.jsonl" in err and "normprobe analyze" in err
    assert not out.exists()  # nothing drawn, no folder left behind


def test_cli_plot_with_only_figures_the_results_cannot_support_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    res = _results_dir(tmp_path / "res", WRN, "h")
    out = tmp_path / "figs"
    code = main(["plot", str(res), "--out", str(out), "--only", "fig1a,fig4_skip"])
    printed = capsys.readouterr()
    assert code == 2, printed.err
    assert "--only names (fig1a, fig4_skip" in printed.err and "leave out --only" in printed.err
    # each figure's reason, in the words of a config
    assert "skipped fig1a: drawn for model mlp or a model.factory of your own" in printed.out
    assert "skipped fig4_skip: the name for results of model wrn with options.skip: true" in (
        printed.out
    )
    assert "; ask for fig4\n" in printed.out
    assert not out.exists()
    # one figure drawn is a success, the others' reasons said
    assert main(["plot", str(res), "--out", str(out), "--only", "fig1a,fig2a"]) == 0
    assert "skipped fig1a:" in capsys.readouterr().out


def test_a_second_analysis_is_not_plotted_among_the_first_ones_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _results_dir(tmp_path / "first", WRN, "h1", "wrn_init")
    second = _results_dir(tmp_path / "second", MLP, "h2", "mlp_init")
    out = tmp_path / "figs"
    assert main(["plot", str(first), "--out", str(out), "--only", "fig2a,fig2b"]) == 0
    drawn = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert {"fig2a.png", "fig2b.png"} <= set(drawn)
    capsys.readouterr()

    err = _one_line_error(main(["plot", str(second), "--out", str(out), "--only", "fig1a"]), capsys)
    assert (
        f"drawn from {str(first.resolve())!r} (analysis wrn_init, config hash h1), not from" in err
    )
    assert f"{str(second.resolve())!r} (analysis mlp_init, config hash h2)" in err
    assert "--out" in err and "--force" in err and "2 figure files" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == drawn  # untouched

    # the same results again: the normal redraw
    assert main(["plot", str(first), "--out", str(out), "--only", "fig2a"]) == 0

    # --force: the first results' figures go once the second's are drawn; nothing else does
    (out / "notes.txt").write_text("mine\n")
    (out / "fig2b.png").write_bytes(b"edited by hand")
    capsys.readouterr()
    assert main(["plot", str(second), "--out", str(out), "--only", "fig1a", "--force"]) == 0
    printed = capsys.readouterr().out
    assert "removed 1 figure file of other results: fig2a.png" in printed
    assert f"kept {out / 'fig2b.png'}" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "fig1a.png",
        "fig2b.png",
        "normprobe-figures.json",
        "notes.txt",
    ]
    record = json.loads((out / "normprobe-figures.json").read_text())
    assert [
        (s["results"], s["config_hash"], s["name"], list(s["files"])) for s in record["sources"]
    ] == [("../second", "h2", "mlp_init", ["fig1a.png"])]


def test_results_replaced_by_another_config_are_not_plotted_over_their_old_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    res = _results_dir(tmp_path / "res", WRN, "h1")
    assert main(["plot", str(res), "--only", "fig2a"]) == 0  # into res/figures
    manifest = json.loads((res / "manifest.json").read_text())
    (res / "manifest.json").write_text(json.dumps({**manifest, "config_hash": "h2"}))
    capsys.readouterr()
    err = _one_line_error(main(["plot", str(res), "--only", "fig2b"]), capsys)
    assert "when it held another analysis' results (config hash h1; now h2)" in err
    assert sorted(p.name for p in (res / "figures").iterdir()) == [
        "fig2a.png",
        "normprobe-figures.json",
    ]


def test_figures_no_record_accounts_for_are_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    res = _results_dir(tmp_path / "res", WRN, "h")
    out = tmp_path / "paper"
    out.mkdir()
    (out / "fig3a.png").write_bytes(b"drawn before the record, from who knows what")
    err = _one_line_error(main(["plot", str(res), "--out", str(out), "--only", "fig2a"]), capsys)
    assert "no record ties to any results (fig3a.png" in err and "delete those files" in err
    code = main(["plot", str(res), "--out", str(out), "--only", "fig2a", "--force"])
    assert code == 2 and not (out / "fig2a.png").exists()
    assert (out / "fig3a.png").read_bytes().startswith(b"drawn before")
    # the results' own figures folder holds nothing but their figures: drawn there
    (res / "figures").mkdir()
    (res / "figures" / "fig3a.png").write_bytes(b"an older normprobe drew this")
    assert main(["plot", str(res), "--only", "fig2a"]) == 0


def test_the_figure_set_records_its_groups_and_keeps_other_results_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from normprobe.figureset import regenerate

    analyses = Path(__file__).resolve().parents[2] / "analyses"
    runs = tmp_path / "runs"
    runs.mkdir()
    group = _results_dir(runs / "fig2_wrn_init", WRN, "g")
    out = tmp_path / "figures"
    for _ in range(2):  # a second call redraws the same folder
        report = regenerate(
            analyses=analyses,
            runs=runs,
            out=out,
            groups=["fig2_wrn_init"],
            plot_only=True,
            log=lambda line: None,
        )
        assert not report.failed and report.written
    record = json.loads((out / "normprobe-figures.json").read_text())
    assert [s["results"] for s in record["sources"]] == ["../runs/fig2_wrn_init"]
    assert main(["plot", str(group), "--out", str(out), "--only", "fig2a"]) == 0
    other = _results_dir(tmp_path / "other", MLP, "o")
    capsys.readouterr()
    err = _one_line_error(main(["plot", str(other), "--out", str(out), "--only", "fig1a"]), capsys)
    assert "fig2_wrn_init" in err
