"""``normprobe analyze``: every (normalizer, learning rate, seed) run of a config.

The grid and its bookkeeping: the config is resolved once into run
specifications (:mod:`normprobe.plan`), checked against real layers and
data (:mod:`normprobe.checks`), and each run goes to
:func:`normprobe.run.run_one`, here or on an executor
(:mod:`normprobe.executors`). Each finished run is written to its own folder
atomically (see :mod:`normprobe.results`), so an interrupted analysis
resumes where it stopped; ``force=True`` redoes all. The result tables are
assembled from the run folders once, at the end of the grid (or when it is
interrupted), not after every run.

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
import pickle
import platform
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from normprobe import executors
from normprobe.checks import check_norm_options, preflight
from normprobe.config import Config, ConfigError, config_hash, load_config
from normprobe.plan import ProbeData, RunSpec, build_run_model, plan_runs, prepare_data
from normprobe.results import (
    Results,
    RunRecord,
    assemble,
    clean_partial,
    finished_runs,
    manifest_matches,
    write_json_atomic,
    write_run,
)
from normprobe.run import run_one

__all__ = [
    "analyze",
    "summary_line",
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
) -> Results:
    """Run every (normalizer, lr, seed) of a config and return the result tables.

    ``config_or_path`` is a YAML path, a mapping or a :class:`Config`;
    ``overrides`` are ``key.sub=value`` strings as on the command line.
    Finished runs found in the output directory are kept (resume) unless
    ``force``. ``log`` receives one line per finished run (default: stderr,
    unless ``quiet``).

    ``executor``: ``"local"`` runs the runs one after another in this
    process, or, with ``jobs=N`` (N > 1), ``N`` at a time in worker
    processes; ``"ray"`` makes each run a Ray task, on the cluster at
    ``address`` (``"auto"``: the one this machine belongs to) or on a local
    Ray instance with ``jobs`` CPUs (see :mod:`normprobe.executors`). Worker
    processes and Ray tasks use ``train.threads`` torch threads, 1 if unset.
    The tables are the same whichever executor ran them (with the same
    ``train.threads``: CPU reductions can depend on the thread count). With
    worker processes, call ``analyze`` from a script's
    ``if __name__ == "__main__":`` block (the ``spawn`` start method
    imports the main module again).
    """
    executors.check_executor(executor, jobs, address)
    config = _resolve(config_or_path, overrides)
    if out is not None:
        config = config.model_copy(update={"output": str(out)})
    directory = config.output_dir()
    chash = config_hash(config)
    if log is None:
        log = (
            (lambda line: None)
            if quiet
            else (lambda line: print(line, file=sys.stderr, flush=True))
        )

    if not force:
        other = manifest_matches(directory, chash) if directory.exists() else None
        if other is not None:
            raise ConfigError(
                f"output: {str(directory)!r} holds results of a different config (hash "
                f"{other.get('config_hash')}, this one {chash}); pass --force to replace them, "
                f"or --out to write somewhere else"
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

    threads = torch.get_num_threads()
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    try:
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
        )
    finally:
        torch.set_num_threads(threads)


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
) -> Results:
    check_device = device if check_device is None else check_device
    variants = config.variant_configs()
    data: dict[str | None, ProbeData] = {}
    usable: dict[str | None, list[str]] = {}
    skipped: dict[str, str] = {}
    loaded: dict[str, ProbeData] = {}
    for variant, vconfig in variants:
        key = json.dumps(vconfig.data.model_dump(mode="json"), sort_keys=True)
        same = loaded.get(key)
        try:
            check_norm_options(vconfig)
            data[variant] = prepare_data(vconfig, same.dataset if same is not None else None)
            loaded.setdefault(key, data[variant])
            usable[variant], why = preflight(vconfig, data[variant], check_device)
        except ConfigError as err:
            if variant is None:
                raise
            raise ConfigError(f"variants.{variant}: {err}") from None
        for norm, reason in why.items():
            where = f" (variant {variant})" if variant is not None else ""
            if f"{norm}{where}" not in skipped:
                log(f"skipping {norm}{where}: {reason}")
            skipped[f"{norm}{where}"] = reason

    if force and directory.exists():
        for name in (
            "runs",
            "results.parquet",
            "results.csv",
            "hessian_nodes.parquet",
            "hessian_density.parquet",
            "runs.jsonl",
            "manifest.json",
        ):
            path = directory / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    clean_partial(directory)
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
        "threads": (
            torch.get_num_threads()
            if executors.in_process(executor, jobs)
            else executors.worker_threads(config.train.threads)
        ),
        "executor": {"kind": executor, "jobs": jobs, "address": address},
    }
    write_json_atomic(directory / "manifest.json", manifest)

    plan = plan_runs(config, usable, variants=variants)
    done = finished_runs(directory)
    todo = [spec for spec in plan if spec.run not in done]
    if done and todo:
        log(f"resuming: {len(plan) - len(todo)} of {len(plan)} runs already finished")
    finished = 0

    def finish(record: RunRecord) -> None:
        nonlocal finished
        finished += 1
        write_run(directory, record)
        log(f"[{finished}/{len(todo)}] {_report(record)}")

    try:
        if executors.in_process(executor, jobs):
            bar_factory = _progress(quiet)
            for spec in todo:
                finish(run_one(spec, data[spec.variant], device=device, progress_bar=bar_factory))
        elif todo:
            # the workers get the prepared data, pickled once; each spec carries its config
            payload = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
            common = {
                "threads": executors.worker_threads(config.train.threads),
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
    except BaseException:
        # the tables are written once, at the end of the grid, and on interruption: the runs
        # finished so far are in them (and in their folders, which a rerun resumes from)
        assemble(directory)
        raise
    results = assemble(directory)
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(directory / "manifest.json", manifest)
    results.manifest = manifest
    return results


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
    """The per-run progress bar factory (tqdm), or None when quiet or not on a terminal."""
    if quiet or not sys.stderr.isatty():
        return None
    return tqdm


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
