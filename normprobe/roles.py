"""Layers by role, not by class: what the probes and the Hessian look at in any model.

- **weight layers** (gradient probes, Hessian): modules that own a
  parameter named ``weight`` (directly, or through a parametrization such as
  weight norm). ``nn.Linear``, ``nn.Conv*``, Hugging Face's ``Conv1D``,
  ``nn.Embedding`` and a user's own layer all count. Three options, shared
  by the gradient probes and the Hessian, say which of them are taken:
  ``embeddings`` (``nn.Embedding`` and other modules whose class name ends
  in ``Embedding``), ``norms`` (normalization layers, whose weight is a
  per-feature gain) and ``frozen`` (a weight with ``requires_grad=False``).
  Every weight layer left out is reported with the reason
  (:func:`weight_layers`).
- **blocks** (representation probes): the repeated units of a residual
  network or a transformer, whose outputs are the residual stream. A block
  is a child of an ``nn.ModuleList`` or ``nn.Sequential`` that has at least
  one sibling of the same class and submodules of its own (GPT-2's
  ``transformer.h.{i}``, BERT's ``encoder.layer.{i}``, a ResNet's
  ``BasicBlock``); where blocks nest, the innermost are taken
  (:func:`find_blocks`).
- **activations** and **normalizers**: torch's activation modules, torch's
  normalization layers, any module whose class sets ``is_normalizer = True``,
  and third-party leaf modules whose class name ends in ``Norm`` (``LlamaRMSNorm``,
  ``T5LayerNorm``).

This module imports neither ``normprobe.norms`` nor ``normprobe.models``.

>>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
>>> _ = net[3].weight.requires_grad_(False)
>>> chosen, left_out = weight_layers(net)
>>> list(chosen), left_out
(['1'], {'0': 'embedding', '2': 'norm', '3': 'frozen'})
"""

from __future__ import annotations

import re
from collections import Counter

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod

from normprobe.errors import listed

__all__ = [
    "ACTIVATION_TYPES",
    "NORMALIZER_TYPES",
    "AFFINE_TYPES",
    "is_activation",
    "is_normalizer",
    "is_affine",
    "is_embedding",
    "owns_weight",
    "pruned_original",
    "is_frozen",
    "weight_layers",
    "weight_rule",
    "find_blocks",
]

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,  # and ReLU6
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Threshold,
    nn.GLU,
)
NORMALIZER_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)
AFFINE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)

# LlamaRMSNorm, T5LayerNorm, BatchNorm2d: "Norm" at the end or before digits/"d"
_NORM_NAME = re.compile(r"Norm(\d*d)?$")


def is_activation(module: nn.Module) -> bool:
    """An elementwise nonlinearity module (ReLU, GELU, Tanh, ...); not Identity or Softmax."""
    return isinstance(module, ACTIVATION_TYPES)


def is_normalizer(module: nn.Module) -> bool:
    """torch's normalization layers, a class with ``is_normalizer = True``, or a leaf ``...Norm``.

    A third-party leaf module counts when its class name ends in ``Norm`` and
    it has a ``normalized_shape`` or a one-dimensional ``weight`` (a gain per
    feature): ``LlamaRMSNorm``, ``T5LayerNorm``; weight-norm
    parametrizations (``_WeightNorm``) do not.

    >>> import torch
    >>> class LlamaRMSNorm(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.ones(4))
    >>> is_normalizer(LlamaRMSNorm()), is_normalizer(nn.Linear(2, 2))
    (True, False)
    """
    flag = getattr(type(module), "is_normalizer", None)
    if flag is True or isinstance(module, NORMALIZER_TYPES):
        return True
    if flag is not None:  # a class that says it is not one
        return False
    if any(True for _ in module.children()) or not _NORM_NAME.search(type(module).__name__):
        return False
    # a layer over features (not a weight-norm parametrization): a normalized shape or a gain
    weight = module._parameters.get("weight")
    return hasattr(module, "normalized_shape") or (weight is not None and weight.dim() == 1)


def is_affine(module: nn.Module) -> bool:
    """A Linear or Conv layer (weight-parametrized ones included)."""
    return isinstance(module, AFFINE_TYPES)


def is_embedding(module: nn.Module) -> bool:
    """``nn.Embedding``/``nn.EmbeddingBag``, or a module whose class name ends in ``Embedding``."""
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or type(module).__name__.endswith(
        "Embedding"
    )


def pruned_original(module: nn.Module) -> nn.Parameter | None:
    """The parameter behind a ``weight`` pruned by ``torch.nn.utils.prune`` (``weight_orig``,
    which a forward pre-hook multiplies by ``weight_mask`` into the ``weight`` the layer
    applies), or None for a module whose weight is not pruned.

    >>> import torch.nn.utils.prune as prune
    >>> layer = prune.random_unstructured(nn.Linear(4, 4), "weight", amount=0.5)
    >>> pruned_original(layer) is layer.weight_orig, pruned_original(nn.Linear(4, 4))
    (True, None)
    """
    original = module._parameters.get("weight_orig")
    if original is None:
        return None
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, BasePruningMethod) and hook._tensor_name == "weight":
            return original
    return None


def owns_weight(module: nn.Module) -> bool:
    """Whether ``module`` has its own parameter ``weight`` (or a parametrized ``weight``, or
    one pruned by ``torch.nn.utils.prune``: :func:`pruned_original`)."""
    if parametrize.is_parametrized(module, "weight"):
        return True
    return module._parameters.get("weight") is not None or pruned_original(module) is not None


def is_frozen(module: nn.Module) -> bool:
    """Whether no parameter behind the module's ``weight`` requires grad."""
    if parametrize.is_parametrized(module, "weight"):
        originals = module.parametrizations["weight"].parameters()
        return not any(p.requires_grad for p in originals)
    weight = module._parameters.get("weight")
    return not (pruned_original(module) if weight is None else weight).requires_grad


def _role(module: nn.Module) -> str:
    if is_embedding(module):
        return "embedding"
    if is_normalizer(module):
        return "norm"
    return "weight"


def weight_layers(
    model: nn.Module, *, embeddings: bool = False, norms: bool = False, frozen: bool = False
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The weight layers taken (name -> module) and those left out (name -> reason).

    A reason is ``"embedding"``, ``"norm"`` or ``"frozen"``: the option that
    would take the layer; or, for a module that owns parameters but no
    ``weight`` (``nn.MultiheadAttention``'s ``in_proj_weight``, a bare
    ``nn.Parameter``), their names: no option takes it, and saying so keeps
    it from dropping out of the tables unsaid. Names in registration order;
    a module reachable under two names counts once.

    >>> net = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2))
    >>> chosen, left_out = weight_layers(net)
    >>> list(chosen), left_out
    (['0', '1.out_proj'], {'1': 'in_proj_weight, in_proj_bias: not a weight'})
    """
    chosen: dict[str, nn.Module] = {}
    left_out: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if not owns_weight(module):
            # a parametrization's originals belong to the module it parametrizes (owns_weight)
            if isinstance(module, parametrize.ParametrizationList):
                continue
            own = [n for n, p in module._parameters.items() if p is not None]
            if own:
                left_out[name] = ", ".join(own) + ": not a weight"
            continue
        role = _role(module)
        if role == "embedding" and not embeddings:
            left_out[name] = "embedding"
        elif role == "norm" and not norms:
            left_out[name] = "norm"
        elif is_frozen(module) and not frozen:
            left_out[name] = "frozen"
        else:
            chosen[name] = module
    return chosen, left_out


def weight_rule(embeddings: bool, norms: bool, frozen: bool, left_out: dict[str, str]) -> str:
    """A one-line statement of the weight-layer rule and what it left out (for result tables).

    >>> weight_rule(False, False, False, {"wte": "embedding"})
    'modules owning a weight; embeddings no, norms no, frozen no; left out: wte (embedding)'
    """
    yes = {True: "yes", False: "no"}
    rule = (
        f"modules owning a weight; embeddings {yes[embeddings]}, norms {yes[norms]}, "
        f"frozen {yes[frozen]}"
    )
    if left_out:
        rule += f"; left out: {listed([f'{n} ({r})' for n, r in left_out.items()], 8)}"
    return rule


def _composite(module: nn.Module) -> bool:
    return any(True for _ in module.children()) and any(True for _ in module.parameters())


def find_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The model's blocks (module docstring), innermost where they nest, in registration order.

    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return x + self.fc(x)
    >>> net = nn.Sequential(nn.Linear(3, 4), Block(), Block(), nn.Linear(4, 2))
    >>> list(find_blocks(net))
    ['1', '2']
    """
    candidates: dict[str, nn.Module] = {}
    for name, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(container.named_children())
        counts = Counter(type(c) for _, c in children)
        for child_name, child in children:
            if counts[type(child)] >= 2 and _composite(child):
                candidates[f"{name}.{child_name}" if name else child_name] = child
    names = list(candidates)
    return {n: m for n, m in candidates.items() if not any(o.startswith(n + ".") for o in names)}
