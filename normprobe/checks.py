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

from typing import Any

import torch
from torch import nn

from normprobe.config import Config, ConfigError
from normprobe.configtools import format_path
from normprobe.errors import NormprobeError
from normprobe.norms import NORMS, build
from normprobe.plan import ProbeData, build_run_model
from normprobe.state import preserved
from normprobe.training import norm_batch_of

__all__ = ["check_norm_options", "preflight"]


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
    config: Config, data: ProbeData, device: torch.device
) -> tuple[list[str], dict[str, str]]:
    """Build each normalizer's model once and run a forward pass; sort out those that cannot work.

    Returns the usable normalizers and, for the skipped ones, the reason.
    With ``normalizers: all`` a normalizer the model cannot take (instance
    norm in an MLP) is skipped; one named explicitly is a
    :class:`~normprobe.config.ConfigError`.
    """
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
