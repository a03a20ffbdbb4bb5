"""``normprobe analyze``: every (normalizer, learning rate, seed) run of a config.

For each run: build the model, train it, and at the scheduled steps measure
accuracy and loss, the probes and the Hessian spectrum. Each finished run is
written to its own folder atomically (see :mod:`normprobe.results`), so an
interrupted analysis resumes where it stopped; ``force=True`` redoes all.

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
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from normprobe.config import Config, ConfigError, config_hash, import_factory, load_config
from normprobe.errors import NormprobeError
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

__all__ = [
    "analyze",
    "summary_line",
    "RunSpec",
    "plan_runs",
    "build_run_model",
    "ProbeData",
    "prepare_data",
]


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid (``variant`` None when the config has no variants)."""

    normalizer: str
    lr: float
    seed: int
    variant: str | None = None

    @property
    def run(self) -> str:
        variant = f"_{self.variant}" if self.variant is not None else ""
        return f"{self.normalizer}{variant}_lr{self.lr:g}_seed{self.seed}"

    def failed(
        self, error: str, seconds: float = 0.0, info: dict[str, Any] | None = None
    ) -> RunRecord:
        """The record of this run ending as ``failed`` with ``error``."""
        return RunRecord(
            self.run,
            self.normalizer,
            self.lr,
            self.seed,
            "failed",
            variant=self.variant,
            seconds=seconds,
            error=error,
            info=info or {},
        )


def plan_runs(
    config: Config,
    normalizers: Sequence[str] | Mapping[str | None, Sequence[str]] | None = None,
) -> list[RunSpec]:
    """The (variant, normalizer, lr, seed) grid in a fixed order.

    ``normalizers``: the names to run (default: the config's), or a mapping
    from variant name (None without variants) to the names to run there.

    >>> cfg = load_config({"normalizers": ["batch", "layer"], "train": {"seeds": [0, 1]},
    ...     "variants": {"bs32": {"train.batch_size": 32}, "bs8": {"train.batch_size": 8,
    ...     "normalizers": ["batch"]}}})[0]
    >>> [spec.run for spec in plan_runs(cfg)]  # doctest: +NORMALIZE_WHITESPACE
    ['batch_bs32_lr0.1_seed0', 'batch_bs32_lr0.1_seed1', 'layer_bs32_lr0.1_seed0',
     'layer_bs32_lr0.1_seed1', 'batch_bs8_lr0.1_seed0', 'batch_bs8_lr0.1_seed1']
    """
    specs = []
    for variant, vconfig in config.variant_configs():
        if normalizers is None:
            names = vconfig.normalizer_names()
        elif isinstance(normalizers, Mapping):
            names = list(normalizers.get(variant, ()))
        else:
            names = list(normalizers)
        specs += [
            RunSpec(norm, lr, seed, variant)
            for norm in names
            for lr in vconfig.train.rates_for(norm)
            for seed in vconfig.train.seeds
        ]
    return specs


@dataclass(frozen=True)
class ProbeData:
    """The dataset and the fixed batches every run is measured on."""

    dataset: Any
    batch_a: tuple[torch.Tensor, torch.Tensor]
    batch_b: tuple[torch.Tensor, torch.Tensor]
    hessian: tuple[torch.Tensor, torch.Tensor]


def prepare_data(config: Config, dataset: Any = None) -> ProbeData:
    """Load the dataset and draw the probe batches (two disjoint ones) and the Hessian set.

    The batches are drawn once, with ``data.seed``, so every normalizer,
    learning rate and seed is measured on the same examples. ``dataset``: an
    already loaded dataset of ``config.data`` to reuse.
    """
    from normprobe.data import load_dataset

    if dataset is None:
        try:
            dataset = load_dataset(config.data.name, **config.data.options)
        except NormprobeError as err:
            raise ConfigError(f"data.options: {err}") from None
    n = len(dataset.train)
    size = config.data.probe_batch
    if 2 * size > n:
        raise ConfigError(
            f"data.probe_batch: two disjoint probe batches of {size} need {2 * size} training "
            f"examples, the dataset has {n}; use probe_batch <= {n // 2}"
        )
    if config.train.batch_size > n:
        raise ConfigError(
            f"train.batch_size: {config.train.batch_size} is larger than the training set ({n})"
        )
    sampler = config.train.sampler
    rc = config.probes.representation
    if rc.enabled and rc.pairing == "noise" and not dataset.train.x.is_floating_point():
        raise ConfigError(
            f"probes.representation.pairing: 'noise' adds Gaussian noise to the inputs, but "
            f"dataset {config.data.name!r} gives {str(dataset.train.x.dtype).replace('torch.', '')}"
            f" inputs (token ids); use pairing: independent (a disjoint minibatch) or within"
        )
    if sampler.kind == "labels" and dataset.train.y.dim() > 1:
        raise ConfigError(
            f"train.sampler: the labels sampler groups examples by their class label, but "
            f"dataset {config.data.name!r} has a target per position; use sampler: iid"
        )
    if sampler.kind == "labels":
        counts = torch.bincount(dataset.train.y)
        present = int((counts > 0).sum())
        if sampler.labels_per_batch > present:
            raise ConfigError(
                f"train.sampler.labels_per_batch: {sampler.labels_per_batch} distinct labels per "
                f"batch, but the training set has {present}; use labels_per_batch <= {present}"
            )
        fewest = int(counts[counts > 0].min())
        if sampler.per_label > fewest:
            raise ConfigError(
                f"train.sampler.per_label: {sampler.per_label} examples per label, but a label "
                f"has only {fewest} training examples; use per_label <= {fewest}"
            )
    g = torch.Generator().manual_seed(config.data.seed)
    order = torch.randperm(n, generator=g)
    x, y = dataset.train.x, dataset.train.y
    a, b = order[:size], order[size : 2 * size]
    h = torch.randperm(n, generator=g)[: min(config.data.hessian_samples, n)]
    return ProbeData(dataset, (x[a], y[a]), (x[b], y[b]), (x[h], y[h]))


def build_run_model(config: Config, normalizer: str, seed: int, dataset: Any) -> nn.Module:
    """Build the run's model: a zoo model, a user factory, or a factory with swapped norms."""
    from normprobe.models import build_model, model_options
    from normprobe.models.swap import swap_norms

    mc = config.model
    options = dict(mc.options)
    norm_options = config.norm_options_for(normalizer)
    if mc.name is not None:
        _check_model_fits_data(config, dataset)
        options.pop("norm_options", None)
        if norm_options:
            options["norm_options"] = norm_options
        valid = model_options(mc.name)
        if "input_shape" in valid:
            options.setdefault("input_shape", dataset.input_shape)
        if "num_classes" in valid:
            options.setdefault("num_classes", dataset.num_classes)
        return build_model(mc.name, normalizer, seed=seed, **options)
    factory = import_factory(mc.factory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if mc.swap_norms:
            model = factory(**options)
            if config.norm_batch_for(normalizer)[0] is None:  # per-example: norm_batch ignored
                norm_options = {k: v for k, v in norm_options.items() if k != "norm_batch"}
            swap_norms(model, normalizer, **norm_options)
        elif norm_options:
            model = factory(norm=normalizer, norm_options=norm_options, **options)
        else:
            model = factory(norm=normalizer, **options)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.factory: {mc.factory} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _check_model_fits_data(config: Config, dataset: Any) -> None:
    """A zoo model meets data it can read: token windows for the transformer, features otherwise."""
    from normprobe.models import MODELS

    name = MODELS.canonical(config.model.name)
    x, y = dataset.train.x, dataset.train.y
    tokens = not x.is_floating_point() and x.dim() == 2 and y.shape == x.shape
    if name == "transformer" and not tokens:
        raise ConfigError(
            f"model.name: the transformer reads token ids (N, T) with a next-token target per "
            f"position, but dataset {config.data.name!r} gives inputs "
            f"{str(x.dtype).replace('torch.', '')} {tuple(x.shape[1:])} and targets "
            f"{tuple(y.shape[1:]) or 'one per example'}; use data: {{name: text}}"
        )
    if name != "transformer" and y.dim() > 1:
        raise ConfigError(
            f"model.name: {name!r} classifies real-valued inputs, but dataset "
            f"{config.data.name!r} gives token ids (N, T) with a next-token target per position; "
            f"use model: {{name: transformer}}"
        )
    context = config.model.options.get("context")
    if name == "transformer" and isinstance(context, int) and context < x.shape[1]:
        raise ConfigError(
            f"model.options.context: {context} is shorter than the data's windows of "
            f"{x.shape[1]} tokens (data.options.window); set context >= {x.shape[1]}, or "
            f"window <= {context}"
        )


def _to(
    batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[0].to(device), batch[1].to(device)


def make_measure(
    config: Config,
    data: ProbeData,
    probe_steps: set[int],
    hessian_steps: set[int],
    hessian_tables: dict[str, list[pd.DataFrame]],
    device: torch.device,
    seed: int,
) -> Callable[[int, nn.Module], list[pd.DataFrame]]:
    """The callback the training loop calls at each scheduled step."""
    pc, hc = config.probes, config.hessian
    # K of the outlier ratio lambda_1 / lambda_K: the classes (003 sec. 6) unless the config says
    num_classes = hc.outlier_k or getattr(data.dataset, "num_classes", None)
    batch_a, batch_b, hessian_set = (
        _to(data.batch_a, device),
        _to(data.batch_b, device),
        _to(data.hessian, device),
    )

    def tagged(frame: pd.DataFrame, step: int) -> pd.DataFrame:
        frame = frame.copy()
        frame.insert(0, "step", step)
        return frame

    def measure(step: int, model: nn.Module) -> list[pd.DataFrame]:
        from normprobe.training import loss_for

        # mean cross-entropy: per example, or per token for a language model
        loss_fn = loss_for(model)
        frames: list[pd.DataFrame] = []
        if step in probe_steps:
            from normprobe.probes import (
                gradient_correlation,
                gradient_norms,
                gradient_statistics,
                representation_correlation,
            )

            rc = pc.representation
            if rc.enabled:
                kwargs: dict[str, Any] = {
                    "pairing": rc.pairing,
                    "mode": rc.mode,
                    "layers": rc.layers,
                }
                if rc.pairing == "noise":
                    kwargs.update(noise_scale=rc.noise_scale, seed=seed + step)
                elif rc.pairing == "independent":
                    kwargs["x_other"] = batch_b[0]
                frames.append(tagged(representation_correlation(model, batch_a[0], **kwargs), step))
            gc, gn = pc.gradient_correlation, pc.gradient_norms
            if gc.enabled and gn.enabled and (gc.layers, gc.mode) == (gn.layers, gn.mode):
                # batch_a's gradients serve both probes: one pass pair instead of three passes
                both = gradient_statistics(
                    model, loss_fn, batch_a, batch_b, layers=gc.layers, mode=gc.mode
                )
                frames.append(tagged(both[both["metric"] == "grad_corr"], step))
                norms: pd.DataFrame | None = both[both["metric"] != "grad_corr"]
            else:
                if gc.enabled:
                    frame = gradient_correlation(
                        model, loss_fn, batch_a, batch_b, layers=gc.layers, mode=gc.mode
                    )
                    frames.append(tagged(frame, step))
                norms = None
                if gn.enabled:
                    norms = gradient_norms(model, loss_fn, batch_a, layers=gn.layers, mode=gn.mode)
            if norms is not None:
                frame = norms.reset_index(drop=True)
                frames.append(tagged(frame, step))
                frames.append(
                    pd.DataFrame(
                        {
                            "step": [step],
                            "layer": [None],
                            "depth": [float("nan")],
                            "metric": ["grad_growth_rate"],
                            "value": [_growth_or_nan(frame)],
                        }
                    )
                )
        if step in probe_steps:
            frames.extend(
                tagged(f, step) for f in _structural(model, pc, batch_a[0], batch_b[0], seed)
            )
        if step in probe_steps and pc.batch_mean.enabled and has_norm_layers(model):
            from normprobe.probes import batch_mean

            frames.append(
                tagged(batch_mean(model, batch_a[0], mode=pc.batch_mean.mode, seed=seed), step)
            )
        if step in hessian_steps:
            from normprobe.hessian import hessian_spectrum
            from normprobe.training import norm_batch_of

            spectrum = hessian_spectrum(
                model,
                loss_fn,
                _hessian_chunks(hessian_set, hc.chunk_size, norm_batch_of(model)),
                what=tuple(dict.fromkeys(hc.pieces)),
                n_samples=None,  # the set drawn by prepare_data, data.hessian_samples long
                steps=hc.lanczos_steps,
                num_vectors=hc.start_vectors,
                k=hc.top_k,
                num_classes=num_classes,
                trace_samples=hc.trace_samples,
                norm_mode=hc.norm_mode,
                chunk_size=hc.chunk_size,
                dtype=getattr(torch, hc.dtype),
                seed=seed + step,
            )
            # the spectrum's own seed would collide with the run's seed column
            table = spectrum.to_frame().rename(columns={"seed": "probe_seed"})
            nodes = table["metric"] == "slq_node"
            frames.append(tagged(table[~nodes], step))
            hessian_tables["hessian_nodes"].append(tagged(table[nodes], step))
            if spectrum.nodes is not None:
                density = spectrum.density()
                density.insert(0, "norm_mode", spectrum.norm_mode)
                hessian_tables["hessian_density"].append(tagged(density, step))
        return frames

    return measure


def _hessian_chunks(
    data: tuple[torch.Tensor, torch.Tensor], chunk_size: int, norm_batch: int | None
) -> tuple[torch.Tensor, torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
    """The Hessian set as ``hessian_spectrum`` takes it.

    Without microbatch normalizers, the set itself (cut into nearly equal
    chunks there). With ``norm_batch`` g, consecutive chunks of
    ``chunk_size`` (a multiple of g, checked with the config) and a last
    chunk of the rest, so every chunk is a whole number of microbatches; a
    remainder of fewer than g examples (only when the training set is
    smaller than ``data.hessian_samples``) is left out.
    """
    if norm_batch is None:
        return data
    x, y = data
    n = len(x) // norm_batch * norm_batch
    if n == 0:
        raise ConfigError(
            f"data.hessian_samples: the Hessian set has {len(x)} examples, fewer than one "
            f"microbatch of norm_batch {norm_batch}"
        )
    return [
        (x[i : min(i + chunk_size, n)], y[i : min(i + chunk_size, n)])
        for i in range(0, n, chunk_size)
    ]


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


def _preflight(
    config: Config, data: ProbeData, device: torch.device
) -> tuple[list[str], dict[str, str]]:
    """Build each normalizer's model once and run a forward pass; sort out those that cannot work.

    With ``normalizers: all`` a normalizer the model cannot take (instance norm
    in an MLP) is skipped with its reason; one named explicitly is an error.
    """
    from normprobe.state import preserved
    from normprobe.training import norm_batch_of

    usable, skipped = [], {}
    explicit = config.normalizers != "all"
    for i, norm in enumerate(config.normalizer_names()):
        try:
            model = build_run_model(config, norm, 0, data.dataset).to(device)
            # a whole number of microbatches when the normalizer uses norm_batch
            size = norm_batch_of(model) or 4
            x = data.batch_a[0] if len(data.batch_a[0]) >= size else data.dataset.train.x
            with preserved(model), torch.no_grad():
                model.train()
                model(x[:size].to(device))
        except ConfigError:
            raise
        except NormprobeError as err:
            if explicit:
                raise ConfigError(
                    f"normalizers[{i}]: {norm!r} does not fit this model: {err}"
                ) from None
            skipped[norm] = str(err)
            continue
        except Exception as err:  # a user factory that breaks is the user's to fix
            raise ConfigError(
                f"model: building or running the model with normalizer {norm!r} failed: "
                f"{type(err).__name__}: {err}"
            ) from None
        usable.append(norm)
    return usable, skipped


def _progress(quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm


def _run_one(
    spec: RunSpec,
    config: Config,
    data: ProbeData,
    device: torch.device,
    bar_factory: Any,
) -> RunRecord:
    from normprobe.norms import set_total_steps
    from normprobe.training import (
        label_grouped_batches,
        label_minibatches,
        make_optimizer,
        train,
    )

    tc = config.train
    start = time.perf_counter()
    hessian_tables: dict[str, list[pd.DataFrame]] = {"hessian_nodes": [], "hessian_density": []}
    probe_steps = (
        set(config.probes.schedule.resolve(tc.steps)) if config.probes.any_enabled() else set()
    )
    hessian_steps = (
        set(config.hessian.schedule.resolve(tc.steps)) if config.hessian.enabled else set()
    )
    measure_steps = set(config.probes.schedule.resolve(tc.steps)) | hessian_steps | {tc.steps}
    bar = None
    try:
        model = build_run_model(config, spec.normalizer, spec.seed, data.dataset).to(device)
        set_total_steps(model, tc.steps)
        optimizer = make_optimizer(
            tc.optimizer,
            model.parameters(),
            lr=spec.lr,
            momentum=tc.momentum,
            weight_decay=tc.weight_decay,
        )
        measure = make_measure(
            config, data, probe_steps, hessian_steps, hessian_tables, device, spec.seed
        )
        if bar_factory is not None:
            bar = bar_factory(total=tc.steps, desc=spec.run, leave=False, unit="step")

        def progress(step: int, loss: float) -> None:
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss:.3f}")

        batches = None
        if tc.sampler.kind == "labels":
            batches = label_minibatches(
                data.dataset.train.y,
                tc.sampler.labels_per_batch,
                tc.sampler.per_label,
                torch.Generator().manual_seed(spec.seed),
            )
        bs_eval = tc.eval_batch_stats
        grouped = None
        if bs_eval.enabled and bs_eval.batches == "sampler":
            # fixed by data.seed, so every run is evaluated on the same batches
            grouped = tuple(
                label_grouped_batches(
                    y,
                    tc.sampler.labels_per_batch,
                    tc.sampler.per_label,
                    torch.Generator().manual_seed(config.data.seed),
                )
                for y in (data.dataset.train.y[: tc.eval_train_samples], data.dataset.test.y)
            )
        outcome = train(
            model,
            (data.dataset.train.x, data.dataset.train.y),
            (data.dataset.test.x, data.dataset.test.y),
            optimizer=optimizer,
            steps=tc.steps,
            batch_size=tc.batch_size,
            seed=spec.seed,
            measure_steps=measure_steps,
            measure=measure,
            regnorm_lambda=tc.regnorm_lambda if _regularized(spec.normalizer) else 0.0,
            eval_batch_size=tc.eval_batch_size,
            eval_train_samples=tc.eval_train_samples,
            batch_stats_size=(
                (bs_eval.batch_size or tc.batch_size)
                if bs_eval.enabled and grouped is None
                else None
            ),
            batch_stats_batches=grouped,
            batches=batches,
            progress=progress,
        )
    except KeyboardInterrupt:
        raise
    except Exception as err:
        return spec.failed(
            f"{type(err).__name__}: {err}",
            time.perf_counter() - start,
            {"traceback": traceback.format_exc(limit=8)},
        )
    finally:
        if bar is not None:
            bar.close()
    metrics = pd.concat(outcome.frames, ignore_index=True, sort=False)
    tables = {"metrics": metrics}
    for name, frames in hessian_tables.items():
        if frames:
            tables[name] = pd.concat(frames, ignore_index=True, sort=False)
    return RunRecord(
        spec.run,
        spec.normalizer,
        spec.lr,
        spec.seed,
        outcome.status,
        variant=spec.variant,
        seconds=time.perf_counter() - start,
        diverged_step=outcome.diverged_step,
        info={"measure_seconds": round(outcome.measure_seconds, 3)},
        tables=tables,
    )


def _growth_or_nan(frame: pd.DataFrame) -> float:
    """The growth rate, or NaN where it is undefined (a layer whose gradient is exactly zero,
    as in a network that died in training): a measurement, not a reason to fail the run."""
    from normprobe.probes import ProbeError, growth_rate

    try:
        return growth_rate(frame)
    except ProbeError:
        return float("nan")


def _structural(
    model: nn.Module, pc: Any, x: torch.Tensor, x_other: torch.Tensor, seed: int
) -> list[pd.DataFrame]:
    """The structural probes the config turns on (for the properties table)."""
    from normprobe.probes.structure import batch_dependence, signal_statistics, train_eval_gap

    frames = []
    if pc.batch_dependence.enabled:
        for mode in ("train", "eval"):
            frames.append(
                batch_dependence(
                    model, x, x_other, layers=pc.batch_dependence.layers, mode=mode, seed=seed
                )
            )
    if pc.train_eval_gap.enabled:
        frames.append(train_eval_gap(model, x, layers=pc.train_eval_gap.layers, seed=seed))
    if pc.signal.enabled:
        frames.append(signal_statistics(model, x, layers=pc.signal.layers, seed=seed))
    return frames


def has_norm_layers(model: nn.Module) -> bool:
    """Whether ``model`` has a normalization layer for :func:`normprobe.probes.batch_mean`."""
    from normprobe.probes.capture import is_normalizer

    return any(is_normalizer(m) for m in model.modules())


def _regularized(normalizer: str) -> bool:
    from normprobe.norms import spec

    return spec(normalizer).regularized


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
    from normprobe.executors import check_executor

    check_executor(executor, jobs, address)
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
    from normprobe import executors

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
            data[variant] = prepare_data(vconfig, same.dataset if same is not None else None)
            loaded.setdefault(key, data[variant])
            usable[variant], why = _preflight(vconfig, data[variant], check_device)
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

    plan = plan_runs(config, usable)
    configs = dict(variants)
    done = finished_runs(directory)
    todo = [spec for spec in plan if spec.run not in done]
    if done and todo:
        log(f"resuming: {len(plan) - len(todo)} of {len(plan)} runs already finished")
    finished = 0

    def finish(record: RunRecord) -> None:
        nonlocal finished
        finished += 1
        write_run(directory, record)
        assemble(directory)
        log(f"[{finished}/{len(todo)}] {_report(record)}")

    if executors.in_process(executor, jobs):
        bar_factory = _progress(quiet)
        for spec in todo:
            finish(_run_one(spec, configs[spec.variant], data[spec.variant], device, bar_factory))
    elif todo:
        # the workers get the resolved configs and the prepared data, pickled once
        payload = pickle.dumps(
            {variant: (configs[variant], data[variant]) for variant in configs},
            protocol=pickle.HIGHEST_PROTOCOL,
        )
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
    results = assemble(directory)
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(directory / "manifest.json", manifest)
    results.manifest = manifest
    return results


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
