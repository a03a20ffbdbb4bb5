"""The analysis config: one YAML file, validated before any work starts.

Every mistake gets one :class:`ConfigError` naming the field path (e.g.
``train.lr[2]``) and the fix: unknown keys (with the closest valid key),
wrong types or values, unknown normalizers/models/datasets, factories that
cannot be imported. The schema stores names, not classes, so a resolved
config serializes back to YAML/JSON unchanged.

>>> cfg = parse_config({"model": {"name": "mlp"}, "normalizers": ["batch", "layer"]})
>>> cfg.normalizer_names(), cfg.train.steps
(['batch', 'layer'], 300)
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from normprobe.data import DATASETS, dataset_options
from normprobe.errors import NormprobeError, UnknownNameError
from normprobe.models import MODELS, model_options
from normprobe.norms import NORMS, _options, build, normalizers, spec

__all__ = [
    "Config",
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "SamplerConfig",
    "BatchStatsEval",
    "ProbesConfig",
    "BatchMeanProbe",
    "StructuralProbe",
    "HessianConfig",
    "Schedule",
    "load_config",
    "parse_config",
    "apply_overrides",
    "config_hash",
    "import_factory",
]


class ConfigError(NormprobeError, ValueError):
    """A config that cannot be run; the message names the field path and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}? " if close else ""


# --------------------------------------------------------------------------- schedules


class Schedule(_Strict):
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


class ModelConfig(_Strict):
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
            self.__dict__["name"] = _canonical(MODELS, self.name, "name")
            if self.swap_norms:
                raise ValueError(
                    "swap_norms applies to a factory model; zoo models take norm directly"
                )
            valid = model_options(self.name)
            for key in self.options:
                if key not in valid:
                    raise _PathError(
                        ("options", key),
                        f"model {self.name!r} has no option {key!r}; {_suggest(key, list(valid))}"
                        f"its options are: {', '.join(valid)}",
                    )
        else:
            try:
                import_factory(self.factory)
            except ValueError as err:
                raise _PathError(("factory",), str(err)) from None
        return self


class DataConfig(_Strict):
    """The dataset, its loader options, and the sizes of the probe batches."""

    name: str = "digits"
    options: dict[str, Any] = Field(default_factory=dict)
    probe_batch: int = Field(128, ge=2)
    hessian_samples: int = Field(512, ge=2)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        self.__dict__["name"] = _canonical(DATASETS, self.name, "name")
        valid = dataset_options(self.name)
        for key in self.options:
            if key not in valid:
                raise _PathError(
                    ("options", key),
                    f"dataset {self.name!r} has no option {key!r}; {_suggest(key, list(valid))}"
                    f"its options are: {', '.join(valid)}",
                )
        return self


LearningRates = float | list[float] | dict[str, float | list[float]]


class SamplerConfig(_Strict):
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
                    raise _PathError(
                        (key,),
                        f"the labels sampler needs {key}, e.g. "
                        "{kind: labels, labels_per_batch: 5, per_label: 8}",
                    )
        else:
            for key in ("labels_per_batch", "per_label"):
                if getattr(self, key) is not None:
                    raise _PathError(
                        (key,), f"{key} applies to kind: labels only; remove it or set kind: labels"
                    )
        return self


class BatchStatsEval(_Strict):
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
    labels x ``per_label`` examples each (002 sec. 3.3: "training mode" on
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


class TrainConfig(_Strict):
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
    # torch's CPU threads while the analysis runs (None: torch's default, one per core).
    # On a machine shared with other jobs, 1 avoids OpenMP threads waiting on each other.
    threads: int | None = Field(None, ge=1)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    eval_batch_stats: BatchStatsEval = Field(default_factory=BatchStatsEval)

    @model_validator(mode="after")
    def _sampler_fits(self) -> TrainConfig:
        s = self.sampler
        bs = self.eval_batch_stats
        if bs.batches == "sampler":
            if s.kind != "labels":
                raise _PathError(
                    ("eval_batch_stats", "batches"),
                    "sampler batches copy a non-i.i.d. training sampler; set train.sampler to "
                    "{kind: labels, ...} or use batches: consecutive",
                )
            if bs.batch_size is not None:
                raise _PathError(
                    ("eval_batch_stats", "batch_size"),
                    "with batches: sampler the batches have the sampler's size "
                    "(labels_per_batch x per_label); remove batch_size",
                )
        if s.kind == "labels" and s.labels_per_batch * s.per_label != self.batch_size:
            k, n = s.labels_per_batch, s.per_label
            raise _PathError(
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
                raise _PathError((i,), f"seed {s} is negative; seeds are integers >= 0")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}; each seed names one run")
        return seeds

    @field_validator("lr")
    @classmethod
    def _lr_ok(cls, lr: LearningRates) -> LearningRates:
        def check(values: float | list[float], path: tuple[Any, ...]) -> None:
            items = values if isinstance(values, list) else [values]
            if isinstance(values, list) and not values:
                raise _PathError(path, "empty learning-rate list; give at least one rate")
            for i, v in enumerate(items):
                here = (*path, i) if isinstance(values, list) else path
                if not (math.isfinite(v) and v > 0):
                    raise _PathError(here, f"learning rate must be a positive number, got {v!r}")

        if isinstance(lr, dict):
            for key, values in lr.items():
                if key != "default" and key not in NORMS:
                    raise _PathError(
                        (key,),
                        f"{key!r} is not a normalizer; {_suggest(key, [*NORMS, 'default'])}"
                        "keys are normalizer names or 'default'",
                    )
                check(values, (key,))
        else:
            check(lr, ())
        return lr

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


LayerSpec = str | list[str] | None


class RepresentationProbe(_Strict):
    """Representation correlation (DESIGN.md probe 1)."""

    enabled: bool = True
    pairing: Literal["noise", "independent", "within"] = "noise"
    noise_scale: float = Field(0.3, gt=0.0)
    layers: LayerSpec = None
    mode: Literal["train", "eval"] = "train"


class GradientProbe(_Strict):
    """Gradient correlation or gradient norms (DESIGN.md probes 2 and 3)."""

    enabled: bool = True
    layers: LayerSpec = None
    mode: Literal["train", "eval"] = "train"


class BatchMeanProbe(_Strict):
    """Each normalization layer's batch mean ``R_l`` (RegNorm's regularizer value; off by default)."""

    enabled: bool = False
    mode: Literal["train", "eval"] = "train"


class StructuralProbe(_Strict):
    """A structural probe for the properties table: batch dependence (train and eval mode),
    train/eval gap, or signal-propagation statistics (off by default)."""

    enabled: bool = False
    layers: LayerSpec = None


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


class ProbesConfig(_Strict):
    """Which probes run, their options, and when (``schedule``)."""

    representation: RepresentationProbe = Field(default_factory=RepresentationProbe)
    gradient_correlation: GradientProbe = Field(default_factory=GradientProbe)
    gradient_norms: GradientProbe = Field(default_factory=GradientProbe)
    batch_mean: BatchMeanProbe = Field(default_factory=BatchMeanProbe)
    batch_dependence: StructuralProbe = Field(default_factory=StructuralProbe)
    train_eval_gap: StructuralProbe = Field(default_factory=StructuralProbe)
    signal: StructuralProbe = Field(default_factory=StructuralProbe)
    schedule: Schedule = Field(default_factory=lambda: Schedule(every=50))

    _switch = field_validator(*PROBES, mode="before")(_probe_switch)

    def any_enabled(self) -> bool:
        """Whether any probe runs (then the probe schedule and the probe batches matter)."""
        return any(getattr(self, name).enabled for name in PROBES)


class HessianConfig(_Strict):
    """The Hessian spectrum (DESIGN.md probe 4) and its own, sparser schedule."""

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
    # 003 sec. 6, which calls K "a heuristic guess"); the top max(top_k, K) eigenvalues are found
    outlier_k: int | None = Field(None, ge=1)


class Config(_Strict):
    """One analysis: a model, the normalizers to compare, data, training, probes, output."""

    name: str = "analysis"
    description: str = ""
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(name="mlp"))
    normalizers: Literal["all"] | list[str] = "all"
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    hessian: HessianConfig = Field(default_factory=HessianConfig)
    # name -> {dotted.key: value}: each variant reruns the grid with these settings changed
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    output: str | None = None

    @field_validator("variants")
    @classmethod
    def _variant_names_ok(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, changes in value.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+=-]*", str(name)):
                raise _PathError(
                    (name,),
                    "a variant name goes into run names and folder names: use letters, digits "
                    "and . + = - (no spaces or underscores), e.g. bs64 or quarter-stats",
                )
            if not isinstance(changes, dict):
                raise _PathError(
                    (name,),
                    f"must be a mapping of dotted keys to values, e.g. "
                    f"{{train.batch_size: 64}}, got {changes!r}",
                )
            for key in changes:
                if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", str(key)):
                    raise _PathError(
                        (name, key), "not a dotted key like train.batch_size or model.norm_options"
                    )
                top = str(key).split(".")[0]
                if top in _NOT_VARIED:
                    raise _PathError(
                        (name, key),
                        f"{top} is the same for every variant; variants change model, "
                        "normalizers, data, train, probes and hessian settings",
                    )
        return value

    @model_validator(mode="after")
    def _variants_ok(self) -> Config:
        for name in self.variants:
            self.variant_config(name)
        return self

    def variant_config(self, name: str) -> Config:
        """The config of one variant: this one with the variant's settings applied.

        >>> cfg = parse_config({"normalizers": ["batch"], "variants": {
        ...     "small": {"train.batch_size": 8}, "labels": {"train.sampler":
        ...     {"kind": "labels", "labels_per_batch": 4, "per_label": 32}}}})
        >>> [(n, c.train.batch_size, c.train.sampler.kind) for n, c in cfg.variant_configs()]
        [('small', 8, 'iid'), ('labels', 128, 'labels')]
        """
        if name not in self.variants:
            raise KeyError(f"no variant {name!r}; the variants are {list(self.variants)}")
        raw = self.to_dict()
        raw.pop("variants")
        for key, value in self.variants[name].items():
            try:
                _set_dotted(raw, key, copy.deepcopy(value))
            except ConfigError as err:
                raise _PathError(("variants", name, key), str(err).split(": ", 1)[-1]) from None
        try:
            return parse_config(raw, source="~")
        except ConfigError as err:
            raise _PathError(("variants", name), str(err).removeprefix("~: ")) from None

    def variant_configs(self) -> list[tuple[str | None, Config]]:
        """``(variant name, its config)`` for every variant; ``[(None, self)]`` without variants."""
        if not self.variants:
            return [(None, self)]
        return [(name, self.variant_config(name)) for name in self.variants]

    @field_validator("normalizers")
    @classmethod
    def _norms_ok(cls, value: Literal["all"] | list[str]) -> Literal["all"] | list[str]:
        if value == "all":
            return value

        if not value:
            raise ValueError("empty list; name at least one normalizer, or write: all")
        names = []
        for i, name in enumerate(value):
            try:
                names.append(NORMS.canonical(name))
            except UnknownNameError as err:
                raise _PathError((i,), str(err)) from None
        if len(set(names)) != len(names):
            raise ValueError(f"normalizers repeat: {value}")
        return names

    def normalizer_names(self) -> list[str]:
        return normalizers() if self.normalizers == "all" else list(self.normalizers)

    def _norm_option_sources(self, normalizer: str) -> dict[str, tuple[Any, tuple[Any, ...]]]:
        """Option -> (value, field path it came from) for ``normalizer`` (canonical name)."""

        out: dict[str, tuple[Any, tuple[Any, ...]]] = {}
        legacy = self.model.options.get("norm_options") if self.model.name is not None else None
        for key, value in (legacy or {}).items():
            out[key] = (value, ("model", "options", "norm_options", key))
        named = None
        for key, options in self.model.norm_options.items():
            if key == "default":
                for opt, value in options.items():
                    out[opt] = (value, ("model", "norm_options", key, opt))
            elif NORMS.canonical(key) == normalizer:
                named = key
        if named is not None:
            for opt, value in self.model.norm_options[named].items():
                out[opt] = (value, ("model", "norm_options", named, opt))
        return out

    def norm_options_for(self, normalizer: str) -> dict[str, Any]:
        """The normalizer options of one normalizer's runs.

        ``model.norm_options.default`` overridden, option by option, by the
        entry under the normalizer's name (or an alias). The older
        ``model.options.norm_options`` of the zoo models counts as ``default``
        (giving both is an error).

        >>> cfg = parse_config({"normalizers": ["batch", "balanced"], "model": {"name": "mlp",
        ...     "norm_options": {"default": {"norm_batch": 4}, "equinorm": {"stat_fraction": 0.5}}}})
        >>> cfg.norm_options_for("batch"), cfg.norm_options_for("balanced")
        ({'norm_batch': 4}, {'norm_batch': 4, 'stat_fraction': 0.5})
        """

        name = NORMS.canonical(normalizer)
        return {key: value for key, (value, _) in self._norm_option_sources(name).items()}

    def norm_batch_for(self, normalizer: str) -> tuple[int | None, tuple[Any, ...]]:
        """``norm_batch`` of a normalizer that uses it (None: whole batches), and its field path.

        None for per-example normalizers, which ignore ``norm_batch``.
        """

        name = NORMS.canonical(normalizer)
        if "norm_batch" not in _options(spec(name)):
            return None, ()
        value, path = self._norm_option_sources(name).get("norm_batch", (None, ()))
        return value, path

    @model_validator(mode="after")
    def _norm_options_ok(self) -> Config:
        if self.model.norm_options and "norm_options" in self.model.options:
            raise _PathError(
                ("model", "options", "norm_options"),
                "give normalizer options in one place: move them to model.norm_options "
                "(e.g. model.norm_options: {default: {norm_batch: 4}, balanced: "
                "{stat_fraction: 0.25}})",
            )
        legacy = self.model.options.get("norm_options")
        if legacy is not None and not isinstance(legacy, dict):
            raise _PathError(
                ("model", "options", "norm_options"),
                f"must be a mapping of normalizer options, got {legacy!r}; better, use "
                "model.norm_options: {default: {...}, <normalizer>: {...}}",
            )
        seen: dict[str, str] = {}
        for key in self.model.norm_options:
            if key == "default":
                continue
            try:
                name = NORMS.canonical(key)
            except UnknownNameError:
                raise _PathError(
                    ("model", "norm_options", key),
                    f"{key!r} is not a normalizer; {_suggest(key, [*NORMS, 'default'])}"
                    "keys are normalizer names (or aliases) or 'default'",
                ) from None
            if name in seen:
                raise _PathError(
                    ("model", "norm_options", key),
                    f"{key!r} and {seen[name]!r} name the same normalizer {name!r}; keep one",
                )
            seen[name] = key
        names = dict.fromkeys([*self.normalizer_names(), *seen])
        for name in names:
            sources = self._norm_option_sources(name)
            valid = _options(spec(name))

            for opt, (value, path) in sources.items():
                if opt not in valid and opt != "norm_batch":
                    hint = (
                        "move it under model.norm_options.<normalizer that has it>; "
                        if path[-2] == "default" or "options" in path
                        else ""
                    )
                    raise _PathError(
                        path,
                        f"normalizer {name!r} has no option {opt!r}; "
                        f"{_suggest(opt, list(valid))}{hint}its options are: "
                        f"{', '.join(valid) or 'none'}"
                        f"{'' if 'norm_batch' in valid else ' (and norm_batch, ignored)'}",
                    )
                try:
                    _try_norm_options(name, {opt: value})
                except NormprobeError as err:
                    raise _PathError(path, f"for normalizer {name!r}: {err}") from None
            try:
                _try_norm_options(name, {opt: value for opt, (value, _) in sources.items()})
            except NormprobeError as err:
                where = ("model", "norm_options", seen.get(name, "default"))
                raise _PathError(where, f"for normalizer {name!r}: {err}") from None
        self._batch_sizes_fit(list(dict.fromkeys(self.normalizer_names())))
        return self

    def _batch_sizes_fit(self, names: list[str]) -> None:
        """Every batch a normalizer with ``norm_batch`` sees in train mode is a multiple of it."""
        tc, hc = self.train, self.hessian
        any_probe = self.probes.any_enabled()
        for name in names:
            g, source = self.norm_batch_for(name)
            if g is None:
                continue
            checks: list[tuple[tuple[Any, ...], int]] = [(("train", "batch_size"), tc.batch_size)]
            if tc.eval_batch_stats.enabled and tc.eval_batch_stats.batch_size is not None:
                checks.append(
                    (("train", "eval_batch_stats", "batch_size"), tc.eval_batch_stats.batch_size)
                )
            if name == "batch-train":  # eval mode uses the eval batch's microbatches too
                checks.append((("train", "eval_batch_size"), tc.eval_batch_size))
            if any_probe:
                checks.append((("data", "probe_batch"), self.data.probe_batch))
            if hc.enabled:
                checks.append((("hessian", "chunk_size"), hc.chunk_size))
                checks.append((("data", "hessian_samples"), self.data.hessian_samples))
            if tc.eval_train_samples < g:
                raise _PathError(
                    ("train", "eval_train_samples"),
                    f"{tc.eval_train_samples} examples cannot fill one microbatch of norm_batch "
                    f"{g} ({_format_path(source)}, normalizer {name!r}); use at least {g}",
                )
            for path, size in checks:
                if size % g:
                    low = max(g, size // g * g)
                    raise _PathError(
                        path,
                        f"{size} is not a multiple of norm_batch {g} ({_format_path(source)}, "
                        f"normalizer {name!r}), whose microbatches must divide every batch it "
                        f"normalizes; use {low} or {low + g}",
                    )

    def output_dir(self) -> Path:
        return Path(self.output if self.output is not None else f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- helpers


def _try_norm_options(name: str, options: dict[str, Any]) -> None:
    """Build normalizer ``name`` on a tiny conv with ``options``: its own checks, no model."""

    try:
        build(name, nn.Conv2d(2, 4, 1), nn.ReLU(), layer_name="~", **options)
    except NormprobeError as err:
        raise NormprobeError(str(err).replace("layer '~': ", "")) from None


def _model_names() -> list[str]:
    return MODELS.names()


class _PathError(ValueError):
    """A ValueError raised inside a validator that knows a deeper path than the field's."""

    def __init__(self, path: tuple[Any, ...], message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _canonical(registry: Any, name: str, field: str) -> str:
    try:
        return registry.canonical(name)
    except UnknownNameError as err:
        raise _PathError((field,), str(err)) from None


def import_factory(path: str) -> Callable[..., Any]:
    """Import ``package.module:function``; a clear error if it cannot be imported."""
    if not isinstance(path, str) or path.count(":") != 1:
        raise ValueError(
            f"{path!r} is not an import path; write package.module:function, "
            "e.g. mymodels.resnets:make_resnet"
        )
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"cannot import module {module_name!r} ({err}); make sure it is installed or on "
            "PYTHONPATH (run normprobe from the folder that contains it)"
        ) from None
    try:
        factory = getattr(module, attr)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ValueError(
            f"module {module_name!r} has no attribute {attr!r}; {_suggest(attr, names)}"
        ) from None
    if not callable(factory):
        raise ValueError(
            f"{path} is a {type(factory).__name__}, not a callable that builds a model"
        )
    return factory


_TYPE_TAG = re.compile(r"\[|^(float|int|str|bool|none|list|dict|tuple)$")


def _format_path(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _explain(error: Mapping[str, Any], valid_keys: Callable[[tuple[Any, ...]], list[str]]) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and _TYPE_TAG.search(p)))
    ctx = error.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, _PathError):
        loc = (*loc, *inner.path)
        return f"{_format_path(loc)}: {inner.message}"
    kind = error["type"]
    given = error.get("input")
    if kind == "extra_forbidden":
        *parent, key = loc
        valid = valid_keys(tuple(parent))
        return (
            f"{_format_path(loc)}: unknown key {key!r}; {_suggest(str(key), valid)}"
            f"valid keys here: {', '.join(valid)}"
        )
    message = str(inner) if isinstance(inner, Exception) else error["msg"]
    message = re.sub(r"^(Value|Assertion) error, ", "", message)
    if kind not in ("value_error", "assertion_error", "missing"):
        message = f"{message}, got {given!r}"
    return f"{_format_path(loc)}: {message}"


def _section_keys(path: tuple[Any, ...]) -> list[str]:
    """Valid keys of the schema section at ``path`` (for unknown-key suggestions)."""
    model: type[BaseModel] | None = Config
    for part in path:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,))]
        model = next(
            (a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
    return list(model.model_fields) if model is not None else []


def _most_specific(errors: list[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The error to report: the first field's deepest (most specific) union branch."""

    def clean(e: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(p for p in e["loc"] if not (isinstance(p, str) and _TYPE_TAG.search(p)))

    first = clean(errors[0])
    same_field = [e for e in errors if clean(e)[: len(first)] == first]
    return max(same_field, key=lambda e: (len(e["loc"]), e["type"] != "float_type"))


def parse_config(raw: Mapping[str, Any], *, source: str = "config") -> Config:
    """Validate a config mapping; raise :class:`ConfigError` naming the field and the fix."""
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections (model, normalizers, data, "
            f"train, probes, hessian, output), got {type(raw).__name__}"
        )
    try:
        return Config.model_validate(dict(raw))
    except ValidationError as err:
        errors = err.errors()
        message = _explain(_most_specific(errors), _section_keys)
        fields = {str(e["loc"][:1]) for e in errors}
        more = f" (and problems in {len(fields) - 1} more field(s))" if len(fields) > 1 else ""
        raise ConfigError(f"{source}: {message}{more}") from None


def _load_yaml(path: Path) -> Any:
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist; check the path")
    if path.is_dir():
        raise ConfigError(f"{str(path)!r} is a folder; pass a YAML config file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(
            f"{path}:{where}: malformed YAML: {problem}; fix the syntax there"
        ) from None


#: top-level keys a variant may not change
_NOT_VARIED = ("name", "description", "output", "variants")


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, bool):  # the `gradient_norms: true` shorthand of a section
            child = node[part] = {"enabled": child}
        elif not isinstance(child, dict):
            raise ConfigError(
                f"--set {dotted}: {'.'.join(parts[: i + 1])} is a {type(child).__name__}, "
                f"not a section with keys"
            )
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config mapping."""
    result = copy.deepcopy(dict(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.steps=100")
        key, text = item.split("=", 1)
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
            raise ConfigError(f"--set {item!r}: {key!r} is not a dotted key like train.steps")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        _set_dotted(result, key, value)
    return result


def load_config(
    source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()
) -> tuple[Config, dict[str, Any]]:
    """Read and validate a config file (or mapping) with overrides; returns (config, raw mapping)."""
    if isinstance(source, Mapping):
        raw, name = dict(source), "config"
    else:
        path = Path(source)
        raw, name = _load_yaml(path), str(path)
        if raw is None:
            raise ConfigError(f"{name}: the file is empty; see analyses/quickstart.yaml")
        if isinstance(raw, Mapping) and "name" not in raw:
            raw = {"name": path.stem, **raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{name}: the top level must be a mapping of sections, got {type(raw).__name__}"
        )
    raw = apply_overrides(raw, overrides)
    return parse_config(raw, source=name), raw


#: The fields of the schema when config hashes were introduced: always hashed. Every field
#: added since (and any added later) is hashed only when it differs from its default, so a
#: new option never changes the hash of a config that leaves it alone, and result folders
#: written before it resume without a compatibility patch.
_HASHED_ALWAYS = frozenset(
    (
        "name description normalizers "
        "model.name model.factory model.options model.swap_norms "
        "data.name data.options data.probe_batch data.hessian_samples data.seed "
        "train.optimizer train.lr train.momentum train.weight_decay train.batch_size "
        "train.steps train.seeds train.regnorm_lambda train.eval_batch_size "
        "train.eval_train_samples train.device train.threads train.sampler.kind "
        "train.sampler.labels_per_batch train.sampler.per_label "
        "train.eval_batch_stats.enabled train.eval_batch_stats.batch_size "
        "probes.representation.enabled probes.representation.pairing "
        "probes.representation.noise_scale probes.representation.layers "
        "probes.representation.mode probes.gradient_correlation.enabled "
        "probes.gradient_correlation.layers probes.gradient_correlation.mode "
        "probes.gradient_norms.enabled probes.gradient_norms.layers probes.gradient_norms.mode "
        "probes.schedule.steps probes.schedule.every probes.schedule.log "
        "hessian.enabled hessian.schedule.steps hessian.schedule.every hessian.schedule.log "
        "hessian.lanczos_steps hessian.start_vectors hessian.pieces hessian.top_k "
        "hessian.trace_samples hessian.norm_mode hessian.chunk_size hessian.dtype"
    ).split()
)


def _hashed(value: dict[str, Any], default: dict[str, Any], path: str) -> dict[str, Any]:
    """The part of a config dump that the hash covers (see :data:`_HASHED_ALWAYS`)."""
    out = {}
    for key, item in value.items():
        here = f"{path}.{key}" if path else key
        if here in _HASHED_ALWAYS:
            out[key] = item
        elif isinstance(item, dict) and any(p.startswith(here + ".") for p in _HASHED_ALWAYS):
            out[key] = _hashed(item, default.get(key) or {}, here)
        elif key not in default or item != default[key]:
            out[key] = item
    return out


def config_hash(config: Config) -> str:
    """A short hash of the resolved config, excluding where its output goes.

    Fields at their default are left out unless they belong to the original
    schema (:data:`_HASHED_ALWAYS`), so adding an option needs no change here.
    """
    data = config.to_dict()
    data.pop("output", None)
    default = Config().to_dict()
    text = json.dumps(_hashed(data, default, ""), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
