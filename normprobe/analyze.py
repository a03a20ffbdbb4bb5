"""``normprobe analyze``: every (normalizer, learning rate, seed) run of a config.

The grid and its bookkeeping: the config is resolved once into run
specifications (:mod:`normprobe.plan`), checked against real layers and
data (:mod:`normprobe.checks`), and each run goes to
:func:`normprobe.run.run_one`, here or on an executor
(:mod:`normprobe.executors`). Each finished run is written to its own folder
atomically (see :mod:`normprobe.results`), so an interrupted analysis
resumes where it stopped; ``force=True`` redoes all, and keeps the results it
replaces in the folder's ``.replaced/`` until it has finished (see
:func:`analyze`). The result tables are assembled from the run folders once,
at the end of the grid (or when it is interrupted), not after every run.

>>> import tempfile
>>> cfg = {"model": {"name": "mlp", "options": {"depth": 2, "width": 16}},
...        "normalizers": ["layer"], "train": {"steps": 3, "batch_size": 32},
...        "probes": {"schedule": [0, 3]}, "hessian": {"enabled": False}}
>>> results = analyze(cfg, out=tempfile.mkdtemp(), quiet=True)
>>> sorted(results.runs["status"])
['done']
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pickle
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import TqdmExperimentalWarning, TqdmWarning

from normprobe import executors
from normprobe.checks import check_norm_options, preflight
from normprobe.config import Config, ConfigError, config_hash, load_config
from normprobe.errors import NormprobeError, listed
from normprobe.lock import LOCK_NAME, OWNER_NAME, folder_lock
from normprobe.plan import ProbeData, RunSpec, build_run_model, plan_runs, prepare_data
from normprobe.results import (
    Results,
    ResultsError,
    RunRecord,
    assemble,
    check_output_folder,
    clean_partial,
    finished_runs,
    make_output_folder,
    manifest_matches,
    write_json_atomic,
    write_run,
)
from normprobe.run import run_one
from normprobe.threads import AUTO, Threads, check_threads

with warnings.catch_warnings():
    # in a notebook without ipywidgets tqdm.auto warns at import and falls back to the text
    # bar; importing normprobe should not print that (``_progress`` then shows no bar)
    warnings.simplefilter("ignore", TqdmWarning)
    warnings.simplefilter("ignore", TqdmExperimentalWarning)
    from tqdm.auto import tqdm

__all__ = [
    "analyze",
    "summary_line",
    "unsettled_lines",
    "RunSpec",
    "plan_runs",
    "build_run_model",
    "ProbeData",
    "prepare_data",
    "run_one",
]


def _resolve(
    config_or_path: str | Path | Mapping[str, Any] | Config, overrides: Sequence[str]
) -> Config:
    if isinstance(config_or_path, Config):
        if overrides:
            config, _ = load_config(config_or_path.to_dict(), overrides)
            return config
        return config_or_path
    config, _ = load_config(config_or_path, overrides)
    return config


def analyze(
    config_or_path: str | Path | Mapping[str, Any] | Config,
    *,
    out: str | Path | None = None,
    force: bool = False,
    quiet: bool = False,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
    executor: str = "local",
    jobs: int | None = None,
    address: str | None = None,
    threads: Threads = None,
) -> Results:
    """Run every (normalizer, lr, seed) of a config and return the result tables.

    ``config_or_path`` is a YAML path, a mapping or a :class:`Config`;
    ``overrides`` are ``key.sub=value`` strings as on the command line.
    Finished runs found in the output directory are kept (resume) unless
    ``force``. ``log`` receives one line per finished run (default: stderr,
    unless ``quiet``).

    A folder that holds the results of another config is refused unless
    ``force``. ``force`` redoes every run without losing the results it
    replaces before there are new ones: once the config's checks have
    passed, the folder's ``runs/``, tables and manifest move into its hidden
    folder ``.replaced/`` (a results folder of its own, which
    :func:`~normprobe.results.load_results` reads), deleted only when the new
    analysis has finished. An interrupted analysis (Ctrl-C, a crash) leaves
    them there, beside the new runs finished so far, which the folder's
    tables and manifest describe (the old runs are never in them). Run it
    again without ``force`` to resume it (``.replaced/`` is deleted when it
    has finished), or with ``force`` to start it again: its unfinished
    analysis is deleted, and ``.replaced/``, the oldest complete results,
    kept until the new one has finished.

    ``executor``: ``"local"`` runs the runs one after another in this
    process, or, with ``jobs=N`` (N > 1), ``N`` at a time in worker
    processes; ``"ray"`` makes each run a Ray task, on the cluster at
    ``address`` (``"auto"``: the one this machine belongs to) or on a local
    Ray instance with ``jobs`` CPUs (see :mod:`normprobe.executors`).

    Every run uses ``train.threads`` torch threads; with ``auto`` (the
    default) a count from the largest model's size, this machine's cores and
    ``jobs``, never the load (:mod:`normprobe.threads`; 1 per Ray task). The
    count is recorded with each run and a resume keeps it. ``threads`` (a
    number or ``"auto"``) replaces ``train.threads`` for this call without
    changing the config or its hash, as ``jobs`` does. The tables are the
    same whichever executor ran them when the thread count is the same (CPU
    reductions can depend on it). The caller's torch thread count is
    restored on return. With
    worker processes, call ``analyze`` from a script's
    ``if __name__ == "__main__":`` block (the ``spawn`` start method
    imports the main module again).
    """
    executors.check_executor(executor, jobs, address)
    check_threads(threads, "threads")
    config = _resolve(config_or_path, overrides)
    what = "output"
    if out is not None:
        what = "--out"
        config = config.model_copy(update={"output": str(out)})
    if config.output is not None and not config.output.strip():
        raise ConfigError(
            f"{what}: empty; give a folder, e.g. runs/{config.name} (an empty path would "
            "write into the current folder)"
        )
    directory = config.output_dir()
    check_output_folder(directory, what)
    _check_ours(directory, what)
    chash = config_hash(config)
    if log is None:
        log = (
            (lambda line: None)
            if quiet
            else (lambda line: print(line, file=sys.stderr, flush=True))
        )

    device = torch.device(config.train.device)
    check_device = device
    if device.type == "cuda" and not torch.cuda.is_available():
        if executor != "ray":
            raise ConfigError(
                "train.device: cuda was asked for but torch sees no CUDA device; use cpu"
            )
        # the Ray tasks get the GPUs; this machine only checks the models, on its CPU
        check_device = torch.device("cpu")

    caller_threads = torch.get_num_threads()
    created = not directory.exists()
    make_output_folder(directory, what)
    try:
        # the config's checks build trial layers; each run seeds what it draws itself
        # (run_one): the caller's random stream is left as it was
        with folder_lock(directory, what), torch.random.fork_rng(devices=[]):
            _settle_replacement(directory)
            if not force:
                _refuse_other_config(directory, config, chash)
            return _analyze(
                config,
                directory,
                chash,
                device,
                force,
                quiet,
                log,
                executor=executor,
                jobs=jobs,
                address=address,
                check_device=check_device,
                threads=threads,
            )
    except NormprobeError:
        # refused before anything was written: leave no empty folder behind
        if created and directory.is_dir():
            if {p.name for p in directory.iterdir()} <= {LOCK_NAME, OWNER_NAME}:
                shutil.rmtree(directory, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(caller_threads)


#: What an otherwise empty folder may hold: the lock of an analysis refused before it wrote.
_OURS = {LOCK_NAME, OWNER_NAME}

#: The hidden folder that holds the results ``force`` replaces until the new analysis has
#: finished: a results folder of its own (runs/, tables, manifest), which ``finished_runs``,
#: ``assemble`` and ``load_results`` of the output folder do not read (they read runs/ and the
#: tables), ``clean_partial`` does not remove (not a ``.*.tmp`` name), and beside the lock.
REPLACED = ".replaced"
#: ``REPLACED`` while the results are being moved into it (renamed once all are in).
_REPLACING = ".replacing"
#: In ``REPLACED``: the hash and config of the analysis that replaces them.
_NOTE = "replaced_by.json"
#: What an analysis writes in its output folder, in the order it is removed (the manifest last:
#: a folder whose removal was cut short still says which config its runs were).
_RESULT_FILES = (
    "runs",
    "results.parquet",
    "results.csv",
    "hessian_nodes.parquet",
    "hessian_density.parquet",
    "runs.jsonl",
    "manifest.json",
)


def _run_count(directory: Path) -> int:
    runs = directory / "runs"
    if not runs.is_dir():
        return 0
    return sum(1 for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folders(count: int) -> str:
    return f"{count} run folder{'' if count == 1 else 's'}"


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when it is missing, unreadable or not an object
    (what the folder's manifest says, read where a missing answer falls back to a default)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _replaced(directory: Path) -> Path | None:
    """The folder of the results a ``force`` analysis is replacing, if one was interrupted."""
    replaced = directory / REPLACED
    return replaced if (replaced / _NOTE).is_file() else None


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _drop_replaced(directory: Path) -> None:
    """Delete ``REPLACED``: renamed first to a ``.*.tmp`` name, which the next analysis's
    ``clean_partial`` removes if the deletion is cut short."""
    gone = directory / f"{REPLACED}.tmp"
    if gone.exists():
        _remove(gone)
    os.replace(directory / REPLACED, gone)
    shutil.rmtree(gone, ignore_errors=True)


def _settle_replacement(directory: Path) -> None:
    """Finish what an interrupted ``force`` analysis left half done, under the folder's lock.

    Results caught half way into ``.replacing/`` go back where they were (no
    new run had started: the analysis that moved them starts again, or the
    folder is resumed as it was). ``.replaced/`` beside a finished analysis
    of the config that replaced it is deleted (only its deletion was cut
    short).
    """
    replacing = directory / _REPLACING
    if replacing.is_dir():
        for name in _RESULT_FILES:
            if (replacing / name).exists() and not (directory / name).exists():
                os.replace(replacing / name, directory / name)
        (replacing / _NOTE).unlink(missing_ok=True)
        try:
            replacing.rmdir()
        except OSError:
            left = ", ".join(sorted(p.name for p in replacing.iterdir()))
            raise ResultsError(
                f"output: {str(replacing)!r} holds {left}, results that an interrupted --force "
                "was setting aside but the folder has again; keep one copy and remove the other"
            ) from None
    replaced = _replaced(directory)
    if replaced is not None:
        manifest = _read_json(directory / "manifest.json")
        note = _read_json(replaced / _NOTE)
        if manifest.get("finished") and manifest.get("config_hash") == note.get("config_hash"):
            _drop_replaced(directory)


def _refuse_other_config(directory: Path, config: Config, chash: str) -> None:
    """Refuse (without ``force``) a folder that holds another config's results, or that an
    interrupted ``force`` analysis of another config was filling."""
    replaced = _replaced(directory)
    other = manifest_matches(directory, chash)
    if other is None and replaced is not None and not (directory / "manifest.json").exists():
        note = _read_json(replaced / _NOTE)
        other = note if note.get("config_hash") not in (None, chash) else None
    if other is None:
        return
    changed = config_changes(other.get("config"), config.to_dict())
    differs = (
        f"(hash {other.get('config_hash')}, this one {chash}"
        f"{'; changed: ' + listed(changed, 6) if changed else ''})"
    )
    count = _run_count(directory)
    if replaced is None:
        raise ConfigError(
            f"output: {str(directory)!r} holds results of a different config {differs}; pass "
            f"--out to write somewhere else, or --force to replace them (the {_folders(count)} "
            f"there move to {str(directory / REPLACED)!r} and stay there until the new "
            "analysis has finished)"
        )
    raise ConfigError(
        f"output: {str(directory)!r} holds the unfinished results of an interrupted --force "
        f"analysis of a different config {differs}, which was replacing the "
        f"{_folders(_run_count(replaced))} in {str(replaced)!r}; pass --out to write somewhere "
        f"else, or --force to replace them with this config's results (the "
        f"{_folders(count)} of the interrupted analysis {'is' if count == 1 else 'are'} "
        f"deleted, those in "
        f"{str(replaced)!r} stay until the new analysis has finished)"
    )


def _set_aside(directory: Path, config: Config, chash: str, log: Callable[[str], None]) -> None:
    """Make room for a ``force`` analysis without losing the results it replaces.

    The folder's results move into ``.replaced/`` (through ``.replacing/``,
    renamed once everything is in), with a note of the config that replaces
    them. If ``.replaced/`` is there already, an earlier ``force`` analysis
    was interrupted: the results it set aside are the oldest complete ones
    and stay; its own unfinished runs beside them are deleted (``force``
    redoes every run).
    """
    note = {
        "config_hash": chash,
        "config": config.to_dict(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    present = [name for name in _RESULT_FILES if (directory / name).exists()]
    replaced = _replaced(directory)
    if replaced is not None:
        count = _run_count(directory)
        for name in present:
            _remove(directory / name)
        write_json_atomic(replaced / _NOTE, note)
        log(
            f"an earlier --force was interrupted: deleting the {_folders(count)} it wrote "
            f"(--force redoes every run); the {_folders(_run_count(replaced))} it was replacing "
            f"stay in {replaced} until this analysis has finished"
        )
        return
    if not present:
        return
    if (directory / REPLACED).exists():
        raise ResultsError(
            f"output: {str(directory / REPLACED)!r} is in the way: normprobe keeps the results "
            "that --force replaces there, and this one holds no note of it; move it elsewhere"
        )
    count = _run_count(directory)
    replacing = directory / _REPLACING
    replacing.mkdir()
    for name in present:
        os.replace(directory / name, replacing / name)
    write_json_atomic(replacing / _NOTE, note)
    os.replace(replacing, directory / REPLACED)
    log(
        f"--force: the earlier results ({_folders(count)}) are moved to "
        f"{directory / REPLACED} and deleted once this analysis has finished"
    )


def config_changes(before: Any, after: Mapping[str, Any]) -> list[str]:
    """The fields in which two resolved configs (``Config.to_dict()``) differ, as
    ``train.lr_extend 2 -> 3``, in order; ``output`` is left out (where results go).

    >>> config_changes({"train": {"lr": [0.1], "steps": 5}}, {"train": {"lr": [0.1], "steps": 9}})
    ['train.steps 5 -> 9']
    """
    if not isinstance(before, Mapping):
        return []
    changes: list[str] = []

    def walk(old: Any, new: Any, path: str) -> None:
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            for key in list(dict.fromkeys([*old, *new])):
                if not path and key == "output":
                    continue
                walk(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        elif old != new:
            changes.append(f"{path} {old!r} -> {new!r}".replace("'", ""))

    walk(before, after, "")
    return changes


def _check_ours(directory: Path, what: str) -> None:
    """Refuse to write into an existing folder that is neither empty nor a normprobe results
    folder (a manifest or runs/ marks one): results there could replace someone's files."""
    if not directory.is_dir():
        return
    if (directory / "manifest.json").is_file() or (directory / "runs").is_dir():
        return
    if (directory / REPLACED).is_dir() or (directory / _REPLACING).is_dir():
        return  # results a --force analysis set aside, and nothing new yet
    foreign = sorted(p.name for p in directory.iterdir() if p.name not in _OURS)
    foreign = [n for n in foreign if not (n.startswith(".") and n.endswith(".tmp"))]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ResultsError(
            f"{what}: {str(directory)!r} is not empty and holds no normprobe results "
            f"({shown}); give a new or empty folder"
        )


def _thread_count(
    config: Config,
    directory: Path,
    force: bool,
    executor: str,
    jobs: int | None,
    log: Callable[[str], None],
    parameters: int,
    threads: Threads = None,
) -> int:
    """The torch thread count every run of this grid trains with.

    ``train.threads``, or with ``auto`` :func:`normprobe.executors.run_threads`
    of the grid's largest model (``parameters``). CPU reductions can depend
    on the thread count, so a grid whose finished runs used one count is
    resumed with that count (with ``auto``, which may pick another count
    under another ``--jobs``) or refused (when a number asks for another):
    mixing counts would make the tables depend on how the grid was
    interrupted. ``threads``, when given, replaces ``train.threads``.
    """
    what = "train.threads"
    asked = config.train.threads
    if threads is not None:
        what, asked = "threads", threads
    wanted = executors.run_threads(asked, parameters, executor, jobs)
    asked = None if asked == AUTO else asked
    if force:
        return wanted
    done = finished_runs(directory)
    if not done:
        return wanted
    manifest_threads = _manifest_threads(directory)
    counts = {s.get("threads", manifest_threads) for s in done.values()} - {None}
    if not counts:
        return wanted
    if len(counts) > 1:
        raise ConfigError(
            f"output: the finished runs in {str(directory)!r} were trained with different torch "
            f"thread counts ({', '.join(map(str, sorted(counts)))}); pass --force to redo them all"
        )
    recorded = int(counts.pop())
    if asked is not None and asked != recorded:
        raise ConfigError(
            f"{what}: {asked}, but the finished runs in {str(directory)!r} were trained "
            f"with {recorded} torch thread(s); leave it at auto to resume them with "
            f"{recorded}, or pass --force to redo them all"
        )
    if recorded != wanted:
        log(f"resuming with {recorded} torch thread(s), the count the finished runs used")
    return recorded


def _manifest_threads(directory: Path) -> int | None:
    value = _read_json(directory / "manifest.json").get("threads")
    return value if isinstance(value, int) else None


def _analyze(
    config: Config,
    directory: Path,
    chash: str,
    device: torch.device,
    force: bool,
    quiet: bool,
    log: Callable[[str], None],
    *,
    executor: str = "local",
    jobs: int | None = None,
    address: str | None = None,
    check_device: torch.device | None = None,
    threads: Threads = None,
) -> Results:
    check_device = device if check_device is None else check_device
    variants = config.variant_configs()
    data: dict[str | None, ProbeData] = {}
    usable: dict[str | None, list[str]] = {}
    skipped: dict[str, str] = {}
    loaded: dict[str, ProbeData] = {}
    sizes: dict[str, int] = {}  # parameters of each usable model, for threads: auto
    for variant, vconfig in variants:
        key = json.dumps(vconfig.data.model_dump(mode="json"), sort_keys=True)
        same = loaded.get(key)
        try:
            check_norm_options(vconfig)
            data[variant] = prepare_data(vconfig, same.dataset if same is not None else None)
            loaded.setdefault(key, data[variant])
            usable[variant], why = preflight(vconfig, data[variant], check_device, sizes)
        except ConfigError as err:
            if variant is None:
                raise
            raise ConfigError(f"variants.{variant}: {err}") from None
        for norm, reason in why.items():
            where = f" (variant {variant})" if variant is not None else ""
            if f"{norm}{where}" not in skipped:
                log(f"skipping {norm}{where}: {reason}")
            skipped[f"{norm}{where}"] = reason
    threads = _thread_count(
        config, directory, force, executor, jobs, log, max(sizes.values(), default=0), threads
    )
    if executors.in_process(executor, jobs):
        torch.set_num_threads(threads)  # analyze() restores the caller's count

    directory.mkdir(parents=True, exist_ok=True)
    if force:
        # the checks have passed: set the old results aside, to be deleted once this has finished
        _set_aside(directory, config, chash, log)
    elif _replaced(directory) is not None:
        log(
            f"resuming the analysis of an interrupted --force: the results it replaces stay in "
            f"{_replaced(directory)} until it has finished"
        )
    clean_partial(directory)
    broken: dict[str, str] = {}
    # rates added past a grid edge by an earlier run of this analysis (train.lr_extend)
    extensions = [] if force else _recorded_extensions(directory)
    first = data[variants[0][0]]
    manifest = {
        "name": config.name,
        "config_hash": chash,
        "config": config.to_dict(),
        "versions": _versions(),
        "normprobe_version": _versions()["normprobe"],
        "skipped": skipped,
        "data": {"name": first.dataset.name, "info": first.dataset.info},
        "device": str(device),
        "threads": threads,
        "executor": {"kind": executor, "jobs": jobs, "address": address},
        "lr_extensions": extensions,
    }
    write_json_atomic(directory / "manifest.json", manifest)

    plan = plan_runs(config, usable, variants=variants)
    plan += _extension_specs(extensions, variants, usable)
    done = finished_runs(directory, broken)
    for run, problem in sorted(broken.items()):
        log(f"{run}: its folder is incomplete ({problem}); running it again")
    todo = [spec for spec in plan if spec.run not in done]
    if done and todo:
        log(f"resuming: {len(plan) - len(todo)} of {len(plan)} runs already finished")

    def run_all(todo: list[RunSpec]) -> None:
        finished = 0

        def finish(record: RunRecord) -> None:
            nonlocal finished
            finished += 1
            record.info["threads"] = threads
            write_run(directory, record)
            log(f"[{finished}/{len(todo)}] {_report(record)}")

        if executors.in_process(executor, jobs):
            bar_factory = _progress(quiet)
            for spec in todo:
                finish(run_one(spec, data[spec.variant], device=device, progress_bar=bar_factory))
        elif todo:
            # the workers get the prepared data, pickled once; each spec carries its config
            payload = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
            common = {
                "threads": threads,
                "device": str(device),
                "on_record": finish,
                "log": log,
            }
            if executor == "ray":
                executors.run_on_ray(todo, payload, jobs=jobs, address=address, **common)
            else:
                assert jobs is not None
                executors.run_in_pool(
                    todo, payload, jobs=min(jobs, len(todo)), folder=directory, **common
                )

    read: dict[str, Any] = {}  # the run folders assembled so far (each stage reads only new ones)
    try:
        run_all(todo)
        while any(v.train.lr_extend.max_extra for _, v in variants):
            added = _extend_grids(
                assemble(directory, write=False, cache=read), variants, usable, extensions
            )
            if not added:
                break
            for _, line in added:
                if line:
                    log(line)
            manifest["lr_extensions"] = extensions
            write_json_atomic(directory / "manifest.json", manifest)
            done = finished_runs(directory)
            run_all([spec for spec, _ in added if spec.run not in done])
    except BaseException:
        # the tables are written once, at the end of the grid, and on interruption: the runs
        # finished so far are in them (and in their folders, which a rerun resumes from)
        assemble(directory, cache=read)
        replaced = _replaced(directory)
        if replaced is not None:
            log(
                f"interrupted: the results this analysis replaces stay in {replaced}; run it "
                "again without --force to resume it from its finished runs (the replaced "
                "results are deleted once it has finished), or with --force to start it again"
            )
        raise
    results = assemble(directory, cache=read)
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(directory / "manifest.json", manifest)
    if _replaced(directory) is not None:
        # the new results are complete: the ones they replace can go
        _drop_replaced(directory)
    results.manifest = manifest
    return results


def _recorded_extensions(directory: Path) -> list[dict[str, Any]]:
    """The learning rates added to the grid by an earlier ``analyze`` of this folder."""
    value = _read_json(directory / "manifest.json").get("lr_extensions")
    if not isinstance(value, list):
        return []
    return [
        e
        for e in value
        if isinstance(e, dict) and isinstance(e.get("normalizer"), str) and "lr" in e
    ]


def _extension_specs(
    extensions: list[dict[str, Any]],
    variants: Sequence[tuple[str | None, Config]],
    usable: Mapping[str | None, Sequence[str]],
) -> list[RunSpec]:
    """The runs of the recorded extra rates (every seed), for the variants and normalizers
    this config still runs."""
    configs = dict(variants)
    specs = []
    for e in extensions:
        variant, norm = e.get("variant"), e["normalizer"]
        if variant not in configs or norm not in usable.get(variant, ()):
            continue
        vconfig = configs[variant]
        if float(e["lr"]) in vconfig.train.rates_for(norm):
            continue
        specs += [RunSpec(norm, float(e["lr"]), seed, variant, vconfig) for seed in vconfig.train.seeds]
    return specs


def _round_rate(rate: float) -> float:
    """A learning rate to three significant digits (0.125, not 0.12500000000000003)."""
    return float(f"{rate:.3g}")


def _extend_grids(
    results: Results,
    variants: Sequence[tuple[str | None, Config]],
    usable: Mapping[str | None, Sequence[str]],
    extensions: list[dict[str, Any]],
) -> list[tuple[RunSpec, str]]:
    """The runs of one more rate beyond each edge where ``train.lr_extend`` asks for it.

    ``extensions`` (the manifest's record) receives each added rate. Each
    (variant, normalizer) whose selected rate is the smallest (largest) of
    its grid gets the edge rate divided (multiplied) by the factor, unless
    ``max_extra`` rates were added below (above) the configured grid already.
    """
    runs = results.runs
    if runs.empty or "lr_edge" not in runs:
        return []
    added: list[tuple[RunSpec, str]] = []
    for variant, vconfig in variants:
        spec = vconfig.train.lr_extend
        if spec.max_extra == 0:
            continue
        for norm in usable.get(variant, ()):
            group = runs[runs["normalizer"] == norm]
            if "variant" in group:
                group = group[group["variant"].isna() if variant is None else group["variant"] == variant]
            if group.empty:
                continue
            edge = str(group["lr_edge"].iloc[0])
            if edge not in ("low", "high", "single"):
                continue
            base = sorted(vconfig.train.rates_for(norm))
            grid = sorted(set(group["lr"].astype(float)))
            directions = ("low", "high") if edge == "single" else (edge,)
            for direction in directions:
                if direction == "high":
                    extra = [r for r in grid if r > base[-1]]
                    factor = spec.factor or (base[-1] / base[-2] if len(base) > 1 else 3.0)
                    rate = _round_rate(grid[-1] * factor)
                else:
                    extra = [r for r in grid if r < base[0]]
                    factor = spec.factor or (base[1] / base[0] if len(base) > 1 else 3.0)
                    rate = _round_rate(grid[0] / factor)
                if len(extra) >= spec.max_extra or rate in grid:
                    continue
                extensions.append({"variant": variant, "normalizer": norm, "lr": rate})
                where = f" (variant {variant})" if variant is not None else ""
                selected = group[group["selected"].astype(bool)]["lr"]
                best = f"{float(selected.iloc[0]):g}" if len(selected) else "?"
                line = (
                    f"{norm}{where}: best rate {best} is at the {direction} edge of "
                    f"[{', '.join(f'{r:g}' for r in grid)}]; adding lr {rate:g} "
                    f"({len(extra) + 1} of at most {spec.max_extra} in that direction)"
                )
                specs = [RunSpec(norm, rate, seed, variant, vconfig) for seed in vconfig.train.seeds]
                added += [(s, line if i == 0 else "") for i, s in enumerate(specs)]
    return added


def unsettled_lines(results: Results) -> list[str]:
    """One ``not settled`` line per (normalizer, variant) whose selected rate is at an edge
    of its grid (or that has none), with the reason, and which split selected.

    >>> runs = pd.DataFrame({"normalizer": ["layer"], "lr": [0.05], "selected": [True],
    ...     "lr_edge": ["high"], "selected_by": ["val_acc"],
    ...     "lr_note": ["best rate 0.05 is the top of the grid [0.01, 0.05]"]})
    >>> unsettled_lines(Results(Path("."), pd.DataFrame(), runs, pd.DataFrame(), pd.DataFrame(), {}))
    ['learning rates selected on val_acc (final value, mean over seeds)', 'not settled: layer: best rate 0.05 is the top of the grid [0.01, 0.05]']
    """
    runs = results.runs
    if runs.empty or "lr_edge" not in runs:
        return []
    lines = []
    if "selected_by" in runs and runs["selected_by"].notna().any():
        metric = runs["selected_by"].dropna().iloc[0]
        on_test = (
            ": the test set chose them, so their test scores are optimistic; data.held_out "
            "selects on examples held out of training instead"
            if str(metric).startswith("test_") and (runs["lr_edge"] != "single").any()
            else ""
        )
        line = f"learning rates selected on {metric} (final value, mean over seeds)"
        lines.append(line + on_test)
    keys = ["normalizer", "variant"] if "variant" in runs else ["normalizer"]
    single = []
    for key, group in runs.groupby(keys, dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        edge = str(group["lr_edge"].iloc[0] or "")
        where = f" (variant {key[1]})" if len(key) > 1 and not pd.isna(key[1]) else ""
        if edge == "single":
            single.append(f"{key[0]}{where}")
        elif edge:
            lines.append(f"not settled: {key[0]}{where}: {group['lr_note'].iloc[0]}")
    if single:
        lines.append(
            f"not settled: one learning rate, nothing selected it: {', '.join(single)} "
            "(give train.lr a grid, or train.lr_extend)"
        )
    return lines


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in (
        "normprobe",
        "torch",
        "numpy",
        "scipy",
        "pandas",
        "pyarrow",
        "scikit-learn",
        "pydantic",
    ):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _progress(quiet: bool) -> Any:
    """The per-run progress bar factory, or None when quiet.

    ``tqdm.auto``: a notebook widget in Jupyter (when ipywidgets is
    installed), a text bar on a terminal. Elsewhere (a log file, a notebook
    without widgets) no bar: the one line per finished run is the progress.
    """
    if quiet:
        return None
    if _in_notebook() or sys.stderr.isatty():
        return tqdm
    return None


def _in_notebook() -> bool:
    """Whether ``tqdm.auto`` gives notebook widgets here (a Jupyter kernel with ipywidgets)."""
    return any(c.__module__.startswith("tqdm.notebook") for c in tqdm.__mro__)


def _report(record: RunRecord) -> str:
    """``batch_lr0.05_seed0: done in 6.9s, test acc 0.961`` (the progress line of a run)."""
    detail = {
        "done": "",
        "diverged": f" at step {record.diverged_step}",
        "failed": f": {record.error}",
    }[record.status]
    final = ""
    if record.status == "done":
        metrics = record.tables["metrics"]
        for metric, label, fmt in (
            ("test_acc", "test acc", ".3f"),
            ("test_perplexity", "ppl", ".2f"),
        ):
            rows = metrics[metrics["metric"] == metric]
            if len(rows):
                final += f", {label} {rows.sort_values('step')['value'].iloc[-1]:{fmt}}"
    return f"{record.run}: {record.status}{detail} in {record.seconds:.1f}s{final}"


def summary_line(results: Results) -> str:
    """``12 runs: 11 done, 1 diverged; results in runs/x``."""
    counts = results.runs["status"].value_counts().to_dict() if len(results.runs) else {}
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return f"{len(results.runs)} runs: {parts or 'none'}; results in {results.directory}"
