"""The measured properties table: Rao & Sohl-Dickstein's Table 2, filled from measurements.

(Over 500 lines on purpose: ten criteria, each a quantity, a rule and the
function that measures it from the results, and the table that judges them;
a criterion reads best next to the others and their shared row selection.)

Rao & Sohl-Dickstein 2020 summarises normalizers by ten qualitative properties and fills its
Table 2 by hand. :func:`judge_properties` fills it from an analysis' stored
results (``analyses/properties.yaml`` runs everything it reads); this module
only reads them. :func:`normprobe.measure_properties` adds what the results
cannot hold: a row for every normalizer in the zoo and the leak along the
time axis, measured on the normalizers themselves. Each cell is a verdict
(``+``, ``-``, or ``not measured`` when the results lack what the criterion
reads) next to the measured number. :data:`CRITERIA` writes down, for each property, the
quantity, the comparison and the threshold; they are the table's footnotes.

Thresholds are of two kinds:

- *exact*: a structural property that is zero by construction when it holds
  (batch dependence, train/eval gap, leakage along the time axis), tested
  against a float tolerance of ``1e-6`` (relative);
- *relative*: a number compared with the ``none`` and ``batch`` rows of the
  same results, so the table reads the same at quick and paper scale. With
  ``g`` the better and ``b`` the worse of those two (in the direction the
  property asks for), the threshold is their midpoint when they differ by at
  least the criterion's ``floor``, else ``g - floor``; a normalizer gets ``+``
  when its number is on ``g``'s side of the threshold (inclusive). So ``+``
  means "at least halfway from the worse reference to the better one".

Numbers are medians over seeds at the learning rate selected per normalizer
(and variant). Runs with a ``variant`` column are read from the ``main``
variant, and "allow training deeper networks" from the ``deep`` variant.

>>> import pandas as pd
>>> rows = [("none", 0.80), ("batch", 0.98), ("layer", 0.95), ("weight", 0.85)]
>>> metrics = pd.DataFrame([{"run": f"{n}_s0", "normalizer": n, "seed": 0, "step": 300,
...     "layer": None, "depth": None, "metric": "test_acc", "value": v} for n, v in rows])
>>> table = judge_properties(metrics, properties=["training"], normalizers=[n for n, _ in rows])
>>> table.cells[["normalizer", "verdict", "threshold"]].values.tolist()
[['none', '-', 0.89], ['batch', '+', 0.89], ['layer', '+', 0.89], ['weight', '-', 0.89]]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from normprobe.errors import NormprobeError
from normprobe.results import Results, final_rows, load_results, lr_note, selected_rows

__all__ = [
    "CRITERIA",
    "PAPER",
    "Criterion",
    "PropertyTable",
    "PropertiesError",
    "judge_properties",
    "agrees_with_paper",
    "relative_threshold",
]

NOT_MEASURED = "not measured"
EXACT_TOL = 1e-6
Verdict = Literal["+", "-", "not measured"]


class PropertiesError(NormprobeError, ValueError):
    """Results that cannot be turned into a properties table; the message says why."""


@dataclass(frozen=True)
class Criterion:
    """How one property of Table 2 is measured and judged.

    ``measure(metrics)`` returns one row per normalizer it could measure with
    columns ``normalizer``, ``value`` (the number judged), ``shown`` (the
    number as the table prints it) and optionally ``verdict`` (exact
    criteria); relative criteria get their verdict from ``direction`` and
    ``floor`` (module docstring).
    """

    key: str
    title: str
    short: str
    quantity: str
    rule: str
    reads: str
    measure: Callable[[pd.DataFrame], pd.DataFrame]
    direction: Literal["higher", "lower", "exact"] = "exact"
    floor: float = 0.0
    #: the variant whose selected learning rate the verdict rests on (None: it reads only
    #: step 0 or the normalizer itself, so no learning rate)
    lr_variant: str | None = "main"


# --------------------------------------------------------------------------- row selection


def _main(metrics: pd.DataFrame, variant: str = "main") -> pd.DataFrame:
    """Rows of the selected learning rate, of ``variant`` when the runs have variants."""
    rows = selected_rows(metrics)
    if "variant" in rows and rows["variant"].notna().any():
        rows = rows[rows["variant"] == variant]
    elif variant != "main":
        return rows.iloc[0:0]
    return rows


def _metric(metrics: pd.DataFrame, metric: str, variant: str = "main") -> pd.DataFrame:
    rows = _main(metrics, variant)
    return rows[rows["metric"] == metric]


def _per_normalizer(per_run: pd.DataFrame) -> pd.DataFrame:
    """Median over seeds (runs) of ``value`` per normalizer."""
    if per_run.empty:
        return pd.DataFrame(columns=["normalizer", "value"])
    return per_run.groupby("normalizer", sort=False)["value"].median().reset_index()


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or not np.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) < 10 ** -(digits - 1) or abs(value) >= 1e4:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


# --------------------------------------------------------------------------- the measurements


def _scaling(metrics: pd.DataFrame) -> pd.DataFrame:
    sq = _metric(metrics, "signal_sq_mean")
    var = _metric(metrics, "signal_var")
    if sq.empty or var.empty:
        return pd.DataFrame()
    keys = ["run", "normalizer", "step", "layer"]
    both = sq[sq["step"] == 0].merge(var[var["step"] == 0], on=keys, suffixes=("_sq", "_var"))
    if both.empty:
        return pd.DataFrame()
    both["q"] = both["value_sq"] + both["value_var"]
    both["log_q"] = np.log10(both["q"].where(both["q"] > 0))
    both["centring"] = both["value_sq"] / both["q"].where(both["q"] > 0)
    per_run = both.groupby(["run", "normalizer"], sort=False).agg(
        spread=("log_q", lambda s: s.max() - s.min()), centring=("centring", "max")
    )
    per_run = per_run.groupby("normalizer", sort=False).median().reset_index()
    ok = (per_run["spread"] <= 1.0) & (per_run["centring"] <= 0.5)
    return pd.DataFrame(
        {
            "normalizer": per_run["normalizer"],
            "value": per_run["spread"],
            "shown": [
                f"{_fmt(s, 2)} dec / {_fmt(c, 2)}"
                for s, c in zip(per_run["spread"], per_run["centring"], strict=True)
            ],
            "verdict": np.where(ok, "+", "-"),
        }
    )


def _training(metrics: pd.DataFrame) -> pd.DataFrame:
    acc = _metric(metrics, "test_acc")
    if acc.empty:
        return pd.DataFrame()
    final = _per_normalizer(final_rows(acc)[["normalizer", "value"]])
    later = acc[acc["step"] > 0]
    if later["step"].nunique() < 2:  # one step after init: its mean is the final accuracy
        final["shown"] = [_fmt(v) for v in final["value"]]
        return final
    speed = _per_normalizer(later.groupby(["run", "normalizer"])["value"].mean().reset_index())
    out = final.merge(speed, on="normalizer", how="left", suffixes=("", "_mean"))
    out["shown"] = [
        _fmt(v) if not np.isfinite(m) else f"{_fmt(v)} (mean {_fmt(m)})"
        for v, m in zip(out["value"], out["value_mean"], strict=True)
    ]
    out["second"] = out["value_mean"]
    return out.drop(columns="value_mean")


def _depth(metrics: pd.DataFrame) -> pd.DataFrame:
    acc = _metric(metrics, "test_acc", variant="deep")
    if acc.empty:
        return pd.DataFrame()
    out = _per_normalizer(final_rows(acc)[["normalizer", "value"]])
    out["shown"] = [_fmt(v) for v in out["value"]]
    return out


def _outliers(metrics: pd.DataFrame) -> pd.DataFrame:
    ratio = _metric(metrics, "outlier_ratio")
    ratio = ratio[(ratio["step"] > 0) & (ratio["value"] > 0)]
    if ratio.empty:
        return pd.DataFrame()
    ratio = ratio.assign(value=np.log10(ratio["value"]))
    out = _per_normalizer(ratio.groupby(["run", "normalizer"])["value"].median().reset_index())
    out["shown"] = [_fmt(10**v, 3) for v in out["value"]]
    return out


def _exact(metrics: pd.DataFrame, metric: str, mode: str | None = None) -> pd.DataFrame:
    rows = _main(metrics)
    rows = rows[rows["metric"] == metric]
    if mode is not None and "mode" in rows:
        rows = rows[rows["mode"] == mode]
    if rows.empty:
        return pd.DataFrame()
    worst = rows.groupby("normalizer", sort=False)["value"].max().reset_index()
    worst["shown"] = [_fmt(v, 2) for v in worst["value"]]
    worst["verdict"] = np.where(worst["value"] <= EXACT_TOL, "+", "-")
    return worst


def _batch_size(metrics: pd.DataFrame) -> pd.DataFrame:
    train = _exact(metrics, "batch_dependence", "train")
    if train.empty:
        return train
    evals = _exact(metrics, "batch_dependence", "eval")
    if not evals.empty:
        e = dict(zip(evals["normalizer"], evals["value"], strict=True))
        train["shown"] = [
            f"{s} (eval {_fmt(e[n], 2)})" if n in e else s
            for n, s in zip(train["normalizer"], train["shown"], strict=True)
        ]
    return train


def _train_test(metrics: pd.DataFrame) -> pd.DataFrame:
    rows = _main(metrics)
    rows = rows[(rows["layer"] == "output") & (rows["metric"] == "train_eval_gap")]
    # after training: at init the running statistics have not seen any data yet
    return _exact(
        rows[rows["step"] == rows.groupby("run")["step"].transform("max")], "train_eval_gap"
    )


def _confusion(metrics: pd.DataFrame) -> pd.DataFrame:
    corr = _metric(metrics, "grad_corr")
    corr = corr[corr["step"] > 0]
    if corr.empty:
        return pd.DataFrame()
    per_step = corr.groupby(["run", "normalizer", "step"])["value"].mean().reset_index()
    out = _per_normalizer(per_step.groupby(["run", "normalizer"])["value"].median().reset_index())
    out["shown"] = [_fmt(v) for v in out["value"]]
    return out


#: "early training": the first third of the run's probe steps
EARLY = 1 / 3
RISE = 0.05


def _chaos_order(metrics: pd.DataFrame) -> pd.DataFrame:
    corr = _metric(metrics, "repr_corr_noise")
    if corr.empty:
        return pd.DataFrame()
    corr = corr[corr["depth"] == corr.groupby("run")["depth"].transform("max")]
    rows = []
    for (_run, norm), g in corr.groupby(["run", "normalizer"], sort=False):
        g = g.sort_values("step")
        start = g[g["step"] == 0]["value"]
        early = g[(g["step"] > 0) & (g["step"] <= EARLY * g["step"].max())]["value"]
        if start.empty or early.empty:
            continue
        rows.append(
            {"normalizer": norm, "value": early.max() - start.iloc[0], "start": start.iloc[0]}
        )
    if not rows:
        return pd.DataFrame()
    per = pd.DataFrame(rows).groupby("normalizer", sort=False).median().reset_index()
    per["shown"] = [
        f"{_fmt(s, 2)} -> +{_fmt(v, 2)}" if v >= 0 else f"{_fmt(s, 2)} -> {_fmt(v, 2)}"
        for s, v in zip(per["start"], per["value"], strict=True)
    ]
    per["verdict"] = np.where(per["value"] >= RISE, "+", "-")
    return per.drop(columns="start")


def _explosion(metrics: pd.DataFrame) -> pd.DataFrame:
    rate = _metric(metrics, "grad_growth_rate")
    rate = rate[rate["step"] == 0]
    if rate.empty:
        return pd.DataFrame()
    out = _per_normalizer(rate[["normalizer", "value"]])
    out["shown"] = [_fmt(v) for v in out["value"]]
    return out


def _sequential(leaks: Mapping[str, float] | None, normalizers: Sequence[str]) -> pd.DataFrame:
    """The sequence criterion from the leaks measured on the normalizers themselves."""
    known = [n for n in normalizers if leaks is not None and n in leaks]
    values = [float(leaks[n]) for n in known] if leaks is not None else []
    return pd.DataFrame(
        {
            "normalizer": known,
            "value": values,
            "shown": ["n/a (conv only)" if math.isinf(v) else _fmt(v, 2) for v in values],
            "verdict": ["+" if v <= EXACT_TOL else "-" for v in values],
        }
    )


CRITERIA: tuple[Criterion, ...] = (
    Criterion(
        "scaling",
        "Consistent scaling and centering",
        "scaling & centring",
        "at init, the pre-activations' second moment q = (mean over channels of the squared "
        "channel mean) + (mean channel variance) per depth: its spread over depth in decades "
        "(max - min of log10 q), and the largest centring fraction (squared mean) / q",
        "+ when the spread is at most 1 decade and the centring fraction at most 0.5 (channel "
        "means no larger than their spread)",
        "probes.signal at step 0",
        _scaling,
        lr_variant=None,
    ),
    Criterion(
        "training",
        "Faster training and better generalization",
        "training",
        "final test accuracy (the mean over the recorded steps after 0, for speed, in brackets)",
        "relative, higher is better, floor 0.01, applied to both numbers",
        "test accuracy through training",
        _training,
        "higher",
        0.01,
    ),
    Criterion(
        "depth",
        "Allow training deeper networks",
        "deeper nets",
        "final test accuracy of the deep variant",
        "relative, higher is better, floor 0.02",
        "the variant named deep",
        _depth,
        "higher",
        0.02,
        lr_variant="deep",
    ),
    Criterion(
        "outliers",
        "Outlier eigenvalue suppression through training",
        "outlier suppression",
        "the Hessian outlier ratio lambda_1 / lambda_K, median over the Hessian steps after 0 "
        "(judged on log10)",
        "relative, lower is better, floor 0.1 (in log10)",
        "hessian top eigenvalues after step 0",
        _outliers,
        "lower",
        0.1,
    ),
    Criterion(
        "batch_size",
        "No dependence on batch size",
        "batch-size free",
        "batch dependence in train mode (eval mode in brackets): the largest relative change of "
        "the first half of a batch's outputs, over layers and steps, when the second half is "
        "replaced",
        f"+ when at most {EXACT_TOL:g} (exactly 0 without batch statistics)",
        "probes.batch_dependence",
        _batch_size,
    ),
    Criterion(
        "train_test",
        "Consistent training and test behavior",
        "train = test",
        "the train/eval gap at the output after training (the last probe step): the relative "
        "difference between train-mode and eval-mode outputs on the same batch, largest over seeds",
        f"+ when at most {EXACT_TOL:g}",
        "probes.train_eval_gap",
        _train_test,
    ),
    Criterion(
        "sequential",
        "Easy application to sequential or recurrent models",
        "sequences",
        "leakage back in time: the relative change of a per-token layer's outputs at the first "
        "half of the positions when the later half changes (train mode, tokens of 4 sequences "
        "flattened into one batch, as a sequence model does)",
        f"+ when at most {EXACT_TOL:g}; computed from the normalizer itself, always measured",
        "the normalizer (no stored results)",
        lambda metrics: pd.DataFrame(),  # from the sequence_leaks given to judge_properties
        lr_variant=None,
    ),
    Criterion(
        "confusion",
        "Reduce gradient confusion through training",
        "less gradient confusion",
        "gradient correlation between two minibatches, mean over layers, median over the probe "
        "steps after 0",
        "relative, lower is better, floor 0.05",
        "probes.gradient_correlation after step 0",
        _confusion,
        "lower",
        0.05,
    ),
    Criterion(
        "chaos_order",
        "Transition from chaotic to ordered during early training",
        "chaos to order",
        "representation correlation (noise pairing) at the deepest probed layer: its value at "
        "init, and its largest rise over that value within the first third of the probe steps",
        f"+ when the rise is at least {RISE}",
        "probes.representation through training",
        _chaos_order,
    ),
    Criterion(
        "explosion",
        "Induces gradient explosion",
        "gradient explosion",
        "gradient-norm growth rate towards the input at init (exp of the slope of log norm "
        "against depth)",
        "relative, higher is + (it is unclear whether this is desirable), floor 0.02",
        "probes.gradient_norms at step 0",
        _explosion,
        "higher",
        0.02,
        lr_variant=None,
    ),
)

#: Rao & Sohl-Dickstein 2020, Table 2, as printed ("~": reduces gradient confusion, less than Batch Norm).
PAPER: dict[str, dict[str, str]] = {
    "batch": dict.fromkeys([c.key for c in CRITERIA], "+")
    | {"batch_size": "-", "train_test": "-", "sequential": "-"},
    "bmlv": dict.fromkeys([c.key for c in CRITERIA], "+")
    | {"batch_size": "-", "train_test": "-", "sequential": "-"},
    "layer": dict.fromkeys([c.key for c in CRITERIA], "+")
    | {"training": "-*", "outliers": "-", "confusion": "-", "explosion": "-"},
    "prelayer": dict.fromkeys([c.key for c in CRITERIA], "+")
    | {"confusion": "~", "explosion": "-"},
    "regnorm": dict.fromkeys([c.key for c in CRITERIA], "+") | {"confusion": "~", "explosion": "-"},
}
PAPER_NOTES = (
    "-* Layer Norm generalizes better in Transformers, not in deep convolutional networks (Rao & Sohl-Dickstein 2020). "
    "~ PreLayerNorm and RegNorm reduce gradient confusion, less than Batch Norm (Rao & Sohl-Dickstein 2020)."
)


def agrees_with_paper(paper: str, measured: str) -> bool:
    """Whether a measured verdict agrees with Rao & Sohl-Dickstein's (``-*`` is ``-``; ``~`` is a ``+``).

    >>> agrees_with_paper("-*", "-"), agrees_with_paper("~", "+"), agrees_with_paper("+", "-")
    (True, True, False)
    """
    return paper.rstrip("*~") == measured or (paper == "~" and measured == "+")


def relative_threshold(
    none: float, batch: float, direction: Literal["higher", "lower"], floor: float
) -> float:
    """The threshold of a relative criterion (module docstring), in the criterion's units.

    >>> relative_threshold(0.8, 1.0, "higher", 0.01)    # midpoint
    0.9
    >>> relative_threshold(0.99, 0.995, "higher", 0.01)  # too close: the better one minus the floor
    0.985
    >>> relative_threshold(3.0, 1.0, "lower", 0.1)
    2.0
    """
    sign = 1.0 if direction == "higher" else -1.0
    a, b = sign * none, sign * batch
    good, bad = max(a, b), min(a, b)
    t = (good + bad) / 2 if good - bad >= floor else good - floor
    return round(sign * t, 12)


def _passes(value: float, threshold: float, direction: str) -> bool:
    return value >= threshold if direction == "higher" else value <= threshold


# --------------------------------------------------------------------------- the table


@dataclass
class PropertyTable:
    """Verdicts and numbers per (normalizer, property), and how they were judged.

    ``cells``: one row per normalizer and property with columns
    ``normalizer, property, title, verdict, value, shown, threshold, note``.
    """

    cells: pd.DataFrame
    criteria: tuple[Criterion, ...]
    normalizers: list[str]
    source: str = ""

    def wide(
        self, what: Literal["verdict", "shown", "cell", "settled"] = "cell"
    ) -> pd.DataFrame:
        """Normalizers as rows, properties as columns: the verdict, the number, both (with
        "(not settled)" where the verdict rests on a rate at the edge of its grid), or
        whether it is settled."""
        cells = self.cells.copy()
        if "settled" not in cells:
            cells["settled"] = True
        cells["cell"] = [
            v if v == NOT_MEASURED else f"{v} {s}" + ("" if ok else " (not settled)")
            for v, s, ok in zip(cells["verdict"], cells["shown"], cells["settled"], strict=True)
        ]
        table = cells.pivot(index="normalizer", columns="property", values=what)
        return table.reindex(index=self.normalizers, columns=[c.key for c in self.criteria])

    def footnotes(self) -> list[str]:
        """One line per criterion: quantity, comparison, threshold (and the relative one used)."""
        lines = []
        for i, c in enumerate(self.criteria, start=1):
            used = self.cells[(self.cells["property"] == c.key)]["threshold"].dropna()
            where = f" (here: {_fmt(float(used.iloc[0]))})" if len(used) else ""
            lines.append(
                f"{i}. {c.title}: {c.quantity}. Verdict: {c.rule}{where}. Reads: {c.reads}."
            )
        return lines

    def to_markdown(self) -> str:
        """The table (normalizers as rows, numbered property columns) and its footnotes."""
        wide = self.wide()
        heads = [f"{c.short} ({i})" for i, c in enumerate(self.criteria, start=1)]
        lines = [
            "| normalizer | " + " | ".join(heads) + " |",
            "| --- |" + " --- |" * len(heads),
        ]
        for norm, row in wide.iterrows():
            lines.append(f"| {norm} | " + " | ".join(str(v) for v in row.tolist()) + " |")
        lines.append("")
        lines.append(
            "Each cell: the verdict, then the measured number (median over seeds). "
            "Relative criteria compare with the none and batch rows; see the module "
            "normprobe.properties."
        )
        lines.append("")
        lines.extend(self.footnotes())
        unsettled = self.unsettled()
        if unsettled:
            lines.append("")
            lines.append(
                "Not settled: a verdict marked (not settled) rests on a learning rate at the edge "
                "of its grid (the best rate may lie beyond it):"
            )
            lines.append("")
            lines.extend(f"- {line}" for line in unsettled)
        return "\n".join(lines) + "\n"

    def unsettled(self) -> list[str]:
        """One line per normalizer (and variant) whose verdicts rest on an edge rate: why."""
        cells = self.cells
        if "settled" not in cells:
            return []
        rows = cells[~cells["settled"].astype(bool)]
        out = []
        for (norm, reason), group in rows.groupby(["normalizer", "lr_note"], sort=False):
            keys = ", ".join(f"({self._number(k)})" for k in group["property"])
            out.append(f"{norm}, columns {keys}: {reason}")
        return out

    def _number(self, key: str) -> int:
        return [c.key for c in self.criteria].index(key) + 1

    def against_paper(self) -> str:
        """Markdown: the verdicts of Rao & Sohl-Dickstein's Table 2 next to the measured ones, disagreements bold."""
        norms = [n for n in PAPER if n in self.normalizers]
        verdicts = self.wide("verdict")
        settled = self.wide("settled")
        lines = [
            "| property | " + " | ".join(norms) + " |",
            "| --- |" + " --- |" * len(norms),
        ]
        for c in self.criteria:
            cells = []
            for n in norms:
                paper, measured = PAPER[n][c.key], verdicts.loc[n, c.key]
                flag = "" if bool(settled.loc[n, c.key]) else " (not settled)"
                if measured == NOT_MEASURED:
                    cells.append(f"{paper} / not measured")
                elif agrees_with_paper(paper, measured):
                    cells.append(f"{paper} / {measured}{flag}")
                else:
                    cells.append(f"{paper} / **{measured}**{flag}")
            lines.append(f"| {c.title} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            "Each cell: the paper's verdict / the measured one; bold where they disagree. "
            + PAPER_NOTES
        )
        return "\n".join(lines) + "\n"

    def disagreements(self) -> pd.DataFrame:
        """Rows where the measured verdict differs from Rao & Sohl-Dickstein's (measured cells only)."""
        verdicts = self.wide("verdict")
        rows = []
        for n in (n for n in PAPER if n in self.normalizers):
            for c in self.criteria:
                paper, measured = PAPER[n][c.key], verdicts.loc[n, c.key]
                if measured != NOT_MEASURED and not agrees_with_paper(paper, measured):
                    rows.append(
                        {"normalizer": n, "property": c.key, "paper": paper, "measured": measured}
                    )
        return pd.DataFrame(rows, columns=["normalizer", "property", "paper", "measured"])

    def write_text(self, out: str | Path) -> list[Path]:
        """``properties.md`` (the table, footnotes, the paper's verdicts) and ``properties.csv``.

        The heatmap is drawn by :func:`normprobe.plotting.write_properties`,
        which writes these two files as well.
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        md = out / "properties.md"
        md.write_text(
            self.to_markdown() + "\n## Against Rao & Sohl-Dickstein 2020, Table 2\n\n" + self.against_paper()
        )
        csv = out / "properties.csv"
        self.cells.to_csv(csv, index=False)
        return [md, csv]


def _metrics_of(results: Results | pd.DataFrame | str | Path) -> tuple[pd.DataFrame, str]:
    if isinstance(results, pd.DataFrame):
        return results, ""
    if not isinstance(results, Results):
        results = load_results(results)
    return results.metrics, str(results.directory)


def judge_properties(
    results: Results | pd.DataFrame | str | Path,
    *,
    normalizers: Sequence[str] | None = None,
    properties: Sequence[str] | None = None,
    sequence_leaks: Mapping[str, float] | None = None,
) -> PropertyTable:
    """The properties table of ``results`` (a results folder, :class:`Results`, or metrics table).

    A reader: it judges what the results hold and computes nothing else.
    Rows: ``normalizers`` (default: the normalizers found in the results).
    ``properties``: criterion keys (default: all of :data:`CRITERIA`).
    ``sequence_leaks``: normalizer -> leak back in time, measured on the
    normalizers themselves (:func:`normprobe.zoo_measures.sequence_leaks`);
    the sequence property is "not measured" for a normalizer without one.
    :func:`normprobe.measure_properties` gives every zoo normalizer a row
    and measures the leaks.
    """
    metrics, source = _metrics_of(results)
    if metrics.empty or "metric" not in metrics:
        raise PropertiesError(
            f"{source or 'the results'} hold no measurements; run an analysis first, e.g. "
            "normprobe analyze analyses/properties.yaml"
        )
    if normalizers is None:
        normalizers = list(metrics["normalizer"].dropna().unique())
    normalizers = list(normalizers)
    known = {c.key: c for c in CRITERIA}
    if properties is None:
        chosen = list(CRITERIA)
    else:
        unknown = [p for p in properties if p not in known]
        if unknown:
            raise PropertiesError(
                f"no property {', '.join(map(repr, unknown))}; properties: {', '.join(known)}"
            )
        chosen = [known[p] for p in properties]
    frames = []
    edges = _lr_edges(metrics)
    for c in chosen:
        if c.key == "sequential":
            measured = _sequential(sequence_leaks, normalizers)
        else:
            measured = c.measure(metrics)
        frames.append(_settled(_judge(c, measured, normalizers), c, edges))
    cells = pd.concat(frames, ignore_index=True)
    return PropertyTable(cells, tuple(chosen), normalizers, source)


def _lr_edges(metrics: pd.DataFrame) -> dict[tuple[str, str], tuple[str, str]]:
    """(normalizer, variant) -> (lr_edge, lr_note) of the selected rate, for the groups whose
    selected rate is at an edge of the grid (the ``lr_edge`` column :func:`assemble
    <normprobe.results.assemble>` adds); ``variant`` is ``main`` without variants."""
    if "lr_edge" not in metrics or "lr" not in metrics:
        return {}
    rows = metrics[metrics["lr_edge"].fillna("").astype(str) != ""]
    if rows.empty:
        return {}
    variant = rows["variant"] if "variant" in rows else pd.Series("main", index=rows.index)
    rows = rows.assign(_variant=variant.fillna("main"))
    out = {}
    for (norm, var), group in rows.groupby(["normalizer", "_variant"], sort=False):
        edge = str(group["lr_edge"].iloc[0])
        chosen = selected_rows(group)["lr"]
        picked = float(chosen.iloc[0]) if len(chosen) and edge != "diverged" else None
        out[(norm, var)] = (edge, lr_note(edge, picked, sorted(set(group["lr"].astype(float)))))
    return out


def _settled(
    cells: pd.DataFrame, c: Criterion, edges: Mapping[tuple[str, str], tuple[str, str]]
) -> pd.DataFrame:
    """``settled`` and ``lr_note`` of each cell: a measured verdict that rests on a learning
    rate at the edge of its grid is not settled."""
    notes = []
    for norm, verdict in zip(cells["normalizer"], cells["verdict"], strict=True):
        edge = edges.get((norm, c.lr_variant)) if c.lr_variant is not None else None
        if edge is None or verdict == NOT_MEASURED:
            notes.append("")
        else:
            where = f" (variant {c.lr_variant})" if c.lr_variant != "main" else ""
            notes.append(f"{edge[1]}{where}")
    cells["lr_note"] = notes
    cells["settled"] = cells["lr_note"] == ""
    return cells


def _judge(c: Criterion, measured: pd.DataFrame, normalizers: list[str]) -> pd.DataFrame:
    base = pd.DataFrame({"normalizer": normalizers})
    if measured.empty:
        measured = pd.DataFrame(columns=["normalizer", "value", "shown"])
    cells = base.merge(measured, on="normalizer", how="left")
    cells["property"], cells["title"] = c.key, c.title
    cells["threshold"] = np.nan
    cells["note"] = ""
    if c.direction == "exact":
        if "verdict" not in cells:
            cells["verdict"] = NOT_MEASURED
        cells["verdict"] = cells["verdict"].where(cells["value"].notna(), NOT_MEASURED)
    else:
        by = dict(zip(measured.get("normalizer", []), measured.get("value", []), strict=True))
        if "none" not in by or "batch" not in by:
            cells["verdict"] = NOT_MEASURED
            cells["note"] = "needs the none and batch rows"
        else:
            t = relative_threshold(by["none"], by["batch"], c.direction, c.floor)
            cells["threshold"] = t
            ok = cells["value"].map(lambda v: _passes(v, t, c.direction))
            if "second" in cells:  # a second number judged the same way (training speed)
                sec = dict(zip(measured["normalizer"], measured["second"], strict=True))
                t2 = relative_threshold(sec["none"], sec["batch"], c.direction, c.floor)
                ok &= cells["second"].map(lambda v: _passes(v, t2, c.direction))
                cells["note"] = f"second threshold {_fmt(t2)}"
            cells["verdict"] = np.where(ok, "+", "-")
            cells["verdict"] = cells["verdict"].where(cells["value"].notna(), NOT_MEASURED)
    cells["shown"] = cells["shown"].where(cells["value"].notna(), "")
    return cells[
        ["normalizer", "property", "title", "verdict", "value", "shown", "threshold", "note"]
    ]
