"""The sections of the analysis config: model, data, train, probes, hessian.

Each section is a strict pydantic model (unknown keys rejected, with the
closest valid key suggested); :class:`normprobe.config.Config` puts them
together. A new probe gets its switch here: a field of
:class:`ProbesConfig` and its name in :data:`PROBES`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from normprobe.configtools import (
    ConfigError,
    PathError,
    Strict,
    canonical,
    format_path,
    import_factory,
    suggest,
)
from normprobe.data import DATASETS, dataset_options
from normprobe.models import MODELS, model_options
from normprobe.norms import NORMS

__all__ = [
    "Schedule",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "SamplerConfig",
    "BatchStatsEval",
    "RepresentationProbe",
    "GradientProbe",
    "BatchMeanProbe",
    "StructuralProbe",
    "ProbesConfig",
    "HessianConfig",
    "PROBES",
    "LayerSpec",
    "LearningRates",
    "LrExtend",
]


# --------------------------------------------------------------------------- schedules


class Schedule(Strict):
    """Training steps at which to measure; step 0 (initialization) is always included.

    Give explicit ``steps``, or ``every`` k steps, or ``log`` points spaced
    logarithmically up to the last step. ``every`` and ``log`` include the
    last training step. In YAML a plain list means ``steps``.
    """

    steps: list[int] | None = None
    every: int | None = Field(None, ge=1)
    log: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return {"steps": list(value)}
        if isinstance(value, int) and not isinstance(value, bool):
            return {"steps": [value]}
        return value

    @field_validator("steps")
    @classmethod
    def _non_negative(cls, steps: list[int] | None) -> list[int] | None:
        if steps is not None:
            for i, s in enumerate(steps):
                if s < 0:
                    raise ValueError(f"step {s} at position {i} is negative; steps count from 0")
        return steps

    @model_validator(mode="after")
    def _one_kind(self) -> Schedule:
        given = [k for k in ("steps", "every", "log") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of steps, every or log, not {' and '.join(given)}")
        return self

    def resolve(self, total_steps: int) -> list[int]:
        """The sorted step list for a run of ``total_steps`` (0 always; beyond the end dropped)."""
        points = {0}
        if self.steps is not None:
            points |= {s for s in self.steps if s <= total_steps}
        elif self.every is not None:
            points |= set(range(0, total_steps + 1, self.every)) | {total_steps}
        elif self.log is not None and total_steps > 0:
            n = self.log
            for i in range(n):
                points.add(round(total_steps ** (i / max(n - 1, 1))) if n > 1 else total_steps)
            points.add(total_steps)
        return sorted(points)


# --------------------------------------------------------------------------- sections


class ModelConfig(Strict):
    """A zoo model (``name``) or the user's own (``factory: package.module:function``).

    The factory is called as ``factory(norm=<normalizer>, **options)``. With
    ``swap_norms: true`` it is called as ``factory(**options)`` and its torch
    BatchNorm/GroupNorm/LayerNorm layers are replaced by the normalizer.

    ``norm_options`` gives normalizer options per normalizer, ``{default:
    {...}, <normalizer or alias>: {...}}`` (see :meth:`Config.norm_options_for`):
    zoo models get the run's options as their ``norm_options``, swapped layers
    are built with them, and a factory is called with ``norm_options=...``
    when there are any (so it must then accept that keyword).
    """

    name: str | None = None
    factory: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    swap_norms: bool = False
    # normalizer options per normalizer: {default: {...}, <normalizer>: {...}}; see
    # Config.norm_options_for. Checked against the normalizers in Config._norm_options_ok.
    norm_options: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"factory": value} if ":" in value else {"name": value}
        return value

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if (self.name is None) == (self.factory is None):
            raise ValueError(
                "give exactly one of name (a zoo model: "
                f"{', '.join(_model_names())}) or factory (package.module:function)"
            )
        if self.name is not None:
            self.__dict__["name"] = canonical(MODELS, self.name, "name")
            if self.swap_norms:
                raise ValueError(
                    "swap_norms applies to a factory model; zoo models take norm directly"
                )
            valid = model_options(self.name)
            for key in self.options:
                if key not in valid:
                    raise PathError(
                        ("options", key),
                        f"model {self.name!r} has no option {key!r}; {suggest(key, list(valid))}"
                        f"its options are: {', '.join(valid)}",
                    )
                _check_option_type(key, self.options[key], valid[key])
        else:
            try:
                import_factory(self.factory)
            except ValueError as err:
                raise PathError(("factory",), str(err)) from None
        return self


class DataConfig(Strict):
    """The dataset, its loader options, and the sizes of the probe batches."""

    name: str = "digits"
    options: dict[str, Any] = Field(default_factory=dict)
    probe_batch: int = Field(128, ge=2)
    hessian_samples: int = Field(512, ge=2)
    seed: int = Field(0, ge=0)
    # training examples held out for learning-rate selection: a fraction (0 < f < 1) or a count
    held_out: int | float = Field(0, ge=0)

    @field_validator("held_out")
    @classmethod
    def _held_out_ok(cls, value: int | float) -> int | float:
        if isinstance(value, float):
            if value.is_integer() and value >= 1:
                return int(value)
            if not 0 <= value < 1:
                raise ValueError(
                    f"{value!r} is neither a fraction (0 < f < 1) nor a count of examples; "
                    "e.g. held_out: 0.1 or held_out: 500"
                )
        return value

    def held_out_count(self, n: int) -> int:
        """How many of ``n`` training examples are held out (a fraction rounds, at least 1).

        >>> DataConfig(held_out=0.1).held_out_count(1000), DataConfig(held_out=7).held_out_count(1000)
        (100, 7)
        """
        h = self.held_out
        if isinstance(h, float) and h > 0:
            return max(1, int(round(h * n)))
        return int(h)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        self.__dict__["name"] = canonical(DATASETS, self.name, "name")
        valid = dataset_options(self.name)
        for key in self.options:
            if key not in valid:
                raise PathError(
                    ("options", key),
                    f"dataset {self.name!r} has no option {key!r}; {suggest(key, list(valid))}"
                    f"its options are: {', '.join(valid)}",
                )
        return self


#: The most training steps a run may ask for.
MAX_STEPS = 1_000_000_000

LearningRates = float | list[float] | dict[str, float | list[float]]


class SamplerConfig(Strict):
    """How training minibatches are drawn (``train.sampler``).

    ``iid`` (default): a fresh random permutation of the training set each
    epoch, cut into batches (the incomplete last batch dropped).
    ``labels``: a non-i.i.d. minibatch of ``labels_per_batch`` distinct labels
    (drawn uniformly, whatever the class sizes) and ``per_label`` examples of
    each, grouped by label; the batch size must be their product. Each
    label's examples are shuffled and used ``per_label`` at a time without
    replacement; when fewer than ``per_label`` are left, that remainder is
    dropped and the label's examples are reshuffled (a per-label epoch). In
    YAML ``sampler: iid`` is short for ``{kind: iid}``.
    """

    kind: Literal["iid", "labels"] = "iid"
    labels_per_batch: int | None = Field(None, ge=1)
    per_label: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> SamplerConfig:
        if self.kind == "labels":
            for key in ("labels_per_batch", "per_label"):
                if getattr(self, key) is None:
                    raise PathError(
                        (key,),
                        f"the labels sampler needs {key}, e.g. "
                        "{kind: labels, labels_per_batch: 5, per_label: 8}",
                    )
        else:
            for key in ("labels_per_batch", "per_label"):
                if getattr(self, key) is not None:
                    raise PathError(
                        (key,), f"{key} applies to kind: labels only; remove it or set kind: labels"
                    )
        return self


class BatchStatsEval(Strict):
    """Accuracy and loss without aggregated statistics (``train.eval_batch_stats``).

    When enabled, every measured step also records ``test_acc_batchstats``,
    ``test_loss_batchstats``, ``train_acc_batchstats`` and
    ``train_loss_batchstats``: the model in train-mode normalization on
    consecutive batches of ``batch_size`` examples (default: the training
    batch size), normalized with each batch's own statistics, with running
    statistics frozen and the model left exactly as found. In YAML ``true``
    or a batch size is short for ``{enabled: true, batch_size: ...}``.

    ``batches: sampler`` (with ``train.sampler.kind: labels``) evaluates on
    batches drawn the way training batches are, ``labels_per_batch`` distinct
    labels x ``per_label`` examples each (Ioffe 2017, sec. 3.3: "training mode" on
    test minibatches built by the same procedure), fixed by ``data.seed``;
    every example is used at most once, and those that cannot fill such a
    batch (at most ``per_label - 1`` per label, plus the labels left over
    at the end) are left out. ``batch_size`` must then be unset.
    """

    enabled: bool = False
    batch_size: int | None = Field(None, ge=2)
    batches: Literal["consecutive", "sampler"] = "consecutive"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return {"enabled": value}
        if isinstance(value, int):
            return {"enabled": True, "batch_size": value}
        return value


class LrExtend(Strict):
    """Extending the learning-rate grid past an edge (``train.lr_extend``).

    When the rate selected for a (normalizer, variant) is the smallest or
    the largest of its grid, ``analyze`` runs one more rate beyond that
    edge (the edge rate divided or multiplied by ``factor``; default: the
    ratio of the two rates at that edge of the grid, or 3 for a one-rate
    grid), selects again, and repeats until the best rate is inside the
    grid, ``max_extra`` rates were added in that direction, or the new rate
    diverged for every seed. In YAML an integer is short for
    ``{max_extra: n}``.
    """

    max_extra: int = Field(0, ge=0)
    factor: float | None = Field(None, gt=1.0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return {"max_extra": value}
        return value


class TrainConfig(Strict):
    """Optimizer, learning rate(s), batch size, steps and seeds of every run."""

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: LearningRates = 0.1
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(128, ge=2)
    steps: int = Field(300, ge=0)
    seeds: list[int] = Field(default_factory=lambda: [0])
    regnorm_lambda: float = Field(0.1, ge=0.0)
    eval_batch_size: int = Field(512, ge=2)
    eval_train_samples: int = Field(1024, ge=1)
    device: str = "cpu"
    # torch's CPU threads of each run: a number, or "auto" (normprobe.threads.auto_threads:
    # from the model's size, the machine's cores and --jobs, never the load). null, as older
    # configs may say, means auto.
    threads: int | Literal["auto"] = "auto"
    # the largest model (in parameters) an analysis builds without being told to
    max_parameters: int = Field(100_000_000, ge=1)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    eval_batch_stats: BatchStatsEval = Field(default_factory=BatchStatsEval)
    # what selects the learning rate per normalizer: the held-out split of the training data
    # (data.held_out), the test set, or auto (held_out when data.held_out > 0, else test)
    select_on: Literal["auto", "held_out", "test"] = "auto"
    lr_extend: LrExtend = Field(default_factory=LrExtend)

    @field_validator("steps")
    @classmethod
    def _steps_finish(cls, steps: int) -> int:
        if steps > MAX_STEPS:  # a typo such as 1e20 would never finish
            raise ValueError(f"{steps:.3g} steps would never finish; use at most {MAX_STEPS:,}")
        return steps

    @model_validator(mode="after")
    def _sampler_fits(self) -> TrainConfig:
        s = self.sampler
        bs = self.eval_batch_stats
        if bs.batches == "sampler":
            if s.kind != "labels":
                raise PathError(
                    ("eval_batch_stats", "batches"),
                    "sampler batches copy a non-i.i.d. training sampler; set train.sampler to "
                    "{kind: labels, ...} or use batches: consecutive",
                )
            if bs.batch_size is not None:
                raise PathError(
                    ("eval_batch_stats", "batch_size"),
                    "with batches: sampler the batches have the sampler's size "
                    "(labels_per_batch x per_label); remove batch_size",
                )
        if s.kind == "labels" and s.labels_per_batch * s.per_label != self.batch_size:
            k, n = s.labels_per_batch, s.per_label
            raise PathError(
                ("batch_size",),
                f"{self.batch_size} does not match train.sampler ({k} labels x {n} per label "
                f"= {k * n}); set batch_size: {k * n} or change labels_per_batch/per_label",
            )
        return self

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("seeds")
    @classmethod
    def _seeds_ok(cls, seeds: list[int]) -> list[int]:
        if not seeds:
            raise ValueError("give at least one seed, e.g. seeds: [0]")
        for i, s in enumerate(seeds):
            if s < 0:
                raise PathError((i,), f"seed {s} is negative; seeds are integers >= 0")
        for i, s in enumerate(seeds):
            if s in seeds[:i]:
                first = seeds.index(s)
                raise PathError(
                    (i,),
                    f"seed {s} is given twice (train.seeds[{first}] is {s} too); a seed is "
                    f"one run per rate and normalizer, so list each seed once: "
                    f"{list(dict.fromkeys(seeds))}",
                )
        return seeds

    @field_validator("lr")
    @classmethod
    def _lr_ok(cls, lr: LearningRates) -> LearningRates:
        def check(values: float | list[float], path: tuple[Any, ...]) -> None:
            items = values if isinstance(values, list) else [values]
            if isinstance(values, list) and not values:
                raise PathError(path, "empty learning-rate list; give at least one rate")
            for i, v in enumerate(items):
                here = (*path, i) if isinstance(values, list) else path
                if not (math.isfinite(v) and v > 0):
                    raise PathError(here, f"learning rate must be a positive number, got {v!r}")
            _rates_distinct(items, path)

        if isinstance(lr, dict):
            named: dict[str, str] = {}
            for key, values in lr.items():
                if key != "default" and key not in NORMS:
                    raise PathError(
                        (key,),
                        f"{key!r} is not a normalizer; {suggest(key, [*NORMS, 'default'])}"
                        "keys are normalizer names or 'default'",
                    )
                name = key if key == "default" else NORMS.canonical(key)
                if name in named:
                    # the last key would win without a word, the other grid never run
                    raise PathError(
                        (key,),
                        f"{key!r} and {named[name]!r} name the same normalizer ({name}); give "
                        "its rates under one key",
                    )
                named[name] = key
                check(values, (key,))
        else:
            check(lr, ())
        return lr

    @field_validator("threads", mode="before")
    @classmethod
    def _threads_ok(cls, threads: Any) -> Any:
        if threads is None or threads == "auto":
            return "auto"
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"give a positive number of threads or 'auto', got {threads!r}")
        return threads

    @field_validator("device")
    @classmethod
    def _device_ok(cls, device: str) -> str:
        try:
            torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(f"{device!r} is not a torch device; use cpu, cuda or cuda:0") from None
        return device

    def rates_for(self, normalizer: str) -> list[float]:
        """The learning-rate grid of one normalizer."""
        lr = self.lr
        if isinstance(lr, dict):
            by_name = {NORMS.canonical(k) if k != "default" else k: v for k, v in lr.items()}
            if normalizer in by_name:
                lr = by_name[normalizer]
            elif "default" in by_name:
                lr = by_name["default"]
            else:
                raise ConfigError(
                    f"train.lr: no learning rate for normalizer {normalizer!r}; add "
                    f"'{normalizer}: ...' or 'default: ...' under train.lr"
                )
        return [float(v) for v in (lr if isinstance(lr, list) else [lr])]


def _rates_distinct(rates: list[float], path: tuple[Any, ...]) -> None:
    """Refuse a learning-rate grid that names a rate twice.

    Each rate is one set of runs, named ``<normalizer>_lr<rate:g>_seed<seed>``,
    so a repeated rate (``[0.05, 0.05]``, also ``[0.05, 5e-2]``: the same
    float) would run once and leave the grid one rate short without a word;
    two rates equal to six significant digits (``0.05`` and ``0.0500000001``)
    would write the same run folder.
    """
    for i, rate in enumerate(rates):
        for j in range(i):
            other = format_path(("train", "lr", *path, j))
            if rate == rates[j]:
                raise PathError(
                    (*path, i),
                    f"learning rate {rate!r} is given twice ({other} is {rates[j]!r} too); "
                    "a rate is one set of runs, so list each rate once: "
                    f"{_shown(list(dict.fromkeys(rates)))}",
                )
            if f"{rate:g}" == f"{rates[j]:g}":
                raise PathError(
                    (*path, i),
                    f"learning rate {rate!r} and {other} ({rates[j]!r}) both name runs "
                    f"lr{rate:g} (runs are named by the rate to 6 significant digits); give "
                    "rates that differ within 6 digits, or keep one of them",
                )


def _shown(rates: list[float]) -> str:
    return "[" + ", ".join(f"{r!r}" for r in rates) + "]"


LayerSpec = str | list[str] | None


class RepresentationProbe(Strict):
    """Representation correlation (docs/definitions.md, probe 1)."""

    enabled: bool = True
    pairing: Literal["noise", "independent", "within"] = "noise"
    noise_scale: float = Field(0.3, gt=0.0)
    layers: LayerSpec = None
    mode: Literal["train", "eval"] = "train"


class GradientProbe(Strict):
    """Gradient correlation or gradient norms (docs/definitions.md, probes 2 and 3)."""

    enabled: bool = True
    layers: LayerSpec = None
    mode: Literal["train", "eval"] = "train"


class BatchMeanProbe(Strict):
    """Each normalization layer's batch mean ``R_l`` (RegNorm's regularizer value; off by default)."""

    enabled: bool = False
    mode: Literal["train", "eval"] = "train"


class StructuralProbe(Strict):
    """A structural probe for the properties table: batch dependence (train and eval mode),
    train/eval gap, or signal-propagation statistics (off by default)."""

    enabled: bool = False
    layers: LayerSpec = None


class SignalProbe(StructuralProbe):
    """Signal-propagation statistics (off by default): the moments of each layer's input per
    channel; ``channel_axis`` says where the channels are when the input is 3-D."""

    channel_axis: int | None = None


#: the probes of ``probes:``, each ``true``/``false`` or its options
PROBES = (
    "representation",
    "gradient_correlation",
    "gradient_norms",
    "batch_mean",
    "batch_dependence",
    "train_eval_gap",
    "signal",
)


def _probe_switch(value: Any) -> Any:
    return {"enabled": value} if isinstance(value, bool) else value


class ProbesConfig(Strict):
    """Which probes run, their options, and when (``schedule``)."""

    representation: RepresentationProbe = Field(default_factory=RepresentationProbe)
    gradient_correlation: GradientProbe = Field(default_factory=GradientProbe)
    gradient_norms: GradientProbe = Field(default_factory=GradientProbe)
    batch_mean: BatchMeanProbe = Field(default_factory=BatchMeanProbe)
    batch_dependence: StructuralProbe = Field(default_factory=StructuralProbe)
    train_eval_gap: StructuralProbe = Field(default_factory=StructuralProbe)
    signal: SignalProbe = Field(default_factory=SignalProbe)
    schedule: Schedule = Field(default_factory=lambda: Schedule(every=50))

    _switch = field_validator(*PROBES, mode="before")(_probe_switch)

    def any_enabled(self) -> bool:
        """Whether any probe runs (then the probe schedule and the probe batches matter)."""
        return any(getattr(self, name).enabled for name in PROBES)


class HessianConfig(Strict):
    """The Hessian spectrum (docs/definitions.md, the Hessian) and its own, sparser schedule."""

    enabled: bool = True
    schedule: Schedule = Field(default_factory=lambda: Schedule(steps=[0, 50]))
    lanczos_steps: int = Field(80, ge=2)
    start_vectors: int = Field(1, ge=1)
    pieces: list[Literal["density", "top", "smallest", "trace"]] = Field(
        default_factory=lambda: ["density", "top", "smallest", "trace"], min_length=1
    )
    top_k: int = Field(10, ge=1)
    trace_samples: int = Field(32, ge=2)
    norm_mode: Literal["train", "eval"] = "train"
    chunk_size: int = Field(128, ge=2)
    dtype: Literal["float32", "float64"] = "float64"
    # K of the outlier ratio lambda_1 / lambda_K (None: the dataset's number of classes, as in
    # Rao & Sohl-Dickstein 2020, sec. 6, which calls K "a heuristic guess"); the top max(top_k, K) eigenvalues are found
    outlier_k: int | None = Field(None, ge=1)
    # products in blocks (SLQ start vectors side by side, Hutchinson probes 8 at a time): the
    # same numbers to rounding; "auto" decides from the model (fully connected, <= 65,536
    # parameters), never from a timing
    batched: Literal["auto"] | bool = "auto"


def _check_option_type(key: str, value: Any, default: Any) -> None:
    """A zoo model option of the kind its default has: a count (every int option of the zoo
    models is a count of layers, units, heads or classes), a flag, a number or a name."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise PathError(("options", key), f"must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PathError(
                ("options", key), f"must be a whole number >= 1, got {value!r}; e.g. {default}"
            )
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PathError(("options", key), f"must be a number, got {value!r}; e.g. {default}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise PathError(("options", key), f"must be a name, got {value!r}; e.g. {default}")


def _model_names() -> list[str]:
    return MODELS.names()
