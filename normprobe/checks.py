"""Will this config run? The checks that need real models, apart from the schema.

The schema (:mod:`normprobe.config`) checks names, types and values without
building a model. Before any training starts, :func:`preflight` builds each
normalizer's model once and runs a forward pass on a few probe examples, so
a normalizer the model cannot take is skipped with its reason (``normalizers:
all``) or refused with one clear error (a normalizer named explicitly).
"""

from __future__ import annotations

import torch

from normprobe.config import Config, ConfigError
from normprobe.errors import NormprobeError
from normprobe.plan import ProbeData, build_run_model
from normprobe.state import preserved
from normprobe.training import norm_batch_of

__all__ = ["preflight"]


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
