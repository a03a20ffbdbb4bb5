"""Hessian-vector products of the mean loss over a probe set, for any ``torch.nn.Module``.

(Over 500 lines, one job: the Hessian operator, its parameter selection,
chunking, precision and sharding, which every product goes through.)

docs/definitions.md, the Hessian: ``H`` is the Hessian of the mean loss over a probe set
of ``n`` samples taken in chunks; with chunk sizes ``n_c``,
``H = sum_c (n_c / n) H_c``, where ``H_c`` is the Hessian of ``loss_fn`` (a
mean over the chunk) on chunk ``c``. :class:`HessianOperator` applies it to
vectors, optionally restricted to a subset of the parameters (one layer, one
block: the others are held fixed) and exposes it as a
``scipy.sparse.linalg.LinearOperator``. Under ``torch.distributed`` the
chunks may be spread over ranks, ``n`` counting every rank's samples, and
each product is summed over the ranks by one all-reduce
(:mod:`normprobe.hessian.distributed`).

How (measured on this machine, 2 cores, float32, 512 samples in 4 chunks of
128, HVP time / gradient time, best of 7 with one torch thread):

=================================  ==========  ==========  =============
method                              MLP batch   MLP layer   WRN-16-1 batch
=================================  ==========  ==========  =============
double backward, graph reused       1.7         2.4         2.5
double backward, graph rebuilt      2.8         3.8         3.8
``jvp(grad)`` (forward-over-rev.)   8.5         7.0         4.6
=================================  ==========  ==========  =============

so the operator uses double backward (``torch.autograd.grad`` with
``create_graph=True``, then the gradient of ``<g, v>``), keeping each
chunk's gradient graph for reuse (exact: the graph is a function of the
parameters only) while the graphs fit in ``graph_memory`` bytes, measured
from the tensors autograd saves; chunks beyond the budget are recomputed on
every product, so memory stays bounded by one chunk's graph plus the budget
(WRN-16-1, 4 chunks of 128 16x16 images, float32: 270 MiB measured, about
420 MiB of resident memory). All cached graphs share their leaves, so one
product is one backward call through all of them. Train-mode batch norm
on large inputs runs through :mod:`normprobe.hessian.batchnorm` inside
these graphs: torch's kernels for the loss and the gradient, a
hand-written second derivative for the products (torch's took 42% of a
WRN-16-1 product; with it the product takes 0.77-0.87 of the time).

Two traps of torch 2.13 (CPU, float64, measured): ``torch.func.hessian`` and
``jacrev(jacrev(f))`` return wrong, asymmetric Hessians for BatchNorm and
LayerNorm networks, so they are not used; and the double backward of
torch's fused weight norm (``torch._weight_norm``, behind both
``torch.nn.utils.parametrizations.weight_norm`` and the older
``torch.nn.utils.weight_norm``) is wrong (HVPs off finite differences by 6% to 50%,
asymmetric), so inside the Hessian's forward pass that one function is
routed through plain ops with the same value and gradient.

The model is never modified: the forward runs through
``torch.func.functional_call`` with detached copies of the parameters (leaves
of the Hessian graph) and clones of the buffers, so even a normalizer that
updates its running statistics in place writes to the clones; around it,
:func:`normprobe.state.preserved` restores buffers, ``.grad``, flags and
``requires_grad``, and plain tensor attributes a forward pass sets (such as a
RegNorm layer's ``penalty``) are put back too.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse.linalg
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from normprobe.batch import (
    Inputs,
    OutputPick,
    Targets,
    all_finite,
    attributes_kept,
    autocast_on,
    autograd_available,
    batch_size,
    call_args,
    check_call,
    check_measurable,
    chunk_batch,
    compute_loss,
    dense_gradients,
    differentiated,
    draws_matter,
    dropout_off,
    fingerprint,
    first_said,
    forked_random_state,
    full_precision,
    generator_states,
    is_batch,
    prediction,
    sparse_embeddings,
    split_batch,
    to_device,
    warn_of_random_draws,
)
from normprobe.errors import listed, user_stacklevel
from normprobe.hessian.batchnorm import LeanBatchNorm
from normprobe.hessian.distributed import (
    ShardGroup,
    bits_checksum,
    mantissa_bits,
    position_weights,
    raise_failures,
    shard_group,
)
from normprobe.hessian.lanczos import HessianError
from normprobe.roles import is_embedding, is_normalizer
from normprobe.state import frozen_statistics, preserved, warn_of_frozen_statistics

__all__ = [
    "NonFiniteProductError",
    "LossFn",
    "NormMode",
    "ParamSelection",
    "Batch",
    "Data",
    "HessianOperator",
    "select_parameters",
    "parameter_roles",
    "split_chunks",
    "excluded_parameters",
    "weight_norms",
    "products_dtype",
    "unwrapped",
]

#: ``loss_fn(prediction, targets)`` returning the mean loss over the batch (a scalar)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``train``: per-chunk batch statistics, running statistics untouched; ``eval``: running statistics
NormMode = Literal["train", "eval"]
#: parameter names and/or module name prefixes, a submodule, or None for every trainable parameter
ParamSelection = str | Sequence[str] | nn.Module | None
#: ``(inputs, targets)`` by the batch contract (:mod:`normprobe.batch`)
Batch = tuple[Inputs, Targets]
#: one ``(inputs, targets)`` probe set (split into chunks here) or an iterable of such chunks
Data = Batch | Iterable[Batch] | Any

NORM_MODES: tuple[str, ...] = ("train", "eval")
#: model dtypes whose Hessian-vector products run in float32 (their own precision gives NaN)
LOW_PRECISION: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Parameter name -> role of the module that owns it: "embedding", "norm" or "weight".

    Roles as :mod:`normprobe.roles` defines them; a bias has its layer's role.

    >>> parameter_roles(nn.Sequential(nn.Embedding(5, 2), nn.LayerNorm(2), nn.Linear(2, 1)))
    {'0.weight': 'embedding', '1.weight': 'norm', '1.bias': 'norm', '2.weight': 'weight', '2.bias': 'weight'}
    """
    roles = {}
    for module_name, module in model.named_modules():
        role = (
            "embedding" if is_embedding(module) else "norm" if is_normalizer(module) else "weight"
        )
        for name, _ in module.named_parameters(recurse=False, prefix=module_name):
            roles.setdefault(name, role)
    # parametrized weights: the originals live in module.parametrizations.weight
    for name, _ in model.named_parameters():
        if name not in roles:
            roles[name] = "weight"
    return roles


def select_parameters(
    model: nn.Module,
    params: ParamSelection = None,
    *,
    embeddings: bool = True,
    norms: bool = True,
    frozen: bool = False,
) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs the Hessian is taken over, in the model's order.

    ``None``: every parameter with ``requires_grad``, less the embeddings'
    (``embeddings=False``) and the normalization layers' (``norms=False``),
    plus the frozen ones with ``frozen=True``: the options the gradient
    probes share (:mod:`normprobe.roles`); :func:`excluded_parameters` says
    what was left out and why. A string or a list of
    strings: each is an exact parameter name or a module name whose
    parameters are all taken (``"blocks.0"``, ``"head"``). A module: its
    parameters (it must belong to ``model``). A weight shared by two modules
    (an output layer tied to the embedding) is one parameter, taken with
    either module and listed once, under the name ``model.named_parameters()``
    gives it (the first module's).

    >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> [n for n, _ in select_parameters(net, "2")]
    ['2.weight', '2.bias']
    >>> [n for n, _ in select_parameters(net, ["0.bias", "2"])]
    ['0.bias', '2.weight', '2.bias']
    """
    named = list(model.named_parameters())
    if not named:
        raise HessianError(f"{type(model).__name__} has no parameters to take a Hessian over")
    if params is None:
        left_out = excluded_parameters(model, embeddings=embeddings, norms=norms, frozen=frozen)
        chosen = [(n, p) for n, p in named if n not in left_out]
        if not chosen:
            raise HessianError(
                f"no parameter of the model requires grad or is taken by the rule (left out: "
                f"{', '.join(f'{n} ({r})' for n, r in list(left_out.items())[:6])}); pass "
                f"frozen=True, embeddings=True or norms=True, or name the parameters with "
                f"params=... (frozen parameters are included when named)"
            )
        return chosen
    if isinstance(params, nn.Module):
        ids = {id(p) for p in params.parameters()}
        chosen = [(n, p) for n, p in named if id(p) in ids]
        if not chosen:
            raise HessianError(
                f"params={type(params).__name__} has no parameters of the model; pass a submodule "
                f"of the model (e.g. model.head) or module names as strings"
            )
        return chosen
    wanted = [params] if isinstance(params, str) else list(params)
    if not wanted or not all(isinstance(w, str) for w in wanted):
        raise HessianError(
            f"params must be None, a module, or parameter/module names as strings, got {params!r}"
        )
    # every name a parameter has: a weight shared by two modules (an output layer tied to the
    # embedding) is listed once by named_parameters(), under the first module's name
    aliases = list(model.named_parameters(remove_duplicate=False))
    keep: set[int] = set()
    modules = [n for n, _ in model.named_modules() if n]
    for w in wanted:
        hits = {id(p) for n, p in aliases if n == w or n.startswith(w + ".")}
        if not hits:
            if w in modules:
                raise HessianError(
                    f"params: module {w!r} has no parameters of its own to take a Hessian over; "
                    f"pass a module or parameter names from model.named_parameters()"
                )
            close = difflib.get_close_matches(w, [n for n, _ in aliases] + modules, n=3)
            hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
            raise HessianError(
                f"params: {w!r} is neither a parameter nor a module of the model; {hint}"
                f"pass names from model.named_parameters() or model.named_modules()"
            )
        keep |= hits
    return [(n, p) for n, p in named if id(p) in keep]


def excluded_parameters(
    model: nn.Module, *, embeddings: bool = True, norms: bool = True, frozen: bool = False
) -> dict[str, str]:
    """Parameter name -> why the default selection leaves it out ("frozen", "embedding", "norm").

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    >>> _ = net[0].bias.requires_grad_(False)
    >>> excluded_parameters(net, norms=False)
    {'0.bias': 'frozen', '1.weight': 'norm', '1.bias': 'norm'}
    """
    roles = parameter_roles(model)
    left_out = {}
    for name, p in model.named_parameters():
        if roles[name] == "embedding" and not embeddings:
            left_out[name] = "embedding"
        elif roles[name] == "norm" and not norms:
            left_out[name] = "norm"
        elif not p.requires_grad and not frozen:
            left_out[name] = "frozen"
    return left_out


def weight_norms(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """Frobenius norm of each named tensor (float), in order.

    Weights that feed a batch or layer normalizer are scale invariant, so
    their Hessian scales as ``1 / ||w||^2``: these norms say how to compare
    spectra across normalizers.

    >>> weight_norms([("w", torch.tensor([3.0, 4.0]))])
    {'w': 5.0}
    """
    return {n: float(torch.linalg.vector_norm(t.detach().double())) for n, t in named}


def _is_batch(obj: Any) -> bool:
    return is_batch(obj)


def _as_batch(obj: Any) -> Batch:
    return split_batch(obj, "data", HessianError, values=False)


def split_chunks(data: Data, chunk_size: int = 128, *, allow_empty: bool = False) -> list[Batch]:
    """The probe set as a list of ``(inputs, targets)`` chunks (:mod:`normprobe.batch`).

    A single batch (or a ``normprobe.data.Split``) is cut into
    ``ceil(n / chunk_size)`` chunks of nearly equal size (never a chunk of 1
    that a batch-statistic normalizer could not take), every input tensor and
    the targets alike; an iterable of batches is taken as the chunks,
    unchanged, read once. ``allow_empty`` returns no chunks for a batch of
    zero rows or an empty iterable (a rank with no share of a sharded probe
    set) instead of raising.

    >>> x, y = torch.zeros(10, 2), torch.zeros(10)
    >>> [len(c[0]) for c in split_chunks((x, y), chunk_size=4)]
    [4, 3, 3]
    >>> mask = torch.ones(10, 2, dtype=torch.long)
    >>> [len(c[0]["mask"]) for c in split_chunks(({"x": x, "mask": mask}, None), chunk_size=5)]
    [5, 5]
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise HessianError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if _is_batch(data):
        x, y = _as_batch(data)
        n = batch_size(x, y, "data", HessianError)
        if allow_empty and n == 0:
            return []
        _check_pair(x, y, "data")
        return chunk_batch(x, y, math.ceil(n / chunk_size))
    try:
        items = list(data)
    except TypeError:
        raise HessianError(
            f"data must be an (inputs, targets) batch or an iterable of such chunks, "
            f"got {type(data).__name__}"
        ) from None
    chunks = []
    for i, item in enumerate(items):
        if not _is_batch(item):
            raise HessianError(
                f"data chunk {i} is not an (x, y) pair of inputs and targets (got "
                f"{type(item).__name__}); "
                f"pass (x, y) or an iterable of (x, y) pairs, with x a tensor, a tuple or a dict "
                f"of tensors and y a tensor or None"
            )
        x, y = _as_batch(item)
        _check_pair(x, y, f"data chunk {i}")
        chunks.append((x, y))
    if not chunks and not allow_empty:
        raise HessianError("data has no chunks; pass at least one (x, y) pair")
    return chunks


def _check_pair(x: Inputs, y: Targets, what: str) -> None:
    n = batch_size(x, None, what, HessianError)
    if n == 0:
        raise HessianError(f"{what}: x has no samples (an empty batch)")
    if y is not None and (y.dim() == 0 or len(y) != n):
        raise HessianError(
            f"{what}: x has {n} samples but y has shape {tuple(y.shape)}; "
            f"pass one target per sample"
        )


def _weight_norm_decomposed(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``g * v / ||v||`` with the norm over every axis but ``dim`` (all axes for -1), plain ops."""
    axes = list(range(v.dim())) if dim == -1 else [a for a in range(v.dim()) if a != dim % v.dim()]
    return v * (g / torch.linalg.vector_norm(v, dim=axes, keepdim=True))


class NonFiniteProductError(HessianError):
    """A Hessian-vector product came out NaN or infinite: the loss or its curvature overflows at
    these parameters (a diverged model, or too coarse a dtype)."""


class _PlainWeightNorm(TorchFunctionMode):
    """Route ``torch._weight_norm`` through plain ops inside the Hessian's forward pass.

    torch's weight norm (``torch.nn.utils.parametrizations.weight_norm`` and
    the older ``torch.nn.utils.weight_norm``) calls the fused
    ``_weight_norm_interface`` whose double backward is wrong on torch 2.13
    (CPU, float64: Hessian-vector products off by 6% to 50% against finite
    differences, and asymmetric). The decomposition has the same value and
    gradient and a correct second derivative.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            return _weight_norm_decomposed(*args, **kwargs)
        return func(*args, **kwargs)


def products_dtype(model_dtype: torch.dtype, asked: torch.dtype | None = None) -> torch.dtype:
    """The dtype of the products: ``asked``, else float32 for a half-precision model, else its own.

    float16 and bfloat16 second derivatives overflow or lose every digit (NaN
    eigenvalues), so such a model's parameters, buffers and floating inputs
    are cast for the Hessian's forward pass; the model itself is untouched.
    """
    if asked is None:
        return torch.float32 if model_dtype in LOW_PRECISION else model_dtype
    if asked not in (torch.float32, torch.float64):
        raise HessianError(
            f"the products' dtype must be torch.float32 or torch.float64, got {asked}"
        )
    return asked


def _uses_weight_norm(model: nn.Module) -> bool:
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for m in model.modules():
        if isinstance(m, _WeightNorm):
            return True
        if any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values()):
            return True
    return False


def _is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is the wrapper ``torch.compile(module)`` returns (``OptimizedModule``)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(
        getattr(module, "_orig_mod", None), nn.Module
    )


def _wrapped(module: nn.Module) -> tuple[nn.Module, str] | None:
    """The module a wrapper runs, and the prefix the wrapper's parameter names carry:
    ``torch.compile``'s ``OptimizedModule`` (``_orig_mod.``) and ``nn.DataParallel``
    (``module.``); None for any other module."""
    if _is_compiled(module):
        return module._orig_mod, "_orig_mod."
    if isinstance(module, nn.DataParallel):
        return module.module, "module."
    return None


def unwrapped(model: nn.Module, params: ParamSelection = None) -> tuple[nn.Module, ParamSelection]:
    """The module that ``model``'s wrappers run, and ``params`` named as that module names them.

    A compiled graph has no double backward (torch: "torch.compile with
    aot_autograd does not currently support double backward"), and
    ``nn.DataParallel`` takes no ``torch.func.functional_call`` (torch: "The
    stateless API can't be used with nn.DataParallel module"), so the
    Hessian's products run the module inside: the same parameters and buffers
    and the same function, in eager mode on its own device, named as in that
    module. A parameter or module name given with the wrapper's prefix
    (``_orig_mod.``, ``module.``) is taken without it. A model with compiled
    submodules is refused (:func:`_refuse_compiled_parts`): those cannot be
    run eagerly without changing the model.

    >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> inner, names = unwrapped(nn.DataParallel(net), ["module.2", "0.bias"])
    >>> inner is net, names
    (True, ['2', '0.bias'])
    """
    while (inside := _wrapped(model)) is not None:
        model, prefix = inside
        params = _inner_names(model, params, prefix)
    _refuse_compiled_parts(model)
    return model, params


def _inner_names(inner: nn.Module, params: ParamSelection, prefix: str) -> ParamSelection:
    """``params`` (names) without ``prefix`` where they carry it and ``inner`` has no such
    name itself (a module passes unchanged)."""
    if isinstance(params, nn.Module) or params is None:
        return params
    known = {n for n, _ in inner.named_parameters()} | {n for n, _ in inner.named_modules()}

    def original(name: object) -> object:
        if isinstance(name, str) and name not in known and name.startswith(prefix):
            return name[len(prefix) :]
        return name

    if isinstance(params, str):
        return original(params)
    if isinstance(params, Sequence):
        return [original(p) for p in params]
    return params


def _refuse_compiled_parts(model: nn.Module) -> None:
    compiled = [name for name, m in model.named_modules() if name and _is_compiled(m)]
    if compiled:
        shown = listed(compiled, 5)
        raise HessianError(
            f"the Hessian's products need double backward, which torch.compile'd modules do not "
            f"have, and these submodules are compiled: {shown}; pass the model with the "
            f"original modules (a compiled module's original is its ._orig_mod), or compile "
            f"the whole model instead (normprobe then runs its original for the Hessian)"
        )


#: the code of every function ``torch.autograd.function.once_differentiable`` wraps
_ONCE_DIFFERENTIABLE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__


def _graph_nodes(roots: Iterable[Any]) -> Iterator[Any]:
    """Every autograd node reachable from ``roots`` (grad_fns; None is skipped), once each."""
    stack = [r for r in roots if r is not None]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(n for n, _ in node.next_functions if n is not None and n not in seen)


def _cut_second_derivative(loss: torch.Tensor, grads: Sequence[torch.Tensor]) -> str | None:
    """Why the gradient's graph cannot be differentiated again, or None when it can.

    A custom ``torch.autograd.Function`` whose backward is marked
    ``@once_differentiable`` puts an error node in the gradient's graph, fed
    by a detached copy: ``torch.autograd.grad`` with the parameters as inputs
    never reaches it, so a Hessian-vector product would silently leave out
    every term through that function (tested: a ReLU written so gives a
    product nothing like ``F.relu``'s) instead of raising.
    """
    roots = [g.grad_fn for g in grads if isinstance(g, torch.Tensor)]
    if not any(node.name() == "torch::autograd::Error" for node in _graph_nodes(roots)):
        return None
    names = sorted(
        {
            cls.__qualname__
            for node in _graph_nodes([loss.grad_fn])
            if (cls := getattr(node, "_forward_cls", None)) is not None
            and getattr(getattr(cls, "backward", None), "__code__", None) is _ONCE_DIFFERENTIABLE
        }
    )
    which = f" ({', '.join(names)})" if names else ""
    return (
        f"the model's backward pass runs a custom autograd Function marked "
        f"@once_differentiable{which}, which torch cannot differentiate a second time; the "
        f"Hessian-vector products would silently leave out every term through it. Give its "
        f"backward torch operations that autograd can differentiate (and drop "
        f"@once_differentiable), or use torch's own op for the Hessian"
    )


@contextmanager
def _second_derivative() -> Iterator[None]:
    """Around the products' backward pass: torch's "the derivative for 'op' is not
    implemented" (an op whose backward has no backward of its own, e.g. ``nn.EmbeddingBag``'s)
    as one :class:`HessianError` naming the op and the fix, torch's message as its cause."""
    try:
        yield
    except (NotImplementedError, RuntimeError) as err:
        found = re.search(r"derivative for '?([\w.:]+)'? is not implemented", str(err))
        if found is None:
            raise
        op = found.group(1)
        hint = (
            " (nn.EmbeddingBag's: an nn.Embedding followed by .mean(1) or .sum(1) computes the "
            "same bag and has one)"
            if "embedding_bag" in op
            else ""
        )
        raise HessianError(
            f"torch has no second derivative for {op!r}, which the gradient's graph runs{hint}; "
            f"a Hessian-vector product differentiates the gradient once more. Leave the "
            f"parameters whose gradient goes through it out with params=..., or write that layer "
            f"with operations torch can differentiate twice"
        ) from err


def _put_back_flags(flags: list[tuple[nn.Module, bool]]) -> None:
    for module, flag in flags:
        if module.training is not flag:
            module.training = flag


#: a module call seen by :func:`_module_calls`: the module, whether autograd was on, the ids
#: of the parameters it held, and the dtype ``torch.autocast`` ran it in (None: autocast off)
ModuleCall = tuple[nn.Module, bool, list[int], "torch.dtype | None"]


@contextmanager
def _module_calls(calls: list[ModuleCall], device: torch.device) -> Iterator[None]:
    """Every module called inside the block, appended to ``calls`` (a global forward pre-hook;
    autocast as on ``device``'s type)."""

    def hook(module: nn.Module, args: Any) -> None:
        held = [id(p) for p in module._parameters.values() if p is not None]
        cast = torch.get_autocast_dtype(device.type) if autocast_on(device) else None
        calls.append((module, torch.is_grad_enabled(), held, cast))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _chunk_seed(seed: int, rank: int, index: int) -> int:
    """The seed of the random numbers chunk ``index`` of ``rank`` draws (:meth:`HessianOperator._build`)."""
    return (seed * 1_000_003 + rank * 65_537 + index) % 2**63


@dataclass
class _Graph:
    """One chunk's first-order gradient, with its autograd graph kept for reuse."""

    grads: tuple[torch.Tensor, ...]
    loss: float  # the chunk's weighted loss
    nbytes: int  # memory autograd saved for the graph (parameters not counted)


class HessianOperator:
    """``v -> H v`` for the Hessian of the mean loss of ``model`` over a probe set.

    ``data`` is one ``(x, y)`` probe set (cut into chunks of at most
    ``chunk_size``) or an iterable of ``(x, y)`` chunks; chunk ``c`` of
    ``n_c`` samples gets weight ``n_c / n``. ``norm_mode="train"`` uses each
    chunk's batch statistics (``normprobe.state.frozen_statistics``: running
    statistics and counters untouched) with dropout switched off, so the
    operator is deterministic; ``"eval"`` runs the model in eval mode.
    ``params`` restricts the Hessian to some parameters (see
    :func:`select_parameters`); the vector layout is their flattened
    concatenation in model order. ``weight_scaled=True`` gives ``D H D`` with
    ``D`` the Frobenius norm of each weight tensor (dim >= 2; 1 for biases
    and gains): the Hessian at the point where every weight has unit norm,
    exact for weights followed by a batch or layer normalizer (their loss is
    invariant to the weight's scale), as google/spectral-density's
    ``normalize_model``.

    ``data`` follows the batch contract (:mod:`normprobe.batch`): inputs a
    tensor, a tuple (positional) or a dict (keyword arguments, e.g.
    ``input_ids`` and ``attention_mask``), targets a tensor or None; the
    loss is ``loss_fn(prediction, targets)`` with the prediction read by the
    contract's rule or ``output=``, or the model's own ``outputs.loss`` when
    ``loss_fn`` is None. ``params=None`` takes every trainable parameter;
    ``embeddings=False``, ``norms=False`` leave out those layers' and
    ``frozen=True`` adds the frozen ones (the gradient probes' options);
    :attr:`excluded` lists what was left out and why. Attention through
    ``F.scaled_dot_product_attention`` runs on its math kernel inside the
    products (the fused kernels have no double backward). ``num_classes``
    sets K for the outlier ratio; otherwise it is read from an ``(N, K)``
    prediction, or the last axis of a model with ``classes_last = True``,
    and left unknown (with :attr:`classes_problem`) for other shapes.

    Vectors may have any float dtype and come back in it; products run on
    the model's device in ``product_dtype``: by default the model's dtype,
    float32 for a float16/bfloat16 model (whose own precision gives NaN);
    parameters, buffers and floating inputs are cast for the Hessian's
    forward pass only. A non-finite product raises a :class:`HessianError`.
    A forward pass that draws random numbers with dropout off (a functional
    dropout at a fixed rate, a noise layer) draws them from torch's generators
    seeded by ``seed``, the rank and the chunk, the same numbers for every
    product (one symmetric matrix, repeatable), and says so in a warning
    (:attr:`draws`); the caller's random stream is left alone. Use as a context manager (or call
    :meth:`release`) to free the cached graphs early. A model wrapped by
    ``torch.compile`` or ``nn.DataParallel`` is taken through the module inside
    (:func:`unwrapped`): compiled graphs have no double backward, and
    ``DataParallel`` no ``functional_call``.

    Several processes: when ``torch.distributed`` is initialized and the
    group (``process_group``, default the default group) has more than one
    rank, ``data`` is this rank's shard of the probe set
    (:mod:`normprobe.hessian.distributed`): ``n`` is the sum over the ranks,
    every product, gradient and loss is summed over the ranks by one
    all-reduce (on the model's device), and all ranks get the same numbers.
    These methods are then collectives: call them on every rank, in the
    same order. A rank may hold no data (``x`` of zero rows). ``norm_mode="train"``
    uses each rank's own chunks' batch statistics, as data-parallel training
    without ``SyncBatchNorm``. ``distributed=False`` uses this rank's data
    alone; ``True`` requires an initialized group.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> data = torch.randn(32, 3), torch.randint(0, 2, (32,))
    >>> with HessianOperator(net, nn.functional.cross_entropy, data, chunk_size=16) as hess:
    ...     hv = hess.matvec(torch.ones(hess.dim))
    >>> hess.dim, tuple(hv.shape), hess.num_chunks
    (26, (26,), 2)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        data: Data,
        *,
        params: ParamSelection = None,
        norm_mode: NormMode = "train",
        chunk_size: int = 128,
        weight_scaled: bool = False,
        graph_memory: int = 2 * 2**30,
        distributed: bool | None = None,
        process_group: Any = None,
        output: OutputPick = None,
        num_classes: int | None = None,
        embeddings: bool = True,
        norms: bool = True,
        frozen: bool = False,
        product_dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        #: the ranks sharing the probe set, or None for one process
        self.shards: ShardGroup | None = shard_group(distributed, process_group)
        #: seeds the random numbers a forward pass draws (:meth:`_build`)
        self.seed = int(seed)
        #: whether the model's forward pass depends on random numbers (said in a warning)
        self.draws = False
        #: which part of the model's outputs is the prediction (:func:`normprobe.batch.prediction`)
        self.output = output
        #: which parameters the default selection takes (:func:`select_parameters`)
        self.roles = {"embeddings": embeddings, "norms": norms, "frozen": frozen}
        self._compute_dtype = product_dtype
        try:
            self._set_up(model, loss_fn, data, params, norm_mode, chunk_size, weight_scaled)
        except Exception as err:
            if self.shards is None:
                raise
            self._agree(err)  # every rank raises, not only this one: no rank is left waiting
        self.graph_memory = int(graph_memory)
        if self.shards is None:
            self.num_samples = self.local_samples
            self.rank_samples: tuple[int, ...] = (self.local_samples,)
            self._num_chunks = self.local_chunks
        else:
            self._agree(None)
        #: chunk weights ``n_c / n`` with ``n`` over every rank: summing the ranks' products gives ``H``
        self.chunk_weights = [batch_size(x) / self.num_samples for x, _ in self.chunks]
        self.matvecs = 0
        #: K, the number of classes: ``num_classes``, else read from the first pass's prediction
        #: when its classes axis is certain (:meth:`_classes`); None otherwise
        self.num_outputs: int | None = num_classes
        #: why K could not be read from the outputs (None when it was, or was given)
        self.classes_problem: str | None = None
        self.graph_bytes = 0
        self._graphs: list[_Graph | None] | None = None
        self._gradient: torch.Tensor | None = None
        self._loss: float | None = None
        self._versions: tuple[int, ...] | None = None
        self._leaves: list[torch.Tensor] = []
        self._tracked: list[torch.Tensor] = []
        self._params_check = 0
        self._vector_weights: torch.Tensor | None = None
        #: whether :meth:`matmat`'s batched backward worked (None until tried)
        self.batch_works: bool | None = None
        #: train-mode ``F.batch_norm`` through :mod:`normprobe.hessian.batchnorm` (False: torch's)
        self.lean_batch_norm = True

    def _set_up(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Data,
        params: ParamSelection,
        norm_mode: NormMode,
        chunk_size: int,
        weight_scaled: bool,
    ) -> None:
        """Everything the construction checks and computes from this rank's arguments alone."""
        if norm_mode not in NORM_MODES:
            raise HessianError(
                f"norm_mode must be one of {', '.join(NORM_MODES)}, got {norm_mode!r}; 'train' "
                f"uses each chunk's batch statistics, 'eval' the running statistics"
            )
        if not isinstance(model, nn.Module):
            raise HessianError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        # the module inside torch.compile (no double backward) or nn.DataParallel (no
        # functional_call); compiled submodules are refused
        model, params = unwrapped(model, params)
        check_measurable(model, model.modules(), HessianError)
        if norm_mode == "train":
            warn_of_frozen_statistics(model, "norm_mode='train'")
        self.model = model
        #: embeddings built with sparse=True, differentiated in their dense form (no double
        #: backward exists for the sparse one)
        self._sparse = sparse_embeddings(model.modules())
        self._graph_checked = False  # the first graph built is checked for a cut (_build)
        #: whether the model recomputes parts of its forward in the backward pass (activation
        #: checkpointing, non-reentrant): known after the first graph is built
        self.recomputes = False
        self._values: dict[str, torch.Tensor] = {}
        self.loss_fn = loss_fn
        self.norm_mode: NormMode = norm_mode
        self.named = select_parameters(model, params, **self.roles)
        #: parameters the default selection left out, with the reason ({} when params= names them)
        self.excluded = excluded_parameters(model, **self.roles) if params is None else {}
        self.names = [n for n, _ in self.named]
        self.shapes = [p.shape for _, p in self.named]
        self.numels = [p.numel() for _, p in self.named]
        self.dim = int(sum(self.numels))
        first = self.named[0][1]
        #: the model's own dtype, and ``dtype``, the one the products run in
        self.device, self.model_dtype = first.device, first.dtype
        if not self.model_dtype.is_floating_point:
            raise HessianError(f"parameters must be floating point, got {self.model_dtype}")
        self.dtype = products_dtype(self.model_dtype, self._compute_dtype)
        chunks = split_chunks(data, chunk_size, allow_empty=self.shards is not None)
        self.chunks = [self._to_model(x, y) for x, y in chunks]
        for x, _ in self.chunks[:1]:
            check_call(model, x, HessianError)
        #: this rank's sample count (all of them in one process)
        self.local_samples = int(sum(batch_size(x) for x, _ in self.chunks))
        self.chunk_size = chunk_size
        self.weight_scaled = weight_scaled
        self.scales = self._weight_scales() if weight_scaled else None
        self._weight_norm = _uses_weight_norm(model)

    def _agree(self, failure: Exception | None) -> None:
        """The ranks compare their setup in one all-reduce; all raise together, or none does.

        Each rank contributes: whether its arguments were refused, its sample
        and chunk counts, the Hessian's dimension, and checksums of the
        model's parameters and buffers. Sets the totals over the ranks.
        """
        assert self.shards is not None
        ok = failure is None
        row = [
            int(not ok),
            self.local_samples if ok else 0,
            self.local_chunks if ok else 0,
            self.dim if ok else 0,
            bits_checksum(list(self.model.parameters())) if ok else 0,
            bits_checksum(list(self.model.buffers())) if ok else 0,
        ]
        table = self.shards.gather_ints(row, getattr(self, "device", None))
        raise_failures([t[0] for t in table], failure, "could not set up the Hessian (the reason")
        samples, chunks, dims, params, buffers = (list(col) for col in list(zip(*table))[1:])
        if len(set(dims)) > 1:
            raise HessianError(
                f"the ranks take the Hessian over different numbers of parameters ({dims} by "
                f"rank); every rank must pass the same model and params=..."
            )
        if len(set(params)) > 1:
            odd = [r for r, c in enumerate(params) if c != params[0]]
            raise HessianError(
                f"the model's parameters on rank(s) {', '.join(map(str, odd))} differ from rank "
                f"0's; the ranks share one model (broadcast the parameters from rank 0, as "
                f"DistributedDataParallel does when it wraps the model)"
            )
        if len(set(buffers)) > 1 and self.norm_mode == "eval":
            warnings.warn(
                "the model's buffers (running statistics) differ between the ranks, so with "
                "norm_mode='eval' each rank's shard uses its own; for one set, broadcast them "
                "from rank 0 first (for b in model.buffers(): torch.distributed.broadcast(b, 0))",
                stacklevel=3,
            )
        self.num_samples = int(sum(samples))
        self.rank_samples = tuple(samples)
        self._num_chunks = int(sum(chunks))
        if self.num_samples == 0:
            raise HessianError("no rank has any sample; pass each rank its shard of the probe set")

    # -- public ----------------------------------------------------------------------------

    @property
    def num_chunks(self) -> int:
        """The number of chunks, over every rank."""
        return self._num_chunks

    @property
    def local_chunks(self) -> int:
        """This rank's number of chunks (all of them in one process)."""
        return len(self.chunks)

    @property
    def world_size(self) -> int:
        """How many ranks share the probe set (1 in one process)."""
        return 1 if self.shards is None else self.shards.size

    @property
    def cached_chunks(self) -> int:
        """How many chunks keep their gradient graph between products (the rest recompute)."""
        return 0 if self._graphs is None else sum(g is not None for g in self._graphs)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` of length :attr:`dim`, in ``v``'s dtype and device."""
        if not isinstance(v, torch.Tensor) or v.shape != (self.dim,):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise HessianError(f"matvec needs a vector of shape ({self.dim},), got {shape}")
        failure = None
        try:
            total, checks = self._local_matvec(v)
        except Exception as err:
            if self.shards is None:
                raise
            # the other ranks wait in the all-reduce: join it, and all raise together
            total, checks, failure = self._zeros(), [0, 0], err
        if self.shards is not None:  # sum_c (n_c / n) H_c v over every rank's chunks
            total, _ = self.shards.reduce_with_checks(
                total, checks, ("vectors", "parameters"), failure=failure
            )
        if self.scales is not None:
            total *= self.scales
        self._check_finite(total)
        self.matvecs += 1
        self._versions = self._state_versions()
        return total.to(dtype=v.dtype, device=v.device)

    __call__ = matvec

    def _check_finite(self, total: torch.Tensor) -> None:
        if not all_finite(total):
            raise NonFiniteProductError(
                f"a Hessian-vector product is not finite (model dtype "
                f"{str(self.model_dtype).replace('torch.', '')}, products in "
                f"{str(self.dtype).replace('torch.', '')}); the loss or its curvature overflows "
                f"at these parameters: check that the loss is finite, or pass dtype=torch.float64"
            )

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        """``H v`` for each row of a ``(b, dim)`` block, in one batched backward pass.

        ``torch.autograd.grad(..., is_grads_batched=True)`` through the
        cached graphs: the same graphs and, row by row, the same products as
        :meth:`matvec` to rounding (bit for bit on the BatchNorm MLPs
        measured, float32 and float64; 5e-16 relative on a tanh MLP in
        float64). Per vector, at b = 4 on a CPU: 0.67-0.76 of a product's
        time on a 4.6k-parameter MLP, 0.88-1.08 on a 126k one, 1.0-1.1 on
        WRN-16-1. Under
        ``torch.distributed`` the rows go through :meth:`matvec` one by one
        (each product is one all-reduce). A model whose double backward has
        no batching rule (torch raises) gets the rows through :meth:`matvec`,
        and :attr:`batch_works` turns False. Counts ``b`` products.
        """
        if not isinstance(vs, torch.Tensor) or vs.dim() != 2 or vs.shape[1] != self.dim:
            shape = tuple(vs.shape) if isinstance(vs, torch.Tensor) else type(vs).__name__
            raise HessianError(f"matmat needs a block of shape (b, {self.dim}), got {shape}")
        if self.shards is not None or len(vs) == 1 or self.batch_works is False:
            return torch.stack([self.matvec(v) for v in vs])
        try:
            total = self._local_matmat(vs)
        except RuntimeError:
            # an op of the model without a batching rule for its double backward (seen:
            # aten::is_nonzero in a LayerNorm): the same products one at a time, from now on
            self.batch_works = False
            return torch.stack([self.matvec(v) for v in vs])
        self.batch_works = True
        if self.scales is not None:
            total *= self.scales
        self._check_finite(total)
        self.matvecs += len(vs)
        self._versions = self._state_versions()
        return total.to(dtype=vs.dtype, device=vs.device)

    def _local_matmat(self, vs: torch.Tensor) -> torch.Tensor:
        """``sum_c (n_c / n) H_c (D v)`` for each row, one batched backward pass per graph set."""
        self._ensure_graphs()
        b = len(vs)
        u = vs.to(device=self.device, dtype=self.dtype)
        if self.scales is not None:
            u = u * self.scales
        parts = [t.reshape(b, *s) for t, s in zip(torch.split(u, self.numels, dim=1), self.shapes)]
        graphs = self._graphs or []
        total = self._second_backward(
            [g for g in graphs if g is not None], parts, keep=True, batch=b
        )
        for index, (chunk, weight, graph) in enumerate(
            zip(self.chunks, self.chunk_weights, graphs)
        ):
            if graph is None:
                with self._guard():
                    graph = self._build(index, chunk, weight, measure=False)
                total += self._second_backward([graph], parts, keep=False, batch=b)
                del graph
        return total

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def gradient(self) -> torch.Tensor:
        """The gradient of the mean loss (flat, model dtype), a by-product of the first product."""
        return self._first_order()[0]

    def loss(self) -> float:
        """The mean loss over the probe set."""
        return self._first_order()[1]

    def as_linear_operator(self, dtype: Any = np.float64) -> scipy.sparse.linalg.LinearOperator:
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` (symmetric: rmatvec = matvec).

        Wrap scipy solvers in :func:`normprobe.hessian.blas_threads` so that
        scipy's BLAS threads do not compete with torch's.
        """
        np_dtype = np.dtype(dtype)

        def mv(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.ascontiguousarray(x, dtype=np_dtype).reshape(-1))
            return self.matvec(v).numpy()

        return scipy.sparse.linalg.LinearOperator(
            (self.dim, self.dim), matvec=mv, rmatvec=mv, dtype=np_dtype
        )

    def release(self) -> None:
        """Free the cached graphs (they are rebuilt on the next product)."""
        self._vector_weights = None
        self._graphs = None
        self._gradient = None
        self._leaves = []
        self.graph_bytes = 0

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        ranks = "" if self.shards is None else f", ranks={self.shards.size}"
        return (
            f"HessianOperator(dim={self.dim}, samples={self.num_samples}, "
            f"chunks={self.num_chunks}{ranks}, norm_mode={self.norm_mode!r}, dtype={self.dtype})"
        )

    # -- internals -------------------------------------------------------------------------

    def _local_matvec(self, v: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """This rank's ``sum_c (n_c / n) H_c (D v)``, and the checksums the ranks compare."""
        self._ensure_graphs()
        u = v.to(device=self.device, dtype=self.dtype)
        checks = []
        if self.shards is not None:
            if self._vector_weights is None:  # 16 bytes per parameter, kept: hashing is slower
                self._vector_weights = position_weights(self.dim, device=self.device)
            vector = bits_checksum([u], mantissa_bits(self.dtype), weights=self._vector_weights)
            checks = [vector, self._params_check]
        if self.scales is not None:
            u = u * self.scales
        parts = [t.view(s) for t, s in zip(torch.split(u, self.numels), self.shapes)]
        graphs = self._graphs or []
        # one backward pass through all cached graphs (they share the leaves): sum_c H_c v
        total = self._second_backward([g for g in graphs if g is not None], parts, keep=True)
        for index, (chunk, weight, graph) in enumerate(
            zip(self.chunks, self.chunk_weights, graphs)
        ):
            if graph is None:
                with self._guard():
                    graph = self._build(index, chunk, weight, measure=False)
                total += self._second_backward([graph], parts, keep=False)
                del graph
        return total, checks

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(self.dim, dtype=self.dtype, device=self.device)

    def _first_order(self) -> tuple[torch.Tensor, float]:
        """The gradient and the loss, summed over the ranks (one all-reduce, in float64)."""
        failure = None
        try:
            self._ensure_graphs()
            gradient = self._gradient.clone()  # type: ignore[union-attr]
            loss = float(self._loss)  # type: ignore[arg-type]
        except Exception as err:
            if self.shards is None:
                raise
            gradient, loss, failure = self._zeros(), 0.0, err  # join the all-reduce, then raise
        if self.shards is None:
            return gradient, loss
        packed = torch.cat([gradient.double(), gradient.new_tensor([loss], dtype=torch.float64)])
        # a rank without data learns the output width from the others
        packed, rows = self.shards.reduce_with_checks(
            packed,
            [self._params_check],
            ("parameters",),
            extra=[self.num_outputs or 0],
            failure=failure,
        )
        if self.num_outputs is None and max(r[0] for r in rows) > 0:
            self.num_outputs = int(max(r[0] for r in rows))
        return packed[:-1].to(self.dtype), float(packed[-1])

    def _to_model(self, x: Inputs, y: Targets) -> Batch:
        targets = None if y is None else to_device(y, self.device)
        return to_device(x, self.device, self.dtype), targets

    def _weight_scales(self) -> torch.Tensor:
        scales = []
        for (_, p), n in zip(self.named, self.numels):
            s = float(torch.linalg.vector_norm(p.detach())) if p.dim() >= 2 else 1.0
            scales.append(torch.full((n,), s, dtype=self.dtype, device=self.device))
        return torch.cat(scales)

    def _state_versions(self) -> tuple[int, ...]:
        """Version counters of the model's parameters and buffers: any in-place change moves them.

        The tensors are listed once per build (walking the modules on every
        product costs as much as a small model's HVP); a parameter replaced
        by a new tensor object is not seen: build a new operator then.
        """
        return tuple(t._version for t in self._tracked)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        with ExitStack() as stack:
            stack.enter_context(preserved(self.model))
            stack.enter_context(attributes_kept(self.model))
            self._norm_mode(stack)
            yield

    def _norm_mode(self, stack: ExitStack) -> None:
        """The model as its passes run: ``norm_mode``'s train/eval flags and, in train mode,
        dropout off and running statistics frozen (flags are put back by the caller)."""
        if self.norm_mode == "train":
            self.model.train()
            # a random operator would make Lanczos meaningless; attention dropout included
            stack.enter_context(dropout_off(self.model))
            stack.enter_context(frozen_statistics(self.model))
        else:
            self.model.eval()

    def _ensure_graphs(self) -> None:
        if self._graphs is not None and self._versions == self._state_versions():
            return
        # first use, or the parameters/buffers changed since the graphs were built
        self._tracked = list(self.model.parameters()) + list(self.model.buffers())
        if self.shards is not None:
            self._params_check = bits_checksum(
                list(self.model.parameters()), mantissa_bits(self.model_dtype)
            )
        if self.weight_scaled:
            self.scales = self._weight_scales()
        graphs: list[_Graph | None] = []
        gradient = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        loss, used = 0.0, 0
        # the leaves of every chunk's graph: detached views of the selected parameters
        self._leaves = [self._cast(p).requires_grad_(True) for _, p in self.named]
        with self._guard():
            for index, (chunk, weight) in enumerate(zip(self.chunks, self.chunk_weights)):
                graph = self._build(index, chunk, weight, measure=True)
                gradient += torch.cat([g.detach().reshape(-1) for g in graph.grads])
                loss += graph.loss
                if used + graph.nbytes <= self.graph_memory:
                    used += graph.nbytes
                    graphs.append(graph)
                else:
                    graphs.append(None)
                del graph
        self._graphs, self._gradient, self._loss = graphs, gradient, loss
        self.graph_bytes = used
        self._versions = self._state_versions()
        if self.draws:
            warn_of_random_draws(
                self.model,
                "the Hessian is that of the network with one draw per chunk",
                "(seeded by the seed and the chunk: the same numbers for every product, so "
                "one symmetric matrix), not of the network without that noise",
                "to measure the network without it, give the model nn.Dropout modules or a "
                "rate attribute whose name says dropout (switched off for the products)"
                + (", or use norm_mode='eval'" if self.norm_mode == "train" else ""),
            )

    def _build(self, index: int, chunk: Batch, weight: float, *, measure: bool) -> _Graph:
        """Forward and first backward (``create_graph=True``) of chunk ``index``'s weighted loss.

        Whatever random numbers the forward pass draws (dropout modules are off; a
        functional dropout at a fixed rate is not) come from torch's generators seeded by
        :attr:`seed`, this rank and ``index``: a graph rebuilt for a later product draws the
        same numbers, so every product applies one matrix, and the caller's random stream
        is left alone.
        """
        x, y = chunk
        selected = set(self.names)
        leaves = self._leaves
        values: dict[str, torch.Tensor] = dict(zip(self.names, leaves))
        for n, p in self.model.named_parameters():
            if n not in selected:
                values[n] = self._cast(p)
        for n, b in self.model.named_buffers():
            # a forward that updates buffers in place writes to the clone
            values[n] = self._cast(b) if self.dtype != self.model_dtype else b.clone()
        seen: dict[int, int] = {}
        exclude = {p.untyped_storage().data_ptr() for p in self.model.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if measure:
                try:
                    storage = t.untyped_storage()
                    ptr = storage.data_ptr()
                    if ptr not in exclude:
                        seen[ptr] = storage.nbytes()
                except (RuntimeError, NotImplementedError):  # tensors without storage
                    pass
            return t.detach()  # no reference cycle through the saved tensor (torch docs)

        rank = 0 if self.shards is None else self.shards.rank
        with ExitStack() as stack:
            stack.enter_context(
                forked_random_state(self.device, _chunk_seed(self.seed, rank, index))
            )
            states = generator_states(self.device)
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            stack.enter_context(self._forward_ops())
            args, kwargs = call_args(x)
            called: list[ModuleCall] = []  # the forward's (first build)
            with ExitStack() as calls:
                if not self._graph_checked:
                    calls.enter_context(_module_calls(called, self.device))
                out = functional_call(self.model, values, args, kwargs, strict=False)
            if measure and not self.draws and states != generator_states(self.device):
                # the forward drew random numbers: said where they decide its output, asked
                # on copies of the buffers (a forward that writes to one in place must not
                # change what this graph saved)
                again = {**values, **{n: values[n].clone() for n, _ in self.model.named_buffers()}}
                self.draws = draws_matter(
                    lambda: functional_call(self.model, again, args, kwargs, strict=False),
                    fingerprint(out),
                    self.device,
                    _chunk_seed(self.seed + 1, rank, index),
                )
            loss = compute_loss(self.loss_fn, out, y, self.output, HessianError)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss)
                raise HessianError(
                    f"loss_fn must return the mean loss over the chunk (a scalar), got {shape}; "
                    f"use a mean reduction (e.g. torch.nn.functional.cross_entropy)"
                )
            if not loss.requires_grad:
                raise HessianError(
                    "the loss does not depend on the selected parameters; check params=..."
                )
            # a module called during the backward pass is a forward recomputed there
            # (torch.utils.checkpoint): the products' backward passes must then run it as here
            recomputed: list[ModuleCall] = []
            if not self._graph_checked:
                stack.enter_context(_module_calls(recomputed, self.device))
            stack.enter_context(differentiated(HessianError))
            grads = torch.autograd.grad(
                loss.reshape(()) * weight,
                leaves,
                create_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
        if not self._graph_checked:  # one model, one graph structure: the first chunk says
            problem = _cut_second_derivative(loss, grads)
            if problem:
                raise HessianError(problem)
            # after the gradient: a reentrant checkpoint's own error first
            self._refuse_no_grad_parameters([(m, held) for m, on, held, _ in called if not on])
            self._warn_of_autocast(called)
            self._graph_checked = True
            self.recomputes = bool(recomputed)
        if self.recomputes:
            self._values = values
        if self.num_outputs is None and self.classes_problem is None:
            self._classes(out)
        return _Graph(grads=grads, loss=float(loss.detach()) * weight, nbytes=sum(seen.values()))

    @contextmanager
    def _forward_ops(self) -> Iterator[None]:
        """The ops the Hessian's forward pass runs, also around every backward through its
        graph: a model under ``torch.utils.checkpoint`` recomputes its forward there, and the
        recomputation must run the ops the forward ran (else torch refuses it, or rebuilds
        other saved tensors)."""
        with ExitStack() as stack:
            if self._weight_norm:
                stack.enter_context(_PlainWeightNorm())
            if self.lean_batch_norm:
                # train-mode batch norm with a hand-written second derivative (large inputs):
                # the same loss and gradient bits, products equal to rounding, a WRN-16-1
                # product 0.77x the time
                stack.enter_context(LeanBatchNorm())
            # attention through F.scaled_dot_product_attention (nn.MultiheadAttention, Hugging
            # Face's "sdpa") takes the math kernel, whose double backward exists; the fused CPU
            # and GPU kernels have none
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            # in the model's own dtype (product_dtype), also inside a loop's autocast region
            stack.enter_context(full_precision(self.device))
            stack.enter_context(autograd_available())  # also inside torch.inference_mode()
            if self._sparse:
                stack.enter_context(dense_gradients(self._sparse))
            yield

    def _warn_of_autocast(self, calls: list[ModuleCall]) -> None:
        """Say so where the model's forward turns ``torch.autocast`` on itself: the products
        are then computed in the lower precision inside it (the enclosing region, a
        training loop's, is switched off for the products, but not one the forward enters)."""
        cast = [(m, dtype) for m, _, _, dtype in calls if dtype is not None]
        if not cast or not first_said(self.model, "autocast"):  # once per model
            return
        names = {id(m): n for n, m in self.model.named_modules()}
        shown = list(
            dict.fromkeys(names.get(id(m), type(m).__name__) or "the model" for m, _ in cast)
        )
        dtype = str(cast[0][1]).removeprefix("torch.")
        eps = torch.finfo(cast[0][1]).eps
        warnings.warn(
            f"the model's forward pass turns torch.autocast on itself ({dtype}, running "
            f"{listed(shown, 4)}), so the Hessian-vector products are computed in "
            f"{dtype} there and carry its rounding (about {eps:.1g} relative): eigenvalues and "
            f"the density are only that accurate, and the top eigenvalues may miss their "
            f"residual tolerance. For products in the model's own dtype ({self.model_dtype}), "
            f"let the forward skip autocast while the Hessian is measured (a flag of the model)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )

    def _refuse_no_grad_parameters(self, calls: list[tuple[nn.Module, list[int]]]) -> None:
        """Refuse selected parameters of modules the forward ran with autograd off: the loss
        has no gradient path to them, so the products would take them as constants."""
        if not calls:
            return
        leaves = {id(t) for t in self._leaves}
        names = {id(m): n for n, m in self.model.named_modules()}
        off = list(
            dict.fromkeys(
                names.get(id(m), type(m).__name__)
                for m, held in calls
                if any(i in leaves for i in held)
            )
        )
        if off:
            shown = listed(off, 6)
            raise HessianError(
                f"the model runs {shown} with autograd off (inside torch.no_grad(), or a "
                f"reentrant torch.utils.checkpoint whose inputs need no gradient), so the loss "
                f"has no gradient path to their parameters and the Hessian would take them as "
                f"constants; run them with autograd on (checkpoint with use_reentrant=False), "
                f"or leave their parameters out with params=..."
            )

    @contextmanager
    def _as_built(self) -> Iterator[None]:
        """For a model that recomputes parts of its forward pass in the backward pass
        (``torch.utils.checkpoint``): the model as the graphs were built (mode, dropout off,
        frozen statistics, the graphs' parameter and buffer values, the same ops), so the
        recomputation reproduces the forward; torch checks that it saves tensors of the
        same shapes. Nothing for any other model."""
        if not self.recomputes:
            yield
            return
        # no snapshot of buffers and grads (a copy of every grad per product): the statistics
        # are frozen, the buffers the recomputation sees are the graphs' copies, and autograd.grad
        # leaves .grad alone; the flags and plain attributes are put back
        flags = [(m, m.training) for m in self.model.modules()]
        with ExitStack() as stack:
            stack.callback(_put_back_flags, flags)
            stack.enter_context(attributes_kept(self.model))
            self._norm_mode(stack)
            stack.enter_context(self._forward_ops())
            stack.enter_context(
                torch.nn.utils.stateless._reparametrize_module(
                    self.model, self._values, tie_weights=True, strict=False
                )
            )
            yield

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        """A detached copy of a parameter or buffer in the products' dtype (floating ones only)."""
        t = t.detach()
        return t.to(self.dtype) if t.is_floating_point() and t.dtype != self.dtype else t

    def _classes(self, out: Any) -> None:
        """K from an explicit classes axis of the prediction, never a guess (sets classes_problem).

        ``(N, K)``: axis 1. More axes: the last one when the model says its
        scores are classes-last (``classes_last = True``, as language models'
        ``(N, T, K)``); otherwise axis 1 could be the sequence and the last a
        feature, so K is not read and :attr:`classes_problem` says how to give it.
        """
        try:
            pred = prediction(out, self.output, HessianError)
        except HessianError:
            if self.loss_fn is not None:
                raise
            pred = None  # the model's own loss: the prediction is not needed for the loss
        if pred is None or pred.dim() < 2:
            self.classes_problem = (
                "the model's prediction has no classes axis (shape "
                f"{None if pred is None else tuple(pred.shape)}); pass num_classes= for the "
                f"outlier ratio"
            )
        elif pred.dim() == 2 and pred.shape[1] == 1:
            self.classes_problem = (
                f"the model's prediction has one output per example (shape {tuple(pred.shape)}): "
                f"a regression or a single logit, whose lambda_1 / lambda_1 would say nothing; "
                f"pass num_classes= for the outlier ratio (2 for a binary classifier)"
            )
        elif pred.dim() == 2:
            self.num_outputs = int(pred.shape[1])
        elif getattr(self.model, "classes_last", False) is True:
            self.num_outputs = int(pred.shape[-1])
        else:
            self.classes_problem = (
                f"the model's prediction has shape {tuple(pred.shape)}, and which axis holds the "
                f"classes is not declared (axis 1 may be a sequence, as in a language model's "
                f"(N, T, V)); pass num_classes=, or set classes_last = True on the model when the "
                f"last axis holds the classes"
            )

    def _second_backward(
        self,
        graphs: Sequence[_Graph],
        parts: Sequence[torch.Tensor],
        *,
        keep: bool,
        batch: int | None = None,
    ) -> torch.Tensor:
        """``sum over graphs of d<g_c, v>/dw``: one autograd call through all of them.

        With ``batch``, ``parts`` carry a leading axis of ``batch`` vectors
        (``is_grads_batched``) and the result is ``(batch, dim)``.
        """
        outputs, grad_outputs = [], []
        for graph in graphs:
            for g, part in zip(graph.grads, parts):
                if g.requires_grad:  # a gradient that is constant in w contributes nothing
                    outputs.append(g)
                    grad_outputs.append(part)
        if not outputs:
            shape = (self.dim,) if batch is None else (batch, self.dim)
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        # (_as_built: a checkpointed model recomputes its forward in here; full_precision: the
        # backward runs under the caller's autocast state, a loop's region included, and
        # would cast the products' matrix multiplications)
        with self._as_built(), _second_derivative(), full_precision(self.device):
            hv = torch.autograd.grad(
                outputs,
                self._leaves,
                grad_outputs,
                retain_graph=keep,
                allow_unused=True,
                materialize_grads=batch is None,
                is_grads_batched=batch is not None,
            )
        if batch is None:
            return torch.cat([h.reshape(-1) for h in hv])
        return torch.cat(
            [
                h.reshape(batch, -1)
                if h is not None
                else torch.zeros(batch, n, dtype=self.dtype, device=self.device)
                for h, n in zip(hv, self.numels)
            ],
            dim=1,
        )
