"""The batch contract shared by every probe and the Hessian.

(Over 500 lines, one job: the contract's every operation, slicing, chunking,
device moves, noise pairing, calling the model and reading its prediction,
lives here so that the probes and the Hessian cannot disagree on it.)

A **batch** is ``(inputs, targets)``:

- ``inputs`` is a tensor (``model(x)``), a tuple of tensors passed
  positionally (``model(ids, mask)``), or a mapping passed as keyword
  arguments (``model(**{"input_ids": ids, "attention_mask": mask})``, what a
  Hugging Face tokenizer returns). Every tensor has the examples on axis 0;
  a mapping may also carry plain values (``use_cache=False``), passed as
  given. Representation probes take ``inputs`` alone.
- ``targets`` is a tensor with the examples on axis 0, or ``None`` (the
  loss function gets ``None``; or the model computes its own loss).

The **loss** is ``loss_fn(prediction(outputs), targets)``. The
**prediction** is read from the model's outputs by one rule:

1. a tensor is the prediction;
2. an object with a ``logits`` attribute (Hugging Face ``ModelOutput``) or
   a mapping with a ``"logits"`` key gives its logits;
3. a tuple or list gives its first element.

Anything else, or a different choice, is said with ``output=``: an
attribute or key name (``"last_hidden_state"``), a position (``1``) or a
function of the outputs. ``loss_fn=None`` takes the model's own loss
(``outputs.loss`` or ``outputs["loss"]``, e.g. a Hugging Face model given
``labels`` among the inputs).

Slicing, chunking and device moves act on every tensor of a batch alike
(floating-point inputs take the model's dtype, integer ones such as token
ids keep theirs). Nothing is dropped silently: inputs the model's
``forward`` cannot take raise an error that says what to pass.

>>> import torch
>>> from torch import nn
>>> net = nn.Linear(3, 2)
>>> inputs, targets = split_batch((torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
>>> prediction(call_model(net, inputs)).shape
torch.Size([4, 2])
>>> [batch_size(c[0]) for c in chunk_batch(inputs, targets, 2)]
[2, 2]

This module knows nothing of normprobe's normalizers or models; it also
holds the small guards that leave a model's plain attributes as found.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import operator
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from normprobe.errors import NormprobeError, listed, user_stacklevel

__all__ = [
    "BatchError",
    "Inputs",
    "Targets",
    "OutputPick",
    "check_inputs",
    "check_values",
    "split_batch",
    "is_batch",
    "input_tensors",
    "batch_size",
    "take",
    "concat",
    "chunk_batch",
    "to_device",
    "map_floating",
    "flat_inputs",
    "inputs_equal",
    "layout",
    "same_layout",
    "call_model",
    "call_args",
    "differentiated",
    "full_precision",
    "autocast_on",
    "check_call",
    "prediction",
    "compute_loss",
    "model_device",
    "model_dtype",
    "check_measurable",
    "lazy_unmade",
    "attributes_kept",
    "dropout_off",
    "forked_random_state",
    "generator_states",
    "fingerprint",
    "draws_matter",
    "first_said",
    "warn_of_random_draws",
    "dense_gradients",
    "sparse_embeddings",
]


class BatchError(NormprobeError, ValueError):
    """A batch, its inputs or the model's outputs do not follow the batch contract."""


#: a tensor, a tuple of tensors (positional; an item may be a mapping of tensors, one
#: argument) or a mapping (keyword arguments)
Inputs = torch.Tensor | tuple[torch.Tensor | Mapping[str, Any], ...] | Mapping[str, Any]
Targets = torch.Tensor | None
#: which part of the outputs is the prediction: a key/attribute name, a position or a function
OutputPick = str | int | Callable[[Any], torch.Tensor] | None
ErrorType = type[Exception]

_CONTRACT = (
    "a batch is (inputs, targets) with inputs a tensor, a tuple of tensors (positional "
    "arguments; an item may be a dict of tensors, given as one argument) or a dict of tensors "
    "(keyword arguments), and targets a tensor or None"
)


# --------------------------------------------------------------------------- inputs


def check_inputs(
    inputs: Any, what: str = "inputs", error: ErrorType = BatchError, *, values: bool = True
) -> Inputs:
    """``inputs`` validated against the contract (a list becomes a tuple); a clear error otherwise.

    >>> check_inputs([torch.zeros(2, 3), torch.ones(2, 3)])[1].shape
    torch.Size([2, 3])
    """
    if isinstance(inputs, torch.Tensor):
        return check_values(inputs, what, error) if values else inputs
    if isinstance(inputs, (tuple, list)):
        if inputs and all(_positional(t) for t in inputs):
            items = tuple(dict(t) if isinstance(t, Mapping) else t for t in inputs)
            return check_values(items, what, error) if values else items
        kinds = ", ".join(type(t).__name__ for t in inputs) or "nothing"
        raise error(
            f"{what} is a {type(inputs).__name__} of {kinds}; a tuple of inputs must hold tensors "
            f"(or dicts of tensors, for a forward that takes a dict as one argument), passed "
            f"positionally to the model; {_CONTRACT}"
        )
    if isinstance(inputs, Mapping):
        if not any(isinstance(v, torch.Tensor) for v in inputs.values()):
            raise error(f"{what} is a mapping without any tensor ({list(inputs)!r}); {_CONTRACT}")
        if not all(isinstance(k, str) for k in inputs):
            raise error(
                f"{what}: a mapping of inputs needs string keyword names, got {list(inputs)!r}"
            )
        return check_values(dict(inputs), what, error) if values else dict(inputs)
    raise error(
        f"{what} must be a tensor, a tuple or a dict of tensors, got {type(inputs).__name__}"
    )


def _positional(item: Any) -> bool:
    """Whether ``item`` can be one positional input: a tensor, or a dict with string keys
    holding at least one tensor (a ``forward(self, batch)`` that reads ``batch["x"]``)."""
    if isinstance(item, torch.Tensor):
        return True
    return (
        isinstance(item, Mapping)
        and all(isinstance(k, str) for k in item)
        and any(isinstance(v, torch.Tensor) for v in item.values())
    )


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite, at the cost of one sum.

    A NaN or an infinity makes the sum non-finite, so a finite sum settles it;
    a non-finite sum of finite entries (an overflow) is told apart by the
    exact elementwise test, which runs only then. ``isfinite(t).all()``
    alone costs ten times the sum (a boolean tensor per call), once per
    Hessian-vector product and per probe input.

    >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("nan")]))
    (True, False)
    >>> all_finite(torch.tensor([3e38, 3e38]))  # the sum overflows, the entries do not
    True
    """
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def check_values(inputs: Inputs, what: str = "inputs", error: ErrorType = BatchError) -> Inputs:
    """``inputs`` unchanged, after refusing an empty batch and NaN or infinite values.

    A probe of no examples or of non-finite inputs has no meaningful answer
    (it would be NaN), so either is an error rather than a NaN result.

    >>> check_values(torch.tensor([[0.0, float("nan")]]))
    Traceback (most recent call last):
    ...
    normprobe.batch.BatchError: inputs: x holds NaN or infinite values; pass finite inputs
    """
    for label, t in input_tensors(inputs):
        if t.dim() > 0 and t.shape[0] == 0:
            raise error(
                f"{what}: {label} has no examples (shape {tuple(t.shape)}); pass at least one"
            )
        if t.is_floating_point() and t.numel() and not all_finite(t):
            raise error(f"{what}: {label} holds NaN or infinite values; pass finite inputs")
    return inputs


def is_batch(obj: Any) -> bool:
    """Whether ``obj`` is one ``(inputs, targets)`` batch (or a ``Split`` with ``x`` and ``y``)."""
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        first, second = obj
        if not (second is None or isinstance(second, torch.Tensor)):
            return False
        try:
            check_inputs(first, values=False)  # its kind, not its values: that is split_batch's
        except BatchError:
            return False
        return True
    return isinstance(getattr(obj, "x", None), torch.Tensor) and isinstance(
        getattr(obj, "y", None), torch.Tensor
    )


def split_batch(
    batch: Any, what: str = "batch", error: ErrorType = BatchError, *, values: bool = True
) -> tuple[Inputs, Targets]:
    """``(inputs, targets)`` of a batch, checked: every tensor has the same number of examples.

    With ``values`` (the default) an empty batch or NaN/infinite inputs are refused too
    (:func:`check_values`); the Hessian passes ``values=False`` because a rank's shard may
    be empty and it names empty data itself.

    >>> inputs, targets = split_batch(({"ids": torch.zeros(2, 5, dtype=torch.long)}, None))
    >>> list(inputs), targets
    (['ids'], None)
    """
    if isinstance(getattr(batch, "x", None), torch.Tensor) and hasattr(batch, "y"):
        inputs, targets = batch.x, batch.y
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
    else:
        got = type(batch).__name__
        if isinstance(batch, (tuple, list)):
            got += f" of length {len(batch)}"
        hint = ""  # one fixed batch is measured every time, never a fresh draw from a loader
        if isinstance(batch, torch.utils.data.DataLoader):
            hint = "; take one batch of it: next(iter(loader))"
        elif isinstance(batch, torch.utils.data.Dataset):
            hint = (
                "; take one batch of it: "
                "torch.utils.data.default_collate([dataset[i] for i in range(256)])"
            )
        raise error(
            f"{what} must be an (inputs, targets) pair, got {got}{hint}; {_CONTRACT}. Several "
            f"inputs go in one tuple or dict: ((ids, mask), targets) or "
            f"({{'input_ids': ids, ...}}, targets)"
        )
    inputs = check_inputs(inputs, f"{what}'s inputs", error, values=values)
    if targets is not None and not isinstance(targets, torch.Tensor):
        raise error(f"{what}'s targets must be a tensor or None, got {type(targets).__name__}")
    batch_size(inputs, targets, what, error)
    return inputs, targets


def input_tensors(inputs: Inputs) -> list[tuple[str, torch.Tensor]]:
    """The tensors of ``inputs`` with a label each (``"x"``, ``"inputs[1]"``, or the keyword)."""
    if isinstance(inputs, torch.Tensor):
        return [("x", inputs)]
    if isinstance(inputs, tuple):
        return [
            pair
            for i, t in enumerate(inputs)
            for pair in (
                [(f"inputs[{i}]", t)]
                if isinstance(t, torch.Tensor)
                else [(f"inputs[{i}].{k}", v) for k, v in _tensors_of(t)]
            )
        ]
    return _tensors_of(inputs)


def _tensors_of(mapping: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in mapping.items() if isinstance(v, torch.Tensor)]


def batch_size(
    inputs: Inputs,
    targets: Targets = None,
    what: str = "batch",
    error: ErrorType = BatchError,
) -> int:
    """The number of examples: axis 0 of every input tensor (and of the targets), which must agree.

    >>> batch_size((torch.zeros(3, 4), torch.zeros(3)))
    3
    """
    sizes = []
    for label, t in input_tensors(inputs):
        if t.dim() == 0:
            raise error(
                f"{what}: input {label} is a scalar; every input needs the examples on axis 0"
            )
        sizes.append((label, t.shape[0]))
    if len({n for _, n in sizes}) > 1:
        listed = ", ".join(f"{label}: {n}" for label, n in sizes)
        raise error(
            f"{what}: the input tensors disagree on the number of examples (axis 0): {listed}; "
            f"every input needs one row per example"
        )
    n = sizes[0][1]
    if isinstance(targets, torch.Tensor) and targets.dim() > 0 and len(targets) != n:
        raise error(
            f"{what}: x has {n} samples but y has shape {tuple(targets.shape)}; pass one target "
            f"per sample"
        )
    return n


def take(inputs: Inputs, index: slice | torch.Tensor) -> Inputs:
    """The examples ``index`` (a slice or index tensor along axis 0) of every input tensor."""

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t[index.to(t.device) if isinstance(index, torch.Tensor) else index]

    return _map(inputs, pick)


def concat(parts: list[Inputs]) -> Inputs:
    """Inputs of the same layout joined along axis 0 (plain dict values taken from the first)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, tuple):
        return tuple(concat(list(items)) for items in zip(*parts))
    return {
        k: torch.cat([p[k] for p in parts]) if isinstance(v, torch.Tensor) else v
        for k, v in first.items()
    }


def chunk_batch(inputs: Inputs, targets: Targets, num: int) -> list[tuple[Inputs, Targets]]:
    """``num`` consecutive chunks of nearly equal size, every tensor cut alike (``tensor_split``)."""
    n = batch_size(inputs, targets)
    bounds = [len(part) for part in torch.tensor_split(torch.arange(n), num)]
    chunks, start = [], 0
    for size in bounds:
        part = slice(start, start + size)
        chunks.append((take(inputs, part), None if targets is None else targets[part]))
        start += size
    return chunks


def _map(inputs: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """``fn`` applied to every tensor of ``inputs`` (in the dicts of a tuple too); the
    structure and the plain values kept."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, tuple):
        return tuple(_map(t, fn) for t in inputs)
    return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def to_device(inputs: Inputs, device: torch.device, dtype: torch.dtype | None = None) -> Inputs:
    """Every input tensor on ``device``; floating-point ones in ``dtype`` (integers keep theirs).

    A tensor made inside ``torch.inference_mode()`` is copied to a normal one, which
    autograd may save for the backward pass (:func:`autograd_available`).
    """

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.is_inference():
            with torch.inference_mode(False):
                t = t.clone()
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            return t.to(device=device, dtype=dtype)
        return t.to(device)

    return _map(inputs, move)


def map_floating(
    inputs: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[Inputs, list[str]]:
    """``fn`` applied to the floating-point input tensors only, and the labels of those it changed.

    Integer inputs (token ids, attention masks as integers) pass unchanged,
    and so does a floating-point mask (a keyword input whose name says mask:
    ``attention_mask``, ``head_mask``): the noise pairing perturbs features,
    never ids or masks.

    >>> x = {"inputs_embeds": torch.zeros(2, 3), "attention_mask": torch.ones(2, 3)}
    >>> out, changed = map_floating(x, lambda t: t + 1)
    >>> changed, float(out["inputs_embeds"][0, 0]), float(out["attention_mask"][0, 0])
    (['inputs_embeds'], 1.0, 1.0)
    """
    changed = [
        label
        for label, t in input_tensors(inputs)
        if t.is_floating_point() and not _is_mask(label.rpartition(".")[2])
    ]

    def apply(key: str | None, t: torch.Tensor) -> torch.Tensor:
        return fn(t) if t.is_floating_point() and not _is_mask(key) else t

    return _map_keyed(inputs, apply), changed


def _is_mask(key: str | None) -> bool:
    """Whether a keyword input's name says it is a mask (``attention_mask``, ``head_mask``)."""
    return key is not None and "mask" in key.lower()


def _map_keyed(inputs: Inputs, fn: Callable[[str | None, torch.Tensor], torch.Tensor]) -> Inputs:
    """:func:`_map` with each tensor's keyword (None for a positional one) given to ``fn``."""
    if isinstance(inputs, torch.Tensor):
        return fn(None, inputs)
    if isinstance(inputs, tuple):
        return tuple(_map_keyed(t, fn) for t in inputs)
    return {k: fn(k, v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def flat_inputs(inputs: Inputs) -> torch.Tensor:
    """Every input tensor flattened per example and concatenated, ``(N, features)`` in float32+."""
    parts = []
    for _, t in input_tensors(inputs):
        t = t.to(torch.promote_types(t.dtype, torch.float32))
        parts.append(t.reshape(t.shape[0], -1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def inputs_equal(a: Inputs, b: Inputs) -> bool:
    """Whether two inputs hold equal tensors (same structure, shapes and values)."""
    ta, tb = input_tensors(a), input_tensors(b)
    if [label for label, _ in ta] != [label for label, _ in tb]:
        return False
    return all(x.shape == y.shape and torch.equal(x, y) for (_, x), (_, y) in zip(ta, tb))


def layout(inputs: Inputs) -> str:
    """The shapes of the inputs, for messages: ``(4, 3)``, or ``input_ids (4, 8), mask (4, 8)``."""
    if isinstance(inputs, torch.Tensor):
        return str(tuple(inputs.shape))
    return ", ".join(f"{label} {tuple(t.shape)}" for label, t in input_tensors(inputs))


def same_layout(a: Inputs, b: Inputs) -> str | None:
    """None if ``a`` and ``b`` have the same inputs with the same shapes, else what differs."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return None if a.shape == b.shape else f"{tuple(b.shape)} for {tuple(a.shape)}"
    ta, tb = input_tensors(a), input_tensors(b)
    if [label for label, _ in ta] != [label for label, _ in tb]:
        return f"inputs {[k for k, _ in ta]} against {[k for k, _ in tb]}"
    for (label, x), (_, y) in zip(ta, tb):
        if x.shape != y.shape:
            return f"{label} of shape {tuple(x.shape)} against {tuple(y.shape)}"
    return None


# --------------------------------------------------------------------------- calling the model


def call_args(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments that pass ``inputs`` to a model."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple):
        return inputs, {}
    return (inputs,), {}


def check_call(model: nn.Module, inputs: Inputs, error: ErrorType = BatchError) -> None:
    """Refuse inputs the model's ``forward`` cannot take (see :func:`call_model`)."""
    _check_signature(model, inputs, error)


#: the signature of each ``forward`` function (bound: without ``self``), read once
_SIGNATURES: dict[Any, inspect.Signature | None] = {}


def _forward_signature(model: nn.Module) -> inspect.Signature | None:
    """The signature of ``model.forward`` (None: a builtin or C forward), cached per function."""
    forward = model.forward
    key = getattr(forward, "__func__", None)  # a method: the same signature on every instance
    if key is not None and key in _SIGNATURES:
        return _SIGNATURES[key]
    try:
        signature: inspect.Signature | None = inspect.signature(forward)
    except (TypeError, ValueError):  # a builtin or C forward: nothing to check
        signature = None
    if key is not None and len(_SIGNATURES) < 1024:
        _SIGNATURES[key] = signature
    return signature


def _check_signature(model: nn.Module, inputs: Inputs, error: ErrorType) -> None:
    """Refuse inputs the model's ``forward`` cannot take, before a silent misuse or a deep TypeError."""
    signature = _forward_signature(model)
    if signature is None:
        return
    try:
        if isinstance(inputs, Mapping):
            signature.bind(**inputs)
        elif isinstance(inputs, tuple):
            signature.bind(*inputs)
        else:
            signature.bind(inputs)
    except TypeError as err:
        kind = (
            f"a dict with keys {list(inputs)}"
            if isinstance(inputs, Mapping)
            else f"a tuple of {len(inputs)} "
            f"{'tensors' if all(isinstance(t, torch.Tensor) for t in inputs) else 'inputs'} "
            f"(passed positionally)"
            if isinstance(inputs, tuple)
            else "one tensor"
        )
        raise error(
            f"{type(model).__name__}.forward{signature} cannot take the inputs, {kind}: {err}. "
            f"Pass exactly what forward takes: one tensor, a tuple of its positional inputs, or a "
            f"dict of keyword inputs (a forward that takes a dict as one argument takes a tuple "
            f"holding it: (batch,)); an (inputs, targets) batch given where inputs alone are "
            f"expected would put the targets into the model"
        ) from None


def call_model(model: nn.Module, inputs: Inputs, error: ErrorType = BatchError) -> Any:
    """``model(x)``, ``model(*inputs)`` or ``model(**inputs)`` by the contract, signature checked."""
    _check_signature(model, inputs, error)
    _check_batch_statistics(model, inputs, error)
    args, kwargs = call_args(inputs)
    try:
        return model(*args, **kwargs)
    except NormprobeError:
        raise
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, IndexError) as err:
        # torch's own message (a shape or dtype mismatch) from deep inside the model: say
        # which argument it concerns; the original stays attached as the cause
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _also(error, err)(
            f"inputs ({layout(inputs)}): the model's forward failed on them: {first}; check "
            "that their shape and dtype are what the model takes"
        ) from err


@contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """An enclosing ``torch.autocast`` on ``device``'s type switched off for the block.

    Measurements take the model in its own dtype: called inside a training
    loop's autocast region, the passes would otherwise run their matrix
    products in float16 or bfloat16 (a Hessian's top eigenvalues then miss
    their residual tolerance, and its density has no such check). Nothing
    changes where autocast is off.
    """
    if not autocast_on(device):
        yield
        return
    with torch.autocast(device.type, enabled=False):
        yield


@contextmanager
def autograd_available() -> Iterator[None]:
    """Autograd on for the block also when it is called inside ``torch.inference_mode()`` (a
    loop's evaluation block), where ``torch.enable_grad()`` records nothing: the gradient
    probes and the Hessian differentiate, and the representation probes share their passes.
    Nothing changes outside inference mode."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False):
        yield


def autocast_on(device: torch.device) -> bool:
    """Whether ``torch.autocast`` is on for ``device``'s type here."""
    try:
        return torch.is_autocast_enabled(device.type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return False


@contextmanager
def differentiated(error: ErrorType = BatchError) -> Iterator[None]:
    """Around a ``torch.autograd.grad`` through the model: torch's refusal of a reentrant
    ``torch.utils.checkpoint`` (it cannot go through ``autograd.grad``) as one ``error``
    naming the fix, torch's message attached as the cause."""
    try:
        yield
    except RuntimeError as err:
        if "use_reentrant=True" not in str(err):
            raise
        raise _also(error, err)(
            "the model runs torch.utils.checkpoint with use_reentrant=True (activation "
            "checkpointing), which torch.autograd.grad cannot go through; checkpoint with "
            "use_reentrant=False (Hugging Face: pass {'use_reentrant': False} as the "
            "checkpointing kwargs of gradient_checkpointing_enable), or turn checkpointing "
            "off while measuring"
        ) from err


def _also(error: ErrorType, err: BaseException) -> ErrorType:
    """``error``, made a subclass of ``err``'s type too, so that code catching torch's own
    exception (``except RuntimeError``) still catches the clearer one."""
    return _combined(error, type(err))


@functools.cache
def _combined(error: ErrorType, kind: type) -> ErrorType:
    try:
        return type(error.__name__, (error, kind), {"__module__": error.__module__})
    except TypeError:  # incompatible exception layouts: the plain error
        return error


def _check_batch_statistics(model: nn.Module, inputs: Inputs, error: ErrorType) -> None:
    """Refuse a batch of one example for a model normalizing with batch statistics in train mode."""
    if batch_size(inputs, None, "inputs", error) != 1:
        return
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise error(
                f"inputs: one example, but {type(module).__name__} at {name or 'the model'!r} "
                "normalizes with batch statistics in train mode (a batch of one has no spread); "
                "pass at least 2 examples, or use eval mode"
            )


def prediction(
    outputs: Any, pick: OutputPick = None, error: ErrorType = BatchError
) -> torch.Tensor:
    """The prediction in a model's outputs, by the module's rule or by ``pick``.

    >>> prediction((torch.zeros(2), torch.ones(3))).shape
    torch.Size([2])
    >>> prediction({"loss": torch.tensor(1.0), "logits": torch.zeros(2, 4)}).shape
    torch.Size([2, 4])
    >>> prediction({"h": torch.zeros(5)}, pick="h").shape
    torch.Size([5])
    """
    if pick is not None:
        if callable(pick):
            chosen = pick(outputs)
        elif isinstance(pick, int) and not isinstance(pick, bool):
            try:
                chosen = outputs[pick]
            except (TypeError, IndexError, KeyError):
                raise error(
                    f"output={pick} takes position {pick} of the outputs, but the model returned "
                    f"{_describe(outputs)}"
                ) from None
        elif isinstance(pick, str):
            if isinstance(outputs, Mapping) and pick in outputs:
                chosen = outputs[pick]
            elif hasattr(outputs, pick):
                chosen = getattr(outputs, pick)
            else:
                raise error(
                    f"output={pick!r} names no key or attribute of the outputs, "
                    f"{_describe(outputs)}"
                )
        else:
            raise error(
                f"output= must be a key or attribute name, a position, or a function of the "
                f"outputs, got {type(pick).__name__}"
            )
        if not isinstance(chosen, torch.Tensor):
            raise error(f"output={pick!r} gave {type(chosen).__name__}, not a tensor")
        return chosen
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = (
        outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    )
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise error(
        f"cannot tell the prediction in the model's outputs, {_describe(outputs)}: the rule takes a "
        f"tensor, .logits / ['logits'], or the first item of a tuple; say which with output= (a "
        f"key or attribute name, a position, or a function of the outputs)"
    )


def _describe(outputs: Any) -> str:
    if isinstance(outputs, Mapping):
        return f"a {type(outputs).__name__} with keys {list(outputs)}"
    if isinstance(outputs, (tuple, list)):
        return f"a {type(outputs).__name__} of {len(outputs)} items"
    return f"a {type(outputs).__name__}"


def compute_loss(
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None,
    outputs: Any,
    targets: Targets,
    pick: OutputPick = None,
    error: ErrorType = BatchError,
) -> torch.Tensor:
    """``loss_fn(prediction(outputs), targets)``, or the model's own loss when ``loss_fn`` is None."""
    if loss_fn is None:
        own = (
            outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        )
        if not isinstance(own, torch.Tensor):
            raise error(
                f"loss_fn=None takes the model's own loss (outputs.loss), but the model returned "
                f"{_describe(outputs)} without one; pass a loss_fn, or the labels among the inputs "
                f"(Hugging Face models: {{'input_ids': ids, 'labels': ids}})"
            )
        return own
    predicted = prediction(outputs, pick, error)
    _check_class_targets(loss_fn, predicted, targets, error)
    try:
        return loss_fn(predicted, targets)
    except NormprobeError:
        raise
    except (RuntimeError, ValueError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        shape = None if targets is None else tuple(targets.shape)
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise _also(error, err)(
            f"loss_fn ({name}) raised {type(err).__name__} on the prediction (shape "
            f"{tuple(predicted.shape)}) and the targets (shape {shape}): {first}; check that "
            f"the targets fit the prediction and that the loss function runs on them"
        ) from err


def _check_class_targets(
    loss_fn: Callable[..., Any], predicted: torch.Tensor, targets: Targets, error: ErrorType
) -> None:
    """Class-index targets of a cross-entropy or NLL loss must lie in ``0..classes-1``."""
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or not targets.numel():
        return
    classes = predicted.shape[1] if predicted.dim() > 1 else predicted.shape[0]
    kept = targets[targets != loss_fn.ignore_index]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= classes):
        raise error(
            f"targets: class labels must lie in 0..{classes - 1} (the prediction has {classes} "
            f"classes), got labels from {int(kept.min())} to {int(kept.max())}"
        )


# --------------------------------------------------------------------------- the model's state


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without either)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (torch's default otherwise)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


_MISSING = object()


def check_measurable(
    model: nn.Module, modules: Iterable[nn.Module], error: type[Exception]
) -> None:
    """Refuse a model that normprobe could not measure without changing it or at all.

    ``modules``: the model's submodules (with or without the model itself).
    Two kinds are refused, by name:

    - TorchScript (``torch.jit.script``, ``torch.jit.trace``): the probes hook
      its layers and the Hessian differentiates it twice, and a scripted
      module takes neither; the eager module computes the same function.
    - Lazy modules (``nn.LazyLinear``, ``nn.LazyConv2d``, ...) whose
      parameters the first forward pass has not made yet: a probe's pass
      would make them, and change the model it must leave as found.
    """
    scripted, lazy = [], []
    for name, m in _named(model, modules):
        if isinstance(m, torch.jit.ScriptModule):
            scripted.append(name)
        elif lazy_unmade(m):
            lazy.append(name)
    if scripted:
        # the outermost scripted modules: the submodules of a scripted module are scripted too
        outer = [n for n in scripted if not any(n.startswith(f"{o}.") for o in scripted)]
        what = "the model is" if _WHOLE in scripted else f"module(s) {listed(outer, 5)} are"
        raise error(
            f"{what} TorchScript (torch.jit.script or torch.jit.trace); the probes hook the "
            f"layers and the Hessian differentiates twice, which a scripted module does not "
            f"allow: pass the nn.Module it was made from (the same weights: "
            f"module.load_state_dict(scripted.state_dict()))"
        )
    if lazy:
        raise error(
            f"lazy module(s) {listed(lazy, 5)} have no parameters yet: they take their shapes from "
            f"the first forward pass, which would change the model while normprobe measures "
            f"it; run one forward pass first (with torch.no_grad(): model(x))"
        )


_WHOLE = "the model"


def lazy_unmade(module: nn.Module) -> bool:
    """Whether ``module`` is a lazy module (``nn.LazyLinear``, ...) whose parameters or
    buffers its first forward pass has not made yet."""
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def _named(model: nn.Module, modules: Iterable[nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    """``modules`` with their names in ``model`` (looked up only when one is to be named)."""
    names: dict[int, str] | None = None
    for m in modules:
        if isinstance(m, (torch.jit.ScriptModule, LazyModuleMixin)):
            if names is None:
                names = {id(sub): name or _WHOLE for name, sub in model.named_modules()}
            yield names.get(id(m), type(m).__name__), m


@contextmanager
def attributes_kept(modules: nn.Module | list[nn.Module]) -> Iterator[None]:
    """Put back every attribute a forward pass rebinds on these modules, and remove those it adds.

    :func:`normprobe.state.preserved` covers parameters, buffers, grads and
    flags; this covers the rest: a tensor a module keeps as a plain
    attribute (RegNorm's ``penalty``, with its autograd graph), a cache a
    third-party layer fills on its first call, an "already warned" flag.
    """
    mods = list(modules.modules()) if isinstance(modules, nn.Module) else list(modules)
    saved = [(m, dict(vars(m))) for m in mods]
    try:
        yield
    finally:
        for m, before in saved:
            now = vars(m)
            # most modules come back untouched: the same keys in the same order, each bound
            # to the same object (checked in C, without the per-key loop below)
            if (
                len(now) == len(before)
                and all(map(operator.is_, now, before))
                and all(map(operator.is_, now.values(), before.values()))
            ):
                continue
            for key in [k for k in now if k not in before]:
                del now[key]
            for key, value in before.items():
                if now.get(key, _MISSING) is not value:
                    now[key] = value


#: the modules whose ``sparse=True`` makes the gradient of their weight a sparse tensor
SPARSE_GRADIENT_TYPES = (nn.Embedding, nn.EmbeddingBag)


def sparse_embeddings(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The embeddings among ``modules`` built with ``sparse=True``."""
    return [m for m in modules if isinstance(m, SPARSE_GRADIENT_TYPES) and m.sparse]


@contextmanager
def dense_gradients(sparse: list[nn.Module]) -> Iterator[None]:
    """The embeddings ``sparse`` (:func:`sparse_embeddings`) give dense gradients for the duration.

    ``sparse=True`` only changes how the backward pass stores the gradient
    of the weight (the rows a batch used, as a sparse tensor): the forward
    pass and the gradient's values are the same. Norms, cosines and second
    derivatives need the dense tensor, and torch has no double backward for
    the sparse one, so the probes and the Hessian differentiate the dense
    form; the flag is put back on exit.
    """
    for m in sparse:
        m.sparse = False
    try:
        yield
    finally:
        for m in sparse:
            m.sparse = True


#: classes of stochastic depth, which drops whole residual branches in training mode: timm's
#: ``DropPath`` and ``DropBlock2d``, torchvision's ``StochasticDepth``, Hugging Face's
#: ``ConvNextDropPath``, ``SwinDropPath``, ...; each is the identity in eval mode
_STOCHASTIC_DEPTH = re.compile(r"DropPath|DropBlock|StochasticDepth")
#: names of float rates a forward pass reads in training mode to drop units, branches or whole
#: layers (``attention_dropout``, Hugging Face's ``layerdrop``, ``drop_prob``, ``drop_path``,
#: timm's ``drop_rate``, GPT's ``resid_pdrop``)
_DROP_RATE = re.compile(r"dropout|layerdrop|drop_prob|drop_path|drop_rate|pdrop")


def _is_config(obj: Any) -> bool:
    """A Hugging Face model config, whose rates some forwards read at call time."""
    return type(obj).__name__.endswith("Config") and callable(getattr(obj, "to_dict", None))


@contextmanager
def dropout_off(model: nn.Module, modules: list[nn.Module] | None = None) -> Iterator[None]:
    """Every dropout of ``model`` switched off: units, attention, residual branches, layers.

    ``nn.Dropout`` modules go to eval mode with ``p = 0``; stochastic-depth
    modules (``DropPath``, ``StochasticDepth``, ``DropBlock``) go to eval mode,
    where they are the identity, and so does ``nn.RReLU``, whose negative slope is
    then the mean of its range instead of a random draw per unit; float attributes whose name says they are a
    drop rate (``attention_dropout``, ``layerdrop``, ``drop_prob``) are set to
    0, on the modules and on a Hugging Face ``config`` they hold: its attention
    passes such a rate to ``F.scaled_dot_product_attention`` whenever the
    module is in training mode, and its encoders read ``config.layerdrop`` to
    skip whole layers. Everything is put back on exit (flags by the caller's
    :func:`normprobe.state.preserved`). ``modules``: ``list(model.modules())``
    when the caller has it.
    """
    saved: list[tuple[Any, str, Any]] = []
    try:
        configs: dict[int, Any] = {}
        for m in model.modules() if modules is None else modules:
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
                saved.append((m, "p", m.p))
                m.p = 0.0
            elif isinstance(m, nn.RReLU) or _STOCHASTIC_DEPTH.search(type(m).__name__):
                m.eval()  # the identity, or RReLU's mean slope instead of a random one
            attributes = vars(m)
            for key in _rates(attributes):
                saved.append((m, key, attributes[key]))
                setattr(m, key, 0.0)
            config = attributes.get("config")
            if config is not None and _is_config(config):
                configs.setdefault(id(config), config)
        for config in configs.values():
            attributes = vars(config)
            for key in _rates(attributes):
                saved.append((config, key, attributes[key]))
                setattr(config, key, 0.0)
        yield
    finally:
        for m, key, value in reversed(saved):
            setattr(m, key, value)


def _rates(attributes: dict[str, Any]) -> list[str]:
    """The names of the non-zero float drop rates among ``attributes`` (a module's or a
    config's ``vars``); the type test first, as most attributes are not floats."""
    return [k for k, v in attributes.items() if isinstance(v, float) and v and _DROP_RATE.search(k)]


def generator_states(device: torch.device) -> list[bytes]:
    """The states of the global generators a pass on ``device`` may draw from (CPU, and that
    CUDA device's), as bytes: equal before and after a pass that drew no random numbers."""
    states = [torch.random.default_generator.get_state().numpy().tobytes()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device).numpy().tobytes())
    return states


@contextmanager
def forked_random_state(device: torch.device, seed: int) -> Iterator[None]:
    """The global generators (CPU, and ``device``'s when it is a CUDA device) seeded with
    ``seed`` for the block, and put back as they were on exit: whatever a pass draws inside
    is repeatable, and the caller's random stream is left alone."""
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        yield


def fingerprint(output: Any) -> torch.Tensor:
    """The float64 sum and sum of squares of every floating-point tensor in ``output`` (a
    tensor, or tuples, lists, dicts and Hugging Face outputs of them), in order: equal for two
    passes that computed the same numbers, different with near certainty otherwise."""
    sums: list[torch.Tensor] = []

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_complex():
                obj = torch.view_as_real(obj)
            if obj.is_floating_point():
                t = obj.detach().double()
                sums.append(torch.stack([t.sum(), t.square().sum()]).cpu())
        elif isinstance(obj, Mapping):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                visit(item)

    visit(output)
    return torch.cat(sums) if sums else torch.empty(0, dtype=torch.float64)


def draws_matter(
    run: Callable[[], Any], seen: torch.Tensor, device: torch.device, seed: int
) -> bool:
    """Whether a pass that drew random numbers computed something those numbers decide: ``run``
    (the same pass again, on the same inputs) is repeated with the generators seeded by
    ``seed``, without gradients, and its :func:`fingerprint` compared with ``seen``, the first
    pass's. A draw that decides nothing (Hugging Face's layer drop draws a number in every
    training-mode pass, and skips no layer at rate 0) does not matter; a pass that fails
    when repeated is taken to."""
    try:
        with forked_random_state(device, seed), torch.no_grad():
            again = fingerprint(run())
    except Exception:
        return True
    return not (
        again.shape == seen.shape and torch.allclose(again, seen, rtol=0, atol=0, equal_nan=True)
    )


#: model -> the warnings said of it once (:func:`first_said`)
_SAID: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def first_said(model: nn.Module, key: str) -> bool:
    """True the first time it is asked of ``model`` and ``key``, False after: for a warning
    said once per model. A training loop measures the same model at every step, and Python's
    own once-per-line rule is undone whenever some library changes the warning filters."""
    said = _SAID.setdefault(model, set())
    if key in said:
        return False
    said.add(key)
    return True


def warn_of_random_draws(model: nn.Module, what: str, result: str, remedy: str) -> None:
    """Say, once per model and ``what``, that its forward pass depends on random numbers with
    every dropout module off (:func:`draws_matter`): something :func:`dropout_off` cannot
    reach (a functional dropout at a fixed rate, a noise layer, sampling) made ``what``
    measure ``result``; ``remedy`` says what measures without it (once: :func:`first_said`)."""
    if not first_said(model, f"random draws: {what}"):
        return
    warnings.warn(
        f"the model's forward pass depends on random numbers from torch's generator with "
        f"every dropout module and drop rate off (a functional dropout at a fixed rate such "
        f"as F.dropout(h, 0.1, self.training), a noise layer, sampling?): {what} {result}; "
        f"{remedy}",
        stacklevel=user_stacklevel(),
    )
