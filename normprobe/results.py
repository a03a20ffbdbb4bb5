"""Tidy result tables on disk: written run by run, atomically, and read back as DataFrames.

Layout of an output directory::

    manifest.json            resolved config, its hash, package versions
    runs/<run>/              one folder per finished run, renamed into place whole
        run.json             status (done, diverged, failed), timings, settings
        metrics.parquet      tidy rows: step, layer, depth, metric, value, ...
        hessian_nodes.parquet, hessian_density.parquet   (when the Hessian ran)
        parts/               a monitored run's part files, until its monitor is closed
    results.parquet          every run's metrics, one row per measurement
    results.csv              the same, for spreadsheets
    hessian_nodes.parquet    SLQ nodes and weights of every spectrum
    hessian_density.parquet  smoothed densities on a grid
    runs.jsonl               one line per run: status and timings
    .replaced/               the results an unfinished ``analyze --force`` replaces
                             (a results folder of its own; deleted when it finishes)

A run folder appears only once everything in it is written (it is built
under a temporary name and renamed), so killing the process loses at most
the run in progress. A run recorded by a :class:`~normprobe.monitor.Monitor`
inside the user's own loop is the exception: its folder is there from the
start, marked ``running``, and each measurement adds one small part file
(``runs/<run>/parts/``, written under a temporary name and renamed) until
the monitor is closed and writes the folder's tables once; a run whose
monitor was never closed (the process was killed) is read from its parts,
and :attr:`Results.unclosed` names it. The combined tables are rebuilt from the run folders
once per grid, also atomically, and only from complete runs: each run's
``run.json`` records the size and SHA-256 of its table files, and a run
whose files are missing or differ counts as not finished (the next
``analyze`` reruns it and says so).

JSON files hold ``null`` where a value is NaN or infinite (bare ``NaN`` is
not JSON), and every file is created with the permissions the user's umask
gives, like any other tool's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from normprobe.errors import NormprobeError

__all__ = [
    "Results",
    "RunRecord",
    "ResultsError",
    "load_results",
    "write_run",
    "start_run",
    "write_part",
    "finish_run",
    "UnclosedRunWarning",
    "logged_rows",
    "finished_runs",
    "scan_runs",
    "assemble",
    "records_results",
    "json_safe",
    "check_output_folder",
    "make_output_folder",
    "write_json_atomic",
    "selected_rows",
    "final_rows",
    "selection_metric",
    "rate_scores",
    "choose_rate",
    "lr_note",
    "LR_EDGES",
    "METRIC_COLUMNS",
    "RUN_TABLES",
]

#: Columns every row of ``results.parquet`` has, in this order (more may follow).
METRIC_COLUMNS = [
    "run",
    "normalizer",
    "variant",
    "lr",
    "seed",
    "step",
    "layer",
    "depth",
    "metric",
    "value",
]
#: Tables a run folder may hold besides ``metrics``.
RUN_TABLES = ("metrics", "hessian_nodes", "hessian_density")
FINISHED = ("done", "diverged")
#: The key of ``run.json`` that lists the run's table files with their sizes and checksums.
FILES_KEY = "files"
#: The metadata key of a metrics part file that holds the values logged with it.
LOGGED_KEY = "normprobe_logged"
#: The folder of a monitored run's part files (one per measurement) until the run is closed.
PARTS = "parts"


class ResultsError(NormprobeError, ValueError):
    """A results directory that cannot be read or written as asked."""


class UnclosedRunWarning(UserWarning):
    """A monitored run read from its part files: its monitor was not closed (yet)."""


def _umask() -> int:
    """The process umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_created(path: str | Path, *, folder: bool = False) -> None:
    """Give a ``tempfile`` file (0600) or folder (0700) the mode ``open``/``mkdir`` would."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON ``null``).

    >>> json_safe({"a": float("nan"), "b": [1.0, float("inf")]})
    {'a': None, 'b': [1.0, None]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def file_digest(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file: what a finished run records of each table."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def check_output_folder(directory: Path, what: str) -> None:
    """Refuse an output folder that is a file, lies under a file, or cannot be written.

    ``what`` names the option in the message (``output``, ``--out``). Creates
    nothing; a folder that does not exist yet must be creatable.
    """
    if str(directory) == "":
        raise ResultsError(f"{what}: empty; give a folder, e.g. runs/my-analysis")
    if directory.exists() and not directory.is_dir():
        raise ResultsError(
            f"{what}: {str(directory)!r} is a file, not a folder; give a folder path"
        )
    parent = directory
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ResultsError(
            f"{what}: {str(directory)!r} lies under {str(parent)!r}, which is a file; "
            "give a folder path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ResultsError(
            f"{what}: {str(parent)!r} is not writable; give a folder you can write to"
        )


def make_output_folder(directory: Path, what: str) -> None:
    """Create ``directory`` (and its parents) after :func:`check_output_folder`, or say why not."""
    check_output_folder(directory, what)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ResultsError(
            f"{what}: cannot create {str(directory)!r} ({err.strerror or err}); "
            "give a folder you can write to"
        ) from None


@dataclass
class RunRecord:
    """One run's identity, status and tables, as written to ``runs/<run>/``."""

    run: str
    normalizer: str
    lr: float
    seed: int
    status: str  # done | diverged | failed | skipped | running (a Monitor's, being recorded)
    seconds: float = 0.0
    diverged_step: int | None = None
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    variant: str | None = None  # the config variant; None (no column) without variants

    def identity(self) -> list[tuple[str, Any]]:
        """The identity columns of the run's rows: run, normalizer, [variant,] lr, seed."""
        variant = [("variant", self.variant)] if self.variant is not None else []
        return [
            ("run", self.run),
            ("normalizer", self.normalizer),
            *variant,
            ("lr", self.lr),
            ("seed", self.seed),
        ]

    def summary(self) -> dict[str, Any]:
        return {
            **dict(self.identity()),
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "diverged_step": self.diverged_step,
            "error": self.error,
            **self.info,
        }


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _as_created(tmp)
        with os.fdopen(fd, "w") as f:
            json.dump(json_safe(data), f, indent=2, sort_keys=False, default=str, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_table_atomic(frame: pd.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _as_created(tmp)
        if path.suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _with_identity(frame: pd.DataFrame, record: RunRecord) -> pd.DataFrame:
    """Prefix the run's identity columns (run, normalizer, [variant,] lr, seed)."""
    frame = frame.copy()
    for i, (key, value) in enumerate(record.identity()):
        if key in frame.columns:
            frame = frame.drop(columns=key)
        frame.insert(i, key, value)
    return frame


def write_run(directory: Path, record: RunRecord) -> Path:
    """Write one run's folder atomically: build it under a temporary name, then rename."""
    with _staged_run_folder(directory, record) as tmp:
        files = {}
        for name, table in _run_tables(record):
            file = tmp / f"{name}.parquet"
            table.to_parquet(file, index=False)
            files[file.name] = file_digest(file)
        write_json_atomic(tmp / "run.json", {**record.summary(), FILES_KEY: files})
    return directory / "runs" / record.run


def _run_tables(record: RunRecord) -> Iterator[tuple[str, pd.DataFrame]]:
    """The record's non-empty tables, each with the run's identity columns (a table name outside
    :data:`RUN_TABLES` is an error)."""
    for name, frame in record.tables.items():
        if name not in RUN_TABLES:
            raise ValueError(f"unknown run table {name!r}; expected one of {RUN_TABLES}")
        if frame is not None and len(frame):
            yield name, _with_identity(frame, record)


@contextmanager
def _staged_run_folder(directory: Path, record: RunRecord) -> Iterator[Path]:
    """A temporary folder beside the run's, renamed to the run's (replacing a folder of that
    name: a failed run being redone) when the block ends, removed if the block raises."""
    runs = directory / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    final = runs / record.run
    tmp = Path(tempfile.mkdtemp(dir=runs, prefix=f".{record.run}.", suffix=".tmp"))
    try:
        _as_created(tmp, folder=True)
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def start_run(directory: Path, record: RunRecord) -> Path:
    """The folder of a run recorded as it goes (a :class:`~normprobe.monitor.Monitor`'s):
    ``run.json`` with the record's status (``running``) and an empty ``parts/``, replacing a
    folder of the same name; written under a temporary name and renamed, like :func:`write_run`.
    """
    with _staged_run_folder(directory, record) as tmp:
        (tmp / PARTS).mkdir()
        write_json_atomic(tmp / "run.json", {**record.summary(), FILES_KEY: {}})
    return directory / "runs" / record.run


def logged_rows(logged: list[dict[str, Any]]) -> pd.DataFrame:
    """Logged values (``{"step", "metric", "value"}`` each) as metric rows: step, layer (None),
    depth (NaN), metric, value."""
    new = pd.DataFrame(logged)
    new.insert(1, "layer", None)
    new.insert(2, "depth", float("nan"))
    return new


def write_part(
    directory: Path,
    run: str,
    number: int,
    tables: Mapping[str, pd.DataFrame],
    logged: list[dict[str, Any]] | None = None,
) -> None:
    """Add one measurement's rows to a started run (:func:`start_run`): one part file per
    table, each written under a temporary name and renamed, the ``metrics`` part last (a
    measurement counts once its metrics part is there). ``tables`` holds the rows without the
    run's identity columns; the values logged since the previous part (``logged``, see
    :func:`logged_rows`) travel in the metrics part's metadata, not as rows."""
    parts = directory / "runs" / run / PARTS
    tables = dict(tables)
    metrics = tables.pop("metrics", None)
    metrics = pd.DataFrame() if metrics is None else metrics.copy(deep=False)
    metrics.attrs = {LOGGED_KEY: json_safe(list(logged or []))}
    for name, frame in [*tables.items(), ("metrics", metrics)]:
        if name not in RUN_TABLES:
            raise ValueError(f"unknown run table {name!r}; expected one of {RUN_TABLES}")
        _write_parquet_atomic(frame, parts / f"{number:06d}.{name}.parquet")


def _write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` to ``path`` under a temporary name in the same folder, then rename it, so a
    reader sees the old file or the whole new one, never a part."""
    tmp = path.parent / f".{path.name}.tmp"
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def finish_run(directory: Path, record: RunRecord) -> Path:
    """Write a started run's tables and ``run.json`` (as :func:`write_run` writes them, the
    same files and bytes), then remove its parts.

    Done in place, in an order that is safe at every point: the table files
    first (each under a temporary name, renamed), then ``run.json`` with
    the final status and the files' checksums, then ``parts/``; until
    ``run.json`` is replaced the run still reads from its parts. A run that
    was not started is written by :func:`write_run`.
    """
    final = directory / "runs" / record.run
    if not (final / PARTS).is_dir():
        return write_run(directory, record)
    files = {}
    for name, table in _run_tables(record):
        file = final / f"{name}.parquet"
        _write_parquet_atomic(table, file)
        files[file.name] = file_digest(file)
    write_json_atomic(final / "run.json", {**record.summary(), FILES_KEY: files})
    shutil.rmtree(final / PARTS, ignore_errors=True)
    return final


def is_unclosed(path: Path, status: Mapping[str, Any]) -> bool:
    """Whether a run folder is a monitored run still read from its parts (not closed)."""
    return status.get("status") == "running" and (path / PARTS).is_dir()


def _identity_record(status: Mapping[str, Any]) -> RunRecord:
    lr = status.get("lr")
    return RunRecord(
        str(status.get("run")),
        str(status.get("normalizer")),
        float("nan") if lr is None else float(lr),
        int(status.get("seed") or 0),
        str(status.get("status")),
        variant=status.get("variant"),
    )


def read_parts(path: Path, status: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """The tables of an unclosed monitored run, from its part files, with the identity columns.

    Every measurement whose metrics part was written is there (the
    measures' rows of each measurement in order, then the logged values,
    as the closed run's tables order them); the parts of a measurement in
    progress (no metrics part yet) and temporary files are left out.
    """
    parts = path / PARTS
    files = sorted(
        p for p in parts.iterdir() if p.name.endswith(".parquet") and not p.name.startswith(".")
    )
    complete = {p.name.split(".")[0] for p in files if p.name.split(".")[1] == "metrics"}
    measured: list[pd.DataFrame] = []
    logged: list[pd.DataFrame] = []
    tables: dict[str, list[pd.DataFrame]] = {name: [] for name in RUN_TABLES}
    for p in files:
        fields = p.name.split(".")
        number, name = fields[0], fields[1]
        if number not in complete or name not in RUN_TABLES:
            continue
        frame = pd.read_parquet(p)
        if name == "metrics":
            rows = [
                {**row, "value": float("nan") if row["value"] is None else row["value"]}
                for row in frame.attrs.get(LOGGED_KEY, [])
            ]
            frame.attrs = {}
            measured.append(frame)
            if rows:
                logged.append(logged_rows(rows))
        else:
            tables[name].append(frame)
    tables["metrics"] = measured + logged
    record = _identity_record(status)
    out = {}
    for name, frames in tables.items():
        frame = _concat(frames)
        if len(frame):
            out[name] = _with_identity(frame, record)
    return out


def _run_dirs(directory: Path) -> list[Path]:
    runs = directory / "runs"
    if not runs.is_dir():
        return []
    return sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_problem(path: Path, status: Mapping[str, Any]) -> str | None:
    """Why a run folder is incomplete (a table file missing or changed), or None if whole.

    Folders written before runs recorded their files are checked by reading
    each table present.
    """
    files = status.get(FILES_KEY)
    if files is None:
        for name in RUN_TABLES:
            file = path / f"{name}.parquet"
            if file.exists():
                try:
                    pd.read_parquet(file)
                except Exception as err:  # any reader error means the file is damaged
                    return f"{file.name} cannot be read ({type(err).__name__})"
        return None
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected.get("bytes"):
            return f"{name} has {file.stat().st_size} bytes, not the {expected.get('bytes')} written"
        if file_digest(file)["sha256"] != expected.get("sha256"):
            return f"{name} differs from what was written (checksum)"
    return None


def scan_runs(directory: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(complete runs: name -> status line, incomplete runs: name -> what is wrong)."""
    complete: dict[str, dict[str, Any]] = {}
    broken: dict[str, str] = {}
    for path in _run_dirs(directory):
        status = _read_status(path)
        if status is None:
            broken[path.name] = "run.json is missing or not valid JSON"
            continue
        problem = run_problem(path, status)
        if problem is not None:
            broken[path.name] = problem
        else:
            complete[path.name] = status
    return complete, broken


def finished_runs(
    directory: Path, broken: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Run name -> status line of the runs that need not run again (done or diverged, complete).

    ``broken``, when given, receives the run folders whose files are missing
    or damaged (they count as not finished).
    """
    complete, damaged = scan_runs(directory)
    if broken is not None:
        broken.update(damaged)
    return {run: s for run, s in complete.items() if s.get("status") in FINISHED}


def clean_partial(directory: Path) -> int:
    """Remove temporary folders and files left by an interrupted write; returns how many."""
    removed = 0
    for base in (directory, directory / "runs"):
        if not base.is_dir():
            continue
        for p in base.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed += 1
    return removed


def _concat(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if f is not None and len(f)]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True, sort=False)


#: ``lr_edge`` values: why a selected rate is not settled ('' when it is)
LR_EDGES = ("", "low", "high", "single", "diverged")


def selection_metric(metrics: pd.DataFrame, select_on: str = "auto") -> tuple[str, str]:
    """(metric, ``max`` or ``min``) that selects the learning rate in ``metrics``.

    ``select_on``: ``held_out`` (the ``val_*`` metrics), ``test``, or
    ``auto`` (held_out when the runs record ``val_acc``, else test). The
    score is the accuracy, or for language models (runs that record a
    perplexity) the loss, the mean token cross-entropy.

    >>> rows = pd.DataFrame({"metric": ["test_acc", "val_acc"]})
    >>> selection_metric(rows), selection_metric(rows, "test")
    (('val_acc', 'max'), ('test_acc', 'max'))
    """
    names = set(metrics["metric"].unique()) if "metric" in metrics else set()
    split = select_on
    if split == "auto":
        split = "held_out" if "val_acc" in names else "test"
    prefix = "val" if split == "held_out" else "test"
    if f"{prefix}_perplexity" in names:
        return f"{prefix}_loss", "min"
    return f"{prefix}_acc", "max"


def _g(rate: float) -> str:
    return f"{rate:g}"


def lr_note(edge: str, chosen: float | None, grid: Sequence[float]) -> str:
    """The reason a selected rate is not settled, in words ('' when it is).

    >>> lr_note("high", 0.05, [0.01, 0.05])
    'best rate 0.05 is the top of the grid [0.01, 0.05]; extend the grid upwards (train.lr_extend)'
    """
    shown = "[" + ", ".join(_g(r) for r in sorted(grid)) + "]"
    if edge == "high":
        return (
            f"best rate {_g(chosen)} is the top of the grid {shown}; extend the grid upwards "
            "(train.lr_extend)"
        )
    if edge == "low":
        return (
            f"best rate {_g(chosen)} is the bottom of the grid {shown}; extend the grid "
            "downwards (train.lr_extend)"
        )
    if edge == "single":
        return f"one learning rate ({_g(chosen)}) only: nothing to compare it with"
    if edge == "diverged":
        return f"every run diverged at every rate of the grid {shown}"
    return ""


def rate_scores(
    runs: pd.DataFrame, metrics: pd.DataFrame, select_on: str = "auto"
) -> pd.DataFrame:
    """Per (normalizer, variant, lr): the selection score and how many seeds diverged.

    Columns ``normalizer, variant, lr, score, seeds, diverged``: ``score`` is
    the mean over the finished seeds of the selection metric at each run's
    last recorded step (:func:`selection_metric`); ``diverged`` counts the
    seeds whose loss became non-finite. Failed runs are left out.
    """
    metric, best = selection_metric(metrics, select_on)
    rows = metrics[metrics["metric"] == metric] if "metric" in metrics else metrics.iloc[0:0]
    last = rows.sort_values("step").groupby("run").tail(1).set_index("run")["value"]
    runs = runs[runs["status"].isin(("done", "running", "diverged"))].copy()
    if "variant" not in runs:
        runs["variant"] = None
    runs["final"] = runs["run"].map(last)
    runs.loc[runs["status"] == "diverged", "final"] = float("nan")
    runs["is_diverged"] = runs["status"] == "diverged"
    keys = ["normalizer", "variant", "lr"]
    out = (
        runs.groupby(keys, dropna=False, sort=True)
        .agg(score=("final", "mean"), seeds=("run", "size"), diverged=("is_diverged", "sum"))
        .reset_index()
    )
    out.attrs["metric"], out.attrs["best"] = metric, best
    return out


def choose_rate(scores: pd.DataFrame, best: str) -> tuple[float | None, str]:
    """The selected rate of one group's :func:`rate_scores` rows, and its ``lr_edge``.

    A rate loses to every rate with fewer diverged seeds; among rates with as
    many, the better mean score of the finished seeds wins; ties go to the
    smaller rate. A rate at which every seed diverged is never chosen (then
    the group's edge is ``diverged``). The edge is ``low``/``high`` when the
    chosen rate is the smallest/largest of the grid (every rate that ran,
    diverged or not), ``single`` for a one-rate grid, else ''.

    >>> s = pd.DataFrame({"lr": [0.01, 0.1, 1.0], "score": [0.5, 0.9, float("nan")],
    ...                   "seeds": [1, 1, 1], "diverged": [0, 0, 1]})
    >>> choose_rate(s, "max")
    (0.1, '')
    """
    scores = scores.sort_values("lr")
    grid = scores["lr"].tolist()
    ok = scores[(scores["diverged"] < scores["seeds"]) & scores["score"].notna()]
    if ok.empty:
        return None, "diverged" if len(scores) and scores["diverged"].gt(0).any() else ""
    sign = -1.0 if best == "max" else 1.0
    ranked = ok.assign(key=sign * ok["score"]).sort_values(
        ["diverged", "key", "lr"], kind="mergesort"
    )
    chosen = float(ranked["lr"].iloc[0])
    if len(grid) == 1:
        edge = "single"
    elif chosen == grid[0]:
        edge = "low"
    elif chosen == grid[-1]:
        edge = "high"
    else:
        edge = ""
    return chosen, edge


def _select_lrs(
    runs: pd.DataFrame, metrics: pd.DataFrame, select_on: str = "auto"
) -> pd.DataFrame:
    """Mark, per normalizer (and variant), the learning rate :func:`choose_rate` selects.

    The score is the final accuracy on the split ``select_on`` names
    (:func:`selection_metric`), or for language models the lowest loss.
    Runs still being recorded (status ``running``) count as done. Where no
    run of a group records the score there is nothing to compare, and every
    done run of the group is marked. Every run of a group gets its
    ``lr_edge`` and ``lr_note`` (:func:`lr_note`) and ``selected_by`` (the
    metric that selected).
    """
    runs = runs.copy()
    runs["final_test_acc"] = float("nan")
    runs["selected"] = False
    runs["lr_edge"] = ""
    runs["lr_note"] = ""
    if metrics.empty or runs.empty:
        return runs

    def final(metric: str) -> pd.Series | None:
        rows = metrics[metrics["metric"] == metric]
        if rows.empty:
            return None
        return rows.sort_values("step").groupby("run").tail(1).set_index("run")["value"]

    last = final("test_acc")
    if last is None:
        # no run records a test score (e.g. a Monitor's runs that log none): nothing to compare
        runs.loc[runs["status"].isin(("done", "running")), "selected"] = True
        return runs
    runs["final_test_acc"] = runs["run"].map(last)
    if final("test_perplexity") is not None:
        runs["final_test_perplexity"] = runs["run"].map(final("test_perplexity"))
        runs["final_test_loss"] = runs["run"].map(final("test_loss"))
    metric, best = selection_metric(metrics, select_on)
    runs["selected_by"] = metric
    scores = rate_scores(runs, metrics, select_on)
    keys = ["normalizer", "variant"] if "variant" in runs else ["normalizer"]
    for key, group in runs.groupby(keys, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        here = scores[scores["normalizer"] == key[0]]
        if len(keys) > 1:
            here = here[here["variant"].isna() if pd.isna(key[1]) else here["variant"] == key[1]]
        here = here[here["lr"].notna()]
        done = group[group["status"].isin(("done", "running"))]
        if here.empty or (here["score"].isna().all() and not here["diverged"].any()):
            # nothing to compare (runs that record no score, or no learning rate): keep all
            runs.loc[done.index, "selected"] = True
            continue
        chosen, edge = choose_rate(here, best)
        runs.loc[group.index, "lr_edge"] = edge
        runs.loc[group.index, "lr_note"] = lr_note(edge, chosen, here["lr"].tolist())
        if chosen is not None:
            runs.loc[done.index[done["lr"] == chosen], "selected"] = True
    return runs


def assemble(
    directory: Path,
    *,
    write: bool = True,
    live: Iterable[RunRecord] = (),
    cache: dict[str, tuple[dict[str, Any], dict[str, pd.DataFrame]]] | None = None,
) -> Results:
    """Combine the run folders into the result tables; with ``write``, save them (atomically).

    ``live``: run records held in memory (a monitor's run being recorded),
    taken instead of their folders. A monitored run that was not closed is
    read from its part files and named in :attr:`Results.unclosed`.
    ``cache``: run -> (status line, tables) of finished run folders read by
    an earlier call; a folder whose status line is unchanged is not read
    again (an analysis assembles after each stage of its learning-rate
    grid, and would otherwise read every earlier run once per stage). The
    cached frames are only read, never changed.
    """
    directory = Path(directory)
    tables: dict[str, list[pd.DataFrame]] = {name: [] for name in RUN_TABLES}
    statuses = []
    unclosed = []
    complete, broken = scan_runs(directory)
    held = {record.run: record for record in live}
    for run in sorted(set(complete) | set(held)):
        if run in held:
            record = held[run]
            statuses.append(record.summary())
            for name, frame in record.tables.items():
                if frame is not None and len(frame):
                    tables[name].append(_with_identity(frame, record))
            broken.pop(run, None)
            continue
        status = complete[run]
        path = directory / "runs" / run
        statuses.append({k: v for k, v in status.items() if k != FILES_KEY})
        if is_unclosed(path, status):
            unclosed.append(run)
            for name, frame in read_parts(path, status).items():
                tables[name].append(frame)
            continue
        if cache is not None and run in cache and cache[run][0] == status:
            read = cache[run][1]
        else:
            read = {
                name: pd.read_parquet(path / f"{name}.parquet")
                for name in RUN_TABLES
                if (path / f"{name}.parquet").exists()
            }
            if cache is not None:
                cache[run] = (status, read)
        for name, frame in read.items():
            tables[name].append(frame)
    results = _combined(directory, statuses, tables, _read_manifest(directory), broken)
    results.unclosed = unclosed
    if write:
        results.save_tables()
    return results


def _combined(
    directory: Path,
    statuses: list[dict[str, Any]],
    tables: Mapping[str, list[pd.DataFrame]],
    manifest: dict[str, Any],
    incomplete: Mapping[str, str] | None = None,
) -> Results:
    """The result tables of runs given by their status lines and their tables' frames
    (``incomplete``: the run folders left out, with what is wrong with each)."""
    runs = pd.DataFrame(statuses)
    metrics = _concat(tables["metrics"])
    if not runs.empty:
        runs = _select_lrs(runs, metrics, _select_on(manifest))
        if not metrics.empty:
            metrics = metrics.merge(runs[["run", "selected", "lr_edge"]], on="run", how="left")
    return Results(
        directory=directory,
        metrics=_order(metrics),
        runs=runs,
        hessian_nodes=_concat(tables["hessian_nodes"]),
        hessian_density=_concat(tables["hessian_density"]),
        manifest=manifest,
        incomplete=dict(incomplete or {}),
    )


def _select_on(manifest: Mapping[str, Any]) -> str:
    """``train.select_on`` of the manifest's config (``auto`` when it has none)."""
    config = manifest.get("config") if isinstance(manifest, Mapping) else None
    train = config.get("train") if isinstance(config, Mapping) else None
    value = train.get("select_on") if isinstance(train, Mapping) else None
    return value if value in ("auto", "held_out", "test") else "auto"


def records_results(
    records: Iterable[RunRecord],
    directory: str | Path = ".",
    manifest: dict[str, Any] | None = None,
) -> Results:
    """The :class:`Results` of run records held in memory, as :func:`assemble` builds them from
    run folders (the same identity columns, the same learning-rate selection).

    >>> frame = pd.DataFrame({"step": [0], "layer": [None], "depth": [float("nan")],
    ...                       "metric": ["test_acc"], "value": [0.5]})
    >>> record = RunRecord("mine", "batch", 0.1, 0, "done", tables={"metrics": frame})
    >>> records_results([record]).metrics[["run", "normalizer", "metric", "selected"]].values.tolist()
    [['mine', 'batch', 'test_acc', True]]
    """
    statuses: list[dict[str, Any]] = []
    tables: dict[str, list[pd.DataFrame]] = {name: [] for name in RUN_TABLES}
    for record in records:
        statuses.append(record.summary())
        for name, frame in record.tables.items():
            if frame is not None and len(frame):
                tables[name].append(_with_identity(frame, record))
    return _combined(Path(directory), statuses, tables, manifest or {})


def _order(metrics: pd.DataFrame) -> pd.DataFrame:
    if metrics.empty:
        return pd.DataFrame(columns=METRIC_COLUMNS)
    first = [c for c in METRIC_COLUMNS if c in metrics.columns]
    rest = [c for c in metrics.columns if c not in first]
    return metrics[first + rest]


def selected_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of the learning rate selected per normalizer, when the table marks one.

    Tables without a ``selected`` column (or with none marked) are returned whole.
    """
    if "selected" in rows and rows["selected"].notna().any():
        rows = rows[rows["selected"].fillna(False).astype(bool)]
    return rows


def final_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Each run's rows at its last recorded step.

    >>> frame = pd.DataFrame({"run": ["a", "a", "b"], "step": [0, 9, 4], "value": [1, 2, 3]})
    >>> final_rows(frame)["value"].tolist()
    [2, 3]
    """
    last = rows.groupby("run")["step"].transform("max")
    return rows[rows["step"] == last]


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / "manifest.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ResultsError(f"{path} is not valid JSON ({err}); delete it and rerun") from None


@dataclass
class Results:
    """The tables of one analysis, as pandas DataFrames.

    ``metrics``: one row per measurement (columns ``run, normalizer, lr,
    seed, step, layer, depth, metric, value`` and probe-specific extras, plus
    ``selected``, true for the learning rate chosen per normalizer).
    ``runs``: one row per run with status, timings, final test accuracy.
    ``hessian_nodes``/``hessian_density``: SLQ nodes and weights, densities.
    """

    directory: Path
    metrics: pd.DataFrame
    runs: pd.DataFrame
    hessian_nodes: pd.DataFrame
    hessian_density: pd.DataFrame
    manifest: dict[str, Any]
    #: run folders left out because a file is missing or damaged: run -> what is wrong
    incomplete: dict[str, str] = field(default_factory=dict)
    #: monitored runs read from their part files: their monitor was not closed (the process
    #: is still recording, or was killed); every measurement completed before is there
    unclosed: list[str] = field(default_factory=list)

    def save_tables(self) -> None:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        _write_table_atomic(self.metrics, d / "results.parquet")
        _write_table_atomic(self.metrics, d / "results.csv")
        for name in ("hessian_nodes", "hessian_density"):
            frame = getattr(self, name)
            path = d / f"{name}.parquet"
            if len(frame):
                _write_table_atomic(frame, path)
            elif path.exists():
                path.unlink()
        lines = "".join(
            json.dumps(json_safe(r), default=str, allow_nan=False) + "\n"
            for r in self.runs.to_dict("records")
        )
        tmp = d / ".runs.jsonl.tmp"
        tmp.write_text(lines)
        os.replace(tmp, d / "runs.jsonl")

    def metric(self, name: str, *, selected_only: bool = False) -> pd.DataFrame:
        """Rows of one metric (optionally only the selected learning rates)."""
        rows = self.metrics[self.metrics["metric"] == name]
        if selected_only and "selected" in rows:
            rows = rows[rows["selected"].fillna(False).astype(bool)]
        return rows

    def rows(self, metric: str, *, selected: bool = True, final: bool = False) -> pd.DataFrame:
        """Rows of ``metric``: of the selected learning rates (``selected``, when marked), and
        only each run's last recorded step (``final``)."""
        m = self.metrics
        rows = m[m["metric"] == metric] if "metric" in m else m
        if selected:
            rows = selected_rows(rows)
        return final_rows(rows) if final else rows

    def summary(self) -> pd.DataFrame:
        """One row per run: status, final test accuracy and the headline probe values.

        ``repr_corr``: the representation correlation at the deepest probed
        layer, at step 0; ``grad_corr``: the gradient correlation averaged over
        layers, at step 0; ``growth``: the gradient-norm growth rate at step 0;
        ``lambda_1``: the top Hessian eigenvalue at the last step it was
        measured (``lambda_1_step``). NaN where the analysis did not measure it.

        >>> Results(Path("."), pd.DataFrame(columns=["run", "step", "metric", "value"]),
        ...         pd.DataFrame(columns=["run", "normalizer", "lr", "seed", "status"]),
        ...         pd.DataFrame(), pd.DataFrame(), {}).summary().columns.tolist()
        ['normalizer', 'lr', 'seed', 'status', 'test_acc', 'repr_corr', 'grad_corr', 'growth', 'lambda_1', 'lambda_1_step']
        """
        runs = self.runs.set_index("run") if "run" in self.runs else self.runs
        m = self.metrics
        columns = {"normalizer": object, "lr": float, "seed": int, "status": object}
        if "variant" in runs:
            columns = {"normalizer": object, "variant": object, **columns}
        out = pd.DataFrame(
            {c: runs[c] if c in runs else pd.Series(dtype=t) for c, t in columns.items()}
        )
        out["test_acc"] = runs["final_test_acc"] if "final_test_acc" in runs else float("nan")
        at_init = m[m["step"] == 0]
        nan = float("nan")
        reprs = at_init[at_init["metric"].astype(str).str.startswith("repr_")]
        out["repr_corr"] = (
            reprs.sort_values("depth").groupby("run")["value"].last() if len(reprs) else nan
        )
        grad = at_init["metric"] == "grad_corr"
        out["grad_corr"] = at_init[grad].groupby("run")["value"].mean() if grad.any() else nan
        growth = at_init["metric"] == "grad_growth_rate"
        out["growth"] = at_init[growth].groupby("run")["value"].first() if growth.any() else nan
        top = m[(m["metric"] == "eigenvalue") & (m.get("index", pd.Series(dtype=float)) == 1)]
        if len(top):
            last = top.sort_values("step").groupby("run").last()
            out["lambda_1"], out["lambda_1_step"] = last["value"], last["step"]
        else:
            out["lambda_1"], out["lambda_1_step"] = float("nan"), float("nan")
        return out.reset_index(drop=True)

    def __repr__(self) -> str:
        status = self.runs["status"].value_counts().to_dict() if len(self.runs) else {}
        return (
            f"Results({str(self.directory)!r}, runs={status}, rows={len(self.metrics)}, "
            f"hessian_spectra={self.hessian_nodes[['run', 'step']].drop_duplicates().shape[0] if len(self.hessian_nodes) else 0})"
        )


def load_results(directory: str | Path) -> Results:
    """Read an analysis' results directory (written by ``normprobe analyze``).

    >>> import tempfile
    >>> load_results(tempfile.mkdtemp())
    Traceback (most recent call last):
    ...
    normprobe.results.ResultsError: ... holds no normprobe results (no manifest.json or runs/); ...
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ResultsError(
            f"{str(directory)!r} is not a folder; pass the output folder of an analysis"
        )
    if not (directory / "manifest.json").exists() and not (directory / "runs").is_dir():
        raise ResultsError(
            f"{str(directory)!r} holds no normprobe results (no manifest.json or runs/); "
            "pass the output folder of `normprobe analyze`"
        )
    if (directory / "runs").is_dir():
        results = assemble(directory, write=False)
        if results.unclosed:
            warnings.warn(
                f"{str(directory)!r}: run(s) {', '.join(results.unclosed)} were read from the part "
                f"files of a monitor that was not closed (still recording, or its process died); "
                f"every measurement completed before is there. Call monitor.close() (or use the "
                f"monitor as a context manager) to write the run's tables",
                UnclosedRunWarning,
                stacklevel=2,
            )
        return results
    return _read_only(directory)


def _read_only(directory: Path) -> Results:
    def read(name: str) -> pd.DataFrame:
        path = directory / name
        return pd.read_parquet(path) if path.exists() else pd.DataFrame()

    runs_path = directory / "runs.jsonl"
    runs = (
        pd.DataFrame([json.loads(line) for line in runs_path.read_text().splitlines() if line])
        if runs_path.exists()
        else pd.DataFrame()
    )
    return Results(
        directory=directory,
        metrics=read("results.parquet"),
        runs=runs,
        hessian_nodes=read("hessian_nodes.parquet"),
        hessian_density=read("hessian_density.parquet"),
        manifest=_read_manifest(directory),
    )


def manifest_matches(directory: Path, config_hash: str) -> Mapping[str, Any] | None:
    """The existing manifest if it was written for a different config, else None."""
    manifest = _read_manifest(directory)
    if manifest and manifest.get("config_hash") != config_hash:
        return manifest
    return None
