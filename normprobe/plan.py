"""The resolved plan of an analysis: its run specifications and the data they share.

A config is validated once (:mod:`normprobe.config`) and resolved here into
:class:`RunSpec` objects, each carrying everything its run needs: the
normalizer, variant, learning rate, seed and the variant's resolved config
(with its probe and Hessian steps). Nothing downstream of the plan reads the
raw config again. :func:`prepare_data` loads the dataset and draws the probe
batches every run is measured on; :func:`build_run_model` builds one run's
model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from normprobe.batch import call_model, check_measurable, lazy_unmade
from normprobe.config import Config, ConfigError, import_factory
from normprobe.data import load_dataset
from normprobe.errors import NormprobeError
from normprobe.models import MODELS, build_model, model_options
from normprobe.models.swap import swap_norms
from normprobe.results import RunRecord
from normprobe.training import norm_batch_of

__all__ = ["RunSpec", "plan_runs", "ProbeData", "prepare_data", "build_run_model"]


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid (``variant`` None when the config has no variants).

    ``config``: the resolved config of the run's variant (the whole config
    without variants); :func:`plan_runs` fills it. Runs are identified by
    ``(normalizer, lr, seed, variant)``; the config is not part of equality.
    """

    normalizer: str
    lr: float
    seed: int
    variant: str | None = None
    config: Config | None = field(default=None, compare=False, repr=False)

    @property
    def run(self) -> str:
        variant = f"_{self.variant}" if self.variant is not None else ""
        return f"{self.normalizer}{variant}_lr{self.lr:g}_seed{self.seed}"

    @cached_property
    def _probe_schedule(self) -> frozenset[int]:
        c = self.resolved_config()
        return frozenset(c.probes.schedule.resolve(c.train.steps))

    @property
    def probe_steps(self) -> frozenset[int]:
        """The steps at which the probes run (none when no probe is enabled)."""
        return self._probe_schedule if self.resolved_config().probes.any_enabled() else frozenset()

    @cached_property
    def hessian_steps(self) -> frozenset[int]:
        """The steps at which the Hessian is measured (none when it is off)."""
        c = self.resolved_config()
        return frozenset(c.hessian.schedule.resolve(c.train.steps) if c.hessian.enabled else ())

    @cached_property
    def measure_steps(self) -> frozenset[int]:
        """Every step that records accuracy and loss: the probe schedule (enabled or not),
        the Hessian's, and the last step."""
        return self._probe_schedule | self.hessian_steps | {self.resolved_config().train.steps}

    def resolved_config(self) -> Config:
        """The run's resolved config; a clear error for a spec built without one."""
        if self.config is None:
            raise ValueError(
                f"run {self.run}: this RunSpec has no config; build the specs with plan_runs"
            )
        return self.config

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
    *,
    variants: Sequence[tuple[str | None, Config]] | None = None,
) -> list[RunSpec]:
    """The (variant, normalizer, lr, seed) grid in a fixed order.

    ``normalizers``: the names to run (default: the config's), or a mapping
    from variant name (None without variants) to the names to run there.
    ``variants``: the config's resolved variants when the caller has them
    already (default: resolved here).

    >>> from normprobe.config import load_config
    >>> cfg = load_config({"normalizers": ["batch", "layer"], "train": {"seeds": [0, 1]},
    ...     "variants": {"bs32": {"train.batch_size": 32}, "bs8": {"train.batch_size": 8,
    ...     "normalizers": ["batch"]}}})[0]
    >>> [spec.run for spec in plan_runs(cfg)]  # doctest: +NORMALIZE_WHITESPACE
    ['batch_bs32_lr0.1_seed0', 'batch_bs32_lr0.1_seed1', 'layer_bs32_lr0.1_seed0',
     'layer_bs32_lr0.1_seed1', 'batch_bs8_lr0.1_seed0', 'batch_bs8_lr0.1_seed1']
    """
    specs = []
    for variant, vconfig in variants if variants is not None else config.variant_configs():
        if normalizers is None:
            names = vconfig.normalizer_names()
        elif isinstance(normalizers, Mapping):
            names = list(normalizers.get(variant, ()))
        else:
            names = list(normalizers)
        specs += [
            RunSpec(norm, lr, seed, variant, vconfig)
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
    #: indices of the training examples held out for learning-rate selection (None: none)
    held_out: torch.Tensor | None = None

    def train_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples trained on: the training set less the held-out ones, in their order."""
        x, y = self.dataset.train.x, self.dataset.train.y
        if self.held_out is None:
            return x, y
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[self.held_out] = False
        return x[keep], y[keep]

    def val_split(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The held-out examples (None when nothing is held out)."""
        if self.held_out is None:
            return None
        return self.dataset.train.x[self.held_out], self.dataset.train.y[self.held_out]


def prepare_data(config: Config, dataset: Any = None) -> ProbeData:
    """Load the dataset and draw the probe batches (two disjoint ones) and the Hessian set.

    The batches are drawn once, with ``data.seed``, so every normalizer,
    learning rate and seed is measured on the same examples. ``dataset``: an
    already loaded dataset of ``config.data`` to reuse. Raises
    :class:`~normprobe.config.ConfigError` when the config asks for more
    than the data holds.
    """
    if dataset is None:
        try:
            dataset = load_dataset(config.data.name, **config.data.options)
        except NormprobeError as err:
            raise ConfigError(f"data.options: {err}") from None
    n = len(dataset.train)
    held = config.data.held_out_count(n)
    if held and n - held < config.train.batch_size:
        raise ConfigError(
            f"data.held_out: holding out {held} of the {n} training examples leaves "
            f"{n - held}, fewer than a batch ({config.train.batch_size}); hold out fewer"
        )
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
        counts = torch.bincount(dataset.train.y[_kept(n, held, config.data.seed)])
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
    asked = config.data.hessian_samples
    if config.hessian.enabled and "hessian_samples" in config.data.model_fields_set and asked > n:
        raise ConfigError(
            f"data.hessian_samples: {asked}, but the training set has {n} examples; "
            f"use hessian_samples <= {n}"
        )
    g = torch.Generator().manual_seed(config.data.seed)
    order = torch.randperm(n, generator=g)
    x, y = dataset.train.x, dataset.train.y
    a, b = order[:size], order[size : 2 * size]
    h = torch.randperm(n, generator=g)[: min(config.data.hessian_samples, n)]
    held_out = _held_out(n, held, config.data.seed) if held else None
    return ProbeData(dataset, (x[a], y[a]), (x[b], y[b]), (x[h], y[h]), held_out)


def _held_out(n: int, count: int, seed: int) -> torch.Tensor:
    """The held-out indices: the last ``count`` of a permutation of ``n`` seeded by ``seed``
    (the permutation whose first examples are the probe batches), sorted."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n - count :].sort().values


def _kept(n: int, count: int, seed: int) -> torch.Tensor:
    """A mask of the training examples trained on (all but the held-out ones)."""
    keep = torch.ones(n, dtype=torch.bool)
    if count:
        keep[_held_out(n, count, seed)] = False
    return keep


def build_run_model(config: Config, normalizer: str, seed: int, dataset: Any) -> nn.Module:
    """Build the run's model: a zoo model, a user factory, or a factory with swapped norms."""
    mc = config.model
    options = dict(mc.options)
    norm_options = config.norm_options_for(normalizer)
    if mc.name is not None:
        check_model_fits_data(config, dataset)
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
                f"model.factory: {mc.factory} returned a {type(model).__name__}, not a "
                f"torch.nn.Module"
            )
        _make_lazy_parameters(model, dataset)  # from the run's seed, as the factory's
    try:
        check_measurable(model, model.modules(), ConfigError)
    except ConfigError as err:
        raise ConfigError(
            f"model.factory: {mc.factory} returned a model that cannot be measured: {err}"
        ) from None
    return model


def _make_lazy_parameters(model: nn.Module, dataset: Any) -> None:
    """Make the parameters of the model's lazy modules (``nn.LazyLinear``, ...) by one
    forward pass on the first training examples, in eval mode and without gradients: they
    take their shapes from it, and the optimizer, the parameter count and the probes need
    them made. Nothing else of the model changes (the flags are put back)."""
    if not any(lazy_unmade(m) for m in model.modules()):
        return
    flags = [(m, m.training) for m in model.modules()]
    size = norm_batch_of(model) or 2
    try:
        with torch.no_grad():
            model.eval()
            call_model(model, dataset.train.x[:size], ConfigError)
    finally:
        for m, flag in flags:
            m.training = flag


def check_model_fits_data(config: Config, dataset: Any) -> None:
    """A zoo model meets data it can read: token windows for the transformer, features otherwise."""
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
