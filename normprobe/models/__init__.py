"""Model zoo: every model is built from a normalizer name, so each normalizer fits each model.

>>> from normprobe.models import build_model
>>> model = build_model("mlp", norm="layer", depth=4, width=32, seed=0)
>>> type(model).__name__
'MLP'
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from normprobe.errors import ModelError
from normprobe.models.mlp import MLP
from normprobe.models.transformer import Transformer
from normprobe.models.wrn import WideResNet
from normprobe.registry import Registry

__all__ = ["MODELS", "build_model", "model_options", "MLP", "WideResNet", "Transformer"]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
MODELS.register("mlp", MLP)
MODELS.register("wrn", WideResNet, aliases=("wideresnet",))
MODELS.register("transformer", Transformer)


def model_options(name: str) -> dict[str, Any]:
    """The keyword options of model ``name`` with their defaults."""
    sig = inspect.signature(MODELS.get(name))
    return {
        n: (None if p.default is p.empty else p.default)
        for n, p in sig.parameters.items()
        if p.kind is p.KEYWORD_ONLY
    }


def build_model(
    name: str, norm: str = "none", *, seed: int | None = None, **kwargs: Any
) -> nn.Module:
    """Build zoo model ``name`` with normalizer ``norm`` in every hidden layer.

    ``seed`` makes the initialization reproducible without touching the
    global random state (it runs inside ``torch.random.fork_rng``). Unknown
    keyword arguments raise an error listing the model's options.
    """
    factory = MODELS.get(name)
    valid = model_options(name)
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ModelError(
                f"model {MODELS.canonical(name)!r} has no option {key!r}; {hint}"
                f"its options are: {', '.join(valid)}"
            )
    if seed is None:
        return factory(norm, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(norm, **kwargs)
