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
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from normprobe.configtools import (
    ConfigError,
    PathError,
    Strict,
    apply_overrides,
    explain,
    format_path,
    import_factory,
    load_yaml,
    most_specific,
    set_dotted,
    suggest,
)
from normprobe.errors import NormprobeError, UnknownNameError
from normprobe.norms import NORMS, _options, normalizers, spec
from normprobe.norms.base import check_norm_batch
from normprobe.schema import (
    PROBES,
    BatchMeanProbe,
    BatchStatsEval,
    DataConfig,
    GradientProbe,
    HessianConfig,
    ModelConfig,
    ProbesConfig,
    RepresentationProbe,
    SamplerConfig,
    Schedule,
    StructuralProbe,
    TrainConfig,
)

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
    "RepresentationProbe",
    "GradientProbe",
    "PROBES",
    "load_config",
    "parse_config",
    "apply_overrides",
    "config_hash",
    "import_factory",
]


#: top-level keys a variant may not change
_NOT_VARIED = ("name", "description", "output", "variants")


class Config(Strict):
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
                raise PathError(
                    (name,),
                    "a variant name goes into run names and folder names: use letters, digits "
                    "and . + = - (no spaces or underscores), e.g. bs64 or quarter-stats",
                )
            if not isinstance(changes, dict):
                raise PathError(
                    (name,),
                    f"must be a mapping of dotted keys to values, e.g. "
                    f"{{train.batch_size: 64}}, got {changes!r}",
                )
            for key in changes:
                if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", str(key)):
                    raise PathError(
                        (name, key), "not a dotted key like train.batch_size or model.norm_options"
                    )
                top = str(key).split(".")[0]
                if top in _NOT_VARIED:
                    raise PathError(
                        (name, key),
                        f"{top} is the same for every variant; variants change model, "
                        "normalizers, data, train, probes and hessian settings",
                    )
        return value

    @model_validator(mode="after")
    def _held_out_for_selection(self) -> Config:
        if self.train.select_on == "held_out" and not self.data.held_out:
            raise PathError(
                ("train", "select_on"),
                "held_out selects on a held-out split of the training data, but data.held_out "
                "is 0; set data.held_out (e.g. 0.1) or select_on: auto",
            )
        return self

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
                set_dotted(raw, key, copy.deepcopy(value))
            except ConfigError as err:
                raise PathError(("variants", name, key), str(err).split(": ", 1)[-1]) from None
        try:
            return parse_config(raw, source="~")
        except ConfigError as err:
            raise PathError(("variants", name), str(err).removeprefix("~: ")) from None

    def variant_configs(self) -> list[tuple[str | None, Config]]:
        """``(variant name, its config)`` for every variant; ``[(None, self)]`` without variants."""
        if not self.variants:
            return [(None, self)]
        return [(name, self.variant_config(name)) for name in self.variants]

    @field_validator("normalizers", mode="before")
    @classmethod
    def _norms_kind(cls, value: Any) -> Any:
        if not isinstance(value, (str, list)):
            raise ValueError(
                f"give a list of normalizer names, e.g. [batch, layer], or all; got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _schedules_in_training(self) -> Config:
        """Explicit schedule steps past ``train.steps`` would be dropped silently: refuse them."""
        for section in ("probes", "hessian"):
            part = getattr(self, section)
            if "schedule" not in part.model_fields_set or part.schedule.steps is None:
                continue
            if section == "hessian" and not part.enabled:
                continue
            for i, step in enumerate(part.schedule.steps):
                if step > self.train.steps:
                    raise PathError(
                        (section, "schedule", "steps", i),
                        f"step {step} is past the end of training (train.steps: "
                        f"{self.train.steps}); use steps up to {self.train.steps}",
                    )
        return self

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
                raise PathError((i,), str(err)) from None
        for i, name in enumerate(names):
            if name in names[:i]:
                first = names.index(name)
                what = (
                    f"{value[i]!r} is given twice (normalizers[{first}] is {value[first]!r} too)"
                    if value[i] == value[first]
                    else f"{value[i]!r} is {name} again (normalizers[{first}] is {value[first]!r})"
                )
                raise PathError(
                    (i,),
                    f"{what}; a normalizer is one set of runs, so list each normalizer once: "
                    f"[{', '.join(dict.fromkeys(names))}]",
                )
        return names

    def normalizer_names(self) -> list[str]:
        return normalizers() if self.normalizers == "all" else list(self.normalizers)

    def norm_option_sources(self, normalizer: str) -> dict[str, tuple[Any, tuple[Any, ...]]]:
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
        return {key: value for key, (value, _) in self.norm_option_sources(name).items()}

    def norm_batch_for(self, normalizer: str) -> tuple[int | None, tuple[Any, ...]]:
        """``norm_batch`` of a normalizer that uses it (None: whole batches), and its field path.

        None for per-example normalizers, which ignore ``norm_batch``.
        """

        name = NORMS.canonical(normalizer)
        if "norm_batch" not in _options(spec(name)):
            return None, ()
        value, path = self.norm_option_sources(name).get("norm_batch", (None, ()))
        return value, path

    @model_validator(mode="after")
    def _norm_options_ok(self) -> Config:
        if self.model.norm_options and "norm_options" in self.model.options:
            raise PathError(
                ("model", "options", "norm_options"),
                "give normalizer options in one place: move them to model.norm_options "
                "(e.g. model.norm_options: {default: {norm_batch: 4}, balanced: "
                "{stat_fraction: 0.25}})",
            )
        legacy = self.model.options.get("norm_options")
        if legacy is not None and not isinstance(legacy, dict):
            raise PathError(
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
                raise PathError(
                    ("model", "norm_options", key),
                    f"{key!r} is not a normalizer; {suggest(key, [*NORMS, 'default'])}"
                    "keys are normalizer names (or aliases) or 'default'",
                ) from None
            if name in seen:
                raise PathError(
                    ("model", "norm_options", key),
                    f"{key!r} and {seen[name]!r} name the same normalizer {name!r}; keep one",
                )
            seen[name] = key
        names = dict.fromkeys([*self.normalizer_names(), *seen])
        for name in names:
            sources = self.norm_option_sources(name)
            valid = _options(spec(name))

            for opt, (value, path) in sources.items():
                if opt not in valid and opt != "norm_batch":
                    hint = (
                        "move it under model.norm_options.<normalizer that has it>; "
                        if path[-2] == "default" or "options" in path
                        else ""
                    )
                    raise PathError(
                        path,
                        f"normalizer {name!r} has no option {opt!r}; "
                        f"{suggest(opt, list(valid))}{hint}its options are: "
                        f"{', '.join(valid) or 'none'}"
                        f"{'' if 'norm_batch' in valid else ' (and norm_batch, ignored)'}",
                    )
                if opt == "norm_batch":  # the batch-size checks below divide by it
                    try:
                        check_norm_batch(value)
                    except NormprobeError as err:
                        raise PathError(path, f"for normalizer {name!r}: {err}") from None
        # the option values themselves are checked by building the layers: normprobe.checks
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
                raise PathError(
                    ("train", "eval_train_samples"),
                    f"{tc.eval_train_samples} examples cannot fill one microbatch of norm_batch "
                    f"{g} ({format_path(source)}, normalizer {name!r}); use at least {g}",
                )
            for path, size in checks:
                if size % g:
                    low = max(g, size // g * g)
                    raise PathError(
                        path,
                        f"{size} is not a multiple of norm_batch {g} ({format_path(source)}, "
                        f"normalizer {name!r}), whose microbatches must divide every batch it "
                        f"normalizes; use {low} or {low + g}",
                    )

    def output_dir(self) -> Path:
        return Path(self.output if self.output is not None else f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


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
        message = explain(most_specific(errors), _section_keys)
        fields = {str(e["loc"][:1]) for e in errors}
        more = f" (and problems in {len(fields) - 1} more field(s))" if len(fields) > 1 else ""
        raise ConfigError(f"{source}: {message}{more}") from None


def load_config(
    source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()
) -> tuple[Config, dict[str, Any]]:
    """Read and validate a config file (or mapping) with overrides; returns (config, raw mapping)."""
    if isinstance(source, Mapping):
        raw, name = dict(source), "config"
    else:
        path = Path(source)
        raw, name = load_yaml(path), str(path)
        if raw is None:
            raise ConfigError(f"{name}: the file is empty; see analyses/quickstart.yaml")
        if isinstance(raw, Mapping) and "name" not in raw:
            raw = {"name": path.stem, **raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{name}: the top level must be a mapping of sections, got {type(raw).__name__}"
        )
    merged = apply_overrides(raw, overrides)
    try:
        return parse_config(merged, source=name), merged
    except ConfigError as err:
        if not overrides:
            raise
        try:  # the config alone is fine: the --set values are the trouble, so name them
            parse_config(raw, source=name)
        except ConfigError:
            raise err from None
        given = " ".join(f"--set {item}" for item in overrides)
        raise ConfigError(str(err).replace(f"{name}: ", f"{given}: ", 1)) from None


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


def _legacy_threads(dump: dict[str, Any]) -> None:
    """``train.threads: auto`` hashes as the ``null`` it replaced as the default, so configs
    that leave the threads alone (or say null) keep the hash they had before ``auto``."""
    train = dump.get("train")
    if isinstance(train, dict) and train.get("threads") == "auto":
        train["threads"] = None


def config_hash(config: Config) -> str:
    """A short hash of the resolved config, excluding where its output goes.

    Fields at their default are left out unless they belong to the original
    schema (:data:`_HASHED_ALWAYS`), so adding an option needs no change here.
    """
    data = config.to_dict()
    data.pop("output", None)
    default = Config().to_dict()
    for dump in (data, default):
        _legacy_threads(dump)
    text = json.dumps(_hashed(data, default, ""), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
