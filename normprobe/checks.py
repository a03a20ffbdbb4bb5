"""Will this config run? The checks that need real layers and models, apart from the schema.

The schema (:mod:`normprobe.config`) checks names, types and values without
building anything. Before any training starts, :func:`check_norm_options`
builds each normalizer on a tiny layer with the config's options (its own
checks: a group count, a fraction in range), and :func:`preflight` builds
each normalizer's model once and runs a forward pass on a few probe
examples, so a normalizer the model cannot take is skipped with its reason
(``normalizers: all``) or refused with one clear error (a normalizer named
explicitly).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from normprobe.batch import model_dtype, prediction
from normprobe.config import Config, ConfigError
from normprobe.configtools import format_path
from normprobe.errors import NormprobeError, user_stacklevel
from normprobe.hessian.basis import (
    TopKCostError,
    check_product_budget,
    check_top_k_fits,
    vectors_dtype,
)
from normprobe.hessian.hvp import products_dtype
from normprobe.hessian.lanczos import HessianError
from normprobe.hessian.spectrum import MAX_MATVECS
from normprobe.norms import NORMS, build
from normprobe.plan import ProbeData, build_run_model
from normprobe.state import preserved
from normprobe.training import norm_batch_of

__all__ = ["check_norm_options", "preflight", "check_model_size", "check_hessian_size"]

#: A zoo model deeper than this is sized by extrapolation before it is built.
_DEEP = 64
#: A deeper zoo model is refused unless ``train.max_parameters`` is set explicitly.
_MAX_DEPTH = 10_000


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_parameters(config: Config, norm: str, dataset: Any) -> int | None:
    """The parameters of the run's model built on the ``meta`` device (no memory), or None
    when it cannot be built there (a depth the model refuses, a layer that reads values)."""
    try:
        with torch.device("meta"):
            return _parameters(build_run_model(config, norm, 0, dataset))
    except Exception:  # the real build, next, reports what is wrong with it
        return None


def estimate_parameters(config: Config, norm: str, dataset: Any) -> int | None:
    """The parameter count of a zoo model, without allocating it (None for a factory).

    Builds the model on torch's ``meta`` device (no memory); a deep one at
    the two smallest depths it accepts, extrapolated linearly in ``depth``,
    so a ``depth: 100000`` typo is caught in well under a second.
    """
    mc = config.model
    if mc.name is None:
        return None
    depth = mc.options.get("depth")
    if not isinstance(depth, int) or depth <= _DEEP:
        return _meta_parameters(config, norm, dataset)
    points: list[tuple[int, int]] = []
    for d in range(1, _DEEP + 1):
        model_config = mc.model_copy(update={"options": {**mc.options, "depth": d}})
        small = config.model_copy(update={"model": model_config})
        count = _meta_parameters(small, norm, dataset)
        if count is None:
            continue
        points.append((d, count))
        if len(points) == 2:
            (d0, p0), (d1, p1) = points
            return p0 + (depth - d0) * (p1 - p0) // (d1 - d0)
    return None


def check_model_size(config: Config, norm: str, dataset: Any) -> None:
    """Refuse a zoo model larger than ``train.max_parameters``, or absurdly deep, before
    building it."""
    count = estimate_parameters(config, norm, dataset)
    limit = config.train.max_parameters
    if count is None:
        return
    depth = config.model.options.get("depth", 0)
    size = f"about {count:.2g} parameters, {count * 4 / 1e9:.3g} GB of float32 weights"
    if count > limit:
        raise ConfigError(
            f"model.options: {config.model.options} makes a model of {size} (several times that while "
            f"training), more than train.max_parameters ({limit:.2g}); use a smaller model, "
            f"or set train.max_parameters: {count} to build it anyway"
        )
    if depth > _MAX_DEPTH and "max_parameters" not in config.train.model_fields_set:
        # small layers, but so many that building and training them takes hours
        raise ConfigError(
            f"model.options.depth: {depth} layers ({size}) would take hours to build and "
            f"train; use a depth up to {_MAX_DEPTH}, or set train.max_parameters to build it "
            "anyway"
        )


def check_hessian_size(config: Config, model: nn.Module) -> None:
    """Refuse more Hessian eigenvalues than the model has parameters (its dimension), or more
    than ARPACK can find within the memory free now and its budget of products."""
    hc = config.hessian
    if not hc.enabled:
        return
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if hc.top_k > dim:
        raise ConfigError(
            f"hessian.top_k: {hc.top_k} eigenvalues asked of a Hessian of dimension {dim} "
            f"(the model's trainable parameters); use top_k <= {dim}"
        )
    if {"top", "smallest"} & set(hc.pieces):
        products = products_dtype(model_dtype(model))
        try:
            check_top_k_fits(
                dim,
                hc.top_k,
                vectors_dtype(getattr(torch, hc.dtype), products),
                max_matvecs=MAX_MATVECS,
                name="top_k",
            )
        except TopKCostError as err:
            raise ConfigError(f"hessian.{err}") from None
    try:
        check_product_budget(
            hc.pieces, hc.lanczos_steps, hc.trace_samples, dim, MAX_MATVECS,
            steps_name="lanczos_steps", adjustable=False,
        )  # fmt: skip
    except HessianError as err:
        raise ConfigError(f"hessian.{err}") from None


def _try_norm_options(name: str, options: dict[str, Any]) -> None:
    """Build normalizer ``name`` on a tiny conv with ``options``: its own checks, no model."""
    try:
        build(name, nn.Conv2d(2, 4, 1), nn.ReLU(), layer_name="~", **options)
    except NormprobeError as err:
        raise NormprobeError(str(err).replace("layer '~': ", "")) from None


def check_norm_options(config: Config) -> None:
    """Build every normalizer the config gives options to with those options; one clear error.

    Each option alone first (the error names its field path), then all of a
    normalizer's options together (``model.norm_options.<normalizer>``).
    """
    named = {NORMS.canonical(key): key for key in config.model.norm_options if key != "default"}
    for name in dict.fromkeys([*config.normalizer_names(), *named]):
        sources = config.norm_option_sources(name)
        for opt, (value, path) in sources.items():
            try:
                _try_norm_options(name, {opt: value})
            except NormprobeError as err:
                raise ConfigError(f"{format_path(path)}: for normalizer {name!r}: {err}") from None
        try:
            _try_norm_options(name, {opt: value for opt, (value, _) in sources.items()})
        except NormprobeError as err:
            where = format_path(("model", "norm_options", named.get(name, "default")))
            raise ConfigError(f"{where}: for normalizer {name!r}: {err}") from None


def preflight(
    config: Config,
    data: ProbeData,
    device: torch.device,
    sizes: dict[str, int] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Build each normalizer's model once and run a forward pass; sort out those that cannot work.

    Returns the usable normalizers and, for the skipped ones, the reason.
    ``sizes``, when given, receives each usable model's parameter count by
    normalizer (the largest, when it is filled again for another variant).
    With ``normalizers: all`` a normalizer the model cannot take (instance
    norm in an MLP) is skipped; one named explicitly is a
    :class:`~normprobe.config.ConfigError`.
    """
    usable, skipped = [], {}
    built: list[tuple[str, tuple[Any, ...]]] = []  # a factory's models, to compare
    explicit = config.normalizers != "all"
    for i, norm in enumerate(config.normalizer_names()):
        try:
            check_model_size(config, norm, data.dataset)
            model = build_run_model(config, norm, 0, data.dataset).to(device)
            check_hessian_size(config, model)
            # a whole number of microbatches when the normalizer uses norm_batch
            size = norm_batch_of(model) or 4
            x = data.batch_a[0] if len(data.batch_a[0]) >= size else data.dataset.train.x
            with preserved(model), torch.no_grad():
                model.train()
                out = model(x[:size].to(device))
            _check_classes(out, data.dataset, norm, config)
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
            called = (
                "; a factory is called as factory(norm=<normalizer>, **options), or with "
                "model.swap_norms: true as factory(**options)"
                if isinstance(err, TypeError) and config.model.factory is not None
                else ""
            )
            raise ConfigError(
                f"model: building or running the model with normalizer {norm!r} failed: "
                f"{type(err).__name__}: {err}{called}"
            ) from None
        usable.append(norm)
        if sizes is not None:
            count = sum(p.numel() for p in model.parameters())
            sizes[norm] = max(sizes.get(norm, 0), count)
        if config.model.factory is not None and not config.model.swap_norms:
            built.append((norm, _fingerprint(model)))
    _warn_of_one_model(built)
    return usable, skipped


def _check_classes(out: Any, dataset: Any, norm: str, config: Config) -> None:
    """A classifier's prediction has one score per class of the dataset: (N, K).

    A factory's model with more outputs trains without an error and is scored over classes
    the data never has; with fewer, every run fails at its first loss. Both are said here,
    before any run, naming the numbers.
    """
    y = dataset.train.y
    classes = getattr(dataset, "num_classes", None)
    if y.dim() != 1 or y.is_floating_point() or not isinstance(classes, int):
        return  # next-token targets, regression: no classes axis to check
    try:
        pred = prediction(out, None, ConfigError)
    except ConfigError:
        return  # the probes and the loss say what they cannot read, with the output's shape
    if pred.dim() == 2 and pred.shape[1] == classes:
        return
    shape = tuple(pred.shape)
    what = f"{shape[1]} scores per example" if pred.dim() == 2 else f"shape {shape}"
    raise ConfigError(
        f"model: the model built with normalizer {norm!r} outputs {what}, but dataset "
        f"{config.data.name!r} has {classes} classes: a classifier's prediction is "
        f"(examples, {classes}); build its last layer with num_classes outputs (a factory that "
        f"takes a num_classes argument is given it)"
    )


def _fingerprint(model: nn.Module) -> tuple[Any, ...]:
    """What decides a model's computation that a factory sets: its modules (type and
    options, as printed) and its parameters' and buffers' values."""
    modules = tuple(
        (name, type(m).__qualname__, m.extra_repr()) for name, m in model.named_modules()
    )
    tensors = tuple(
        (name, tuple(t.shape), str(t.dtype), *_sums(t.detach()))
        for name, t in model.state_dict().items()
    )
    return modules, tensors


def _sums(t: torch.Tensor) -> tuple[float, ...]:
    """Two float64 sums of a tensor's entries (values and, for floats, the norm): equal for
    equal tensors, without copying a large one."""
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
        return ()
    total = float(t.sum(dtype=torch.float64))
    if not t.is_floating_point():
        return (total,)
    return total, float(torch.linalg.vector_norm(t, dtype=torch.float64))


def _warn_of_one_model(built: list[tuple[str, tuple[Any, ...]]]) -> None:
    """Warn when a factory built the same model for two normalizers: its runs would be labelled
    as different normalizers and hold the same numbers."""
    seen: dict[tuple[Any, ...], str] = {}
    for norm, fingerprint in built:
        first = seen.setdefault(fingerprint, norm)
        if first != norm:
            warnings.warn(
                f"model.factory built the same model for normalizers {first!r} and {norm!r} (the "
                f"same modules and parameters): their runs will hold the same numbers under two "
                f"names. Does the factory use its norm argument? (set model.swap_norms: true to "
                f"have normprobe replace a model's torch norm layers by each normalizer)",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
