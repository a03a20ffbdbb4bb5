"""Leave a model exactly as it was found.

Probes and the Hessian engine run forward and backward passes through a
user's model. :func:`preserved` records everything such a pass can change
(buffers such as running statistics and step counters, ``.grad`` including
whether it is ``None``, ``training`` flags, ``requires_grad``) and puts it back
on exit, also when an exception is raised. Parameters are not copied: nothing
in normprobe writes to them, and :func:`preserved` raises if something did
(their version counters moved), rather than silently hiding it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from normprobe.batch import attributes_kept
from normprobe.errors import NormprobeError, listed, user_stacklevel

__all__ = [
    "ParametersWrittenError",
    "preserved",
    "held",
    "held_snapshot",
    "restore_moved_buffers",
    "frozen_statistics",
    "warn_of_frozen_statistics",
    "ModelSnapshot",
    "snapshot",
    "snapshot_since",
    "restore",
]


class ParametersWrittenError(NormprobeError, RuntimeError):
    """The model's parameters changed in place while normprobe held its state: its forward
    pass writes to them, which normprobe cannot undo (it keeps no copy of the parameters)."""


@dataclass
class ModelSnapshot:
    """What a probe may change in a model, recorded so it can be put back."""

    training: list[tuple[nn.Module, bool]]
    requires_grad: list[tuple[nn.Parameter, bool]]
    grads: list[tuple[nn.Parameter, torch.Tensor | None, torch.Tensor | None]]
    buffers: list[tuple[nn.Module, str, torch.Tensor | None, torch.Tensor | None]]
    versions: list[tuple[str, nn.Parameter, int]]
    #: the version counter of each recorded grad (None for a missing grad) and buffer, in order
    grad_versions: list[int | None] = field(default_factory=list)
    buffer_versions: list[int | None] = field(default_factory=list)


def snapshot(model: nn.Module) -> ModelSnapshot:
    """Record the mutable state of ``model`` (buffers and gradients are copied).

    One walk over the modules (``named_modules``, as ``named_parameters``
    walks them), so a probe's call pays for the model's size once.
    """
    training = []
    buffers = []
    params: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        training.append((module, module.training))
        for name, p in module._parameters.items():
            if p is None or id(p) in seen:  # named_parameters(remove_duplicate=True)'s rule
                continue
            seen.add(id(p))
            params.append((f"{prefix}.{name}" if prefix else name, p))
        for name, buf in module._buffers.items():
            buffers.append((module, name, buf, None if buf is None else buf.detach().clone()))
    grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for _, p in params]
    return _assembled(training, params, grads, buffers)


def _assembled(
    training: list[tuple[nn.Module, bool]],
    params: list[tuple[str, nn.Parameter]],
    grads: list[tuple[nn.Parameter, torch.Tensor | None, torch.Tensor | None]],
    buffers: list[tuple[nn.Module, str, torch.Tensor | None, torch.Tensor | None]],
) -> ModelSnapshot:
    """A snapshot of these flags, grads and buffers, with the parameters' flags and every
    version counter read now."""
    return ModelSnapshot(
        training=training,
        requires_grad=[(p, p.requires_grad) for _, p in params],
        grads=grads,
        buffers=buffers,
        versions=[(name, p, p._version) for name, p in params],
        grad_versions=[None if g is None else g._version for _, g, _ in grads],
        buffer_versions=[None if b is None else b._version for _, _, b, _ in buffers],
    )


def restore(snap: ModelSnapshot, *, changed_only: bool = False) -> None:
    """Put back what :func:`snapshot` recorded; the same tensor objects are kept where possible.

    ``changed_only``: copy back only the grads and buffers that were rebound or
    modified in place since the snapshot (their version counters moved); the
    others still hold the recorded values. (A write through ``.data`` escapes
    version counters: :func:`held` uses this between the blocks it covers, and
    checks everything when it ends.)

    A grad or buffer that holds its recorded values is not written to, so its
    version counter does not move: a graph the caller built before the
    snapshot (a loss whose ``backward`` has not run yet, which saved a buffer
    it multiplied by) can still be differentiated afterwards.
    """
    for module, flag in snap.training:
        if module.training is not flag:
            module.training = flag
    for p, flag in snap.requires_grad:
        if p.requires_grad is not flag:
            p.requires_grad_(flag)
    with torch.no_grad():
        grads = [
            (i, p, grad, saved)
            for i, (p, grad, saved) in enumerate(snap.grads)
            if grad is not None
            and not (changed_only and p.grad is grad and grad._version == snap.grad_versions[i])
        ]
        buffers = [
            (i, module, name, buf, saved)
            for i, (module, name, buf, saved) in enumerate(snap.buffers)
            if buf is not None and (not changed_only or _moved(snap, i))
        ]
        kept = _holding(
            [(grad, saved) for _, _, grad, saved in grads]
            + [(buf, saved) for _, _, _, buf, saved in buffers]
        )
        for (_, p, grad, saved), same in zip(grads, kept):
            if not same:
                grad.copy_(saved)
            if p.grad is not grad:
                p.grad = grad
        for (_, module, name, buf, saved), same in zip(buffers, kept[len(grads) :]):
            if not same:
                buf.copy_(saved)
            module._buffers[name] = buf
        for p, grad, _ in snap.grads:
            if grad is None and p.grad is not None:
                p.grad = None
        for module, name, buf, _ in snap.buffers:
            if buf is None:
                module._buffers[name] = None
    changed = [name for name, p, version in snap.versions if p._version != version]
    if changed:
        raise ParametersWrittenError(
            f"parameters {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''} were "
            f"modified in place during normprobe's passes (their version counters moved): "
            f"normprobe never writes to parameters, so the model's forward pass does (a weight "
            f"constraint such as renorm_ or clamp_ under torch.no_grad(), say); that leaves "
            f"them changed and measures other weights than the model had. Apply such a "
            f"constraint after the optimizer step rather than in forward, or as a "
            f"parametrization (torch.nn.utils.parametrize)"
        )


def _holding(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[bool]:
    """Whether each ``(tensor, recorded copy)`` pair holds the same values (same shape and
    dtype, every entry equal; a NaN never equals, so such a tensor is written back).

    CPU tensors are compared one by one (``torch.equal``, no temporaries); those on another
    device together, with one synchronization per device rather than one per tensor.
    """
    same = [False] * len(pairs)
    elsewhere: dict[torch.device, list[int]] = {}
    for i, (now, saved) in enumerate(pairs):
        if (
            now.shape != saved.shape
            or now.dtype != saved.dtype
            or now.is_sparse
            or now.device.type == "meta"
        ):
            continue
        if now.device.type == "cpu":
            same[i] = torch.equal(now, saved)
        else:
            elsewhere.setdefault(now.device, []).append(i)
    for indices in elsewhere.values():
        differ = torch.stack([(pairs[i][0] != pairs[i][1]).any() for i in indices]).tolist()
        for i, d in zip(indices, differ):
            same[i] = not d
    return same


@contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block and restore the model's buffers, grads, flags and ``requires_grad``.

    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> with preserved(bn):
    ...     _ = bn(torch.randn(8, 3) + 5)
    >>> bool((bn.running_mean == 0).all()), int(bn.num_batches_tracked)
    (True, 0)
    """
    snap = snapshot(model)
    try:
        yield model
    finally:
        restore(snap)


#: id(model) -> [model, the snapshot taken by :func:`held`, blocks inside it now]
_HELD: dict[int, list] = {}


@contextmanager
def held(model: nn.Module) -> Iterator[nn.Module]:
    """One snapshot of the model around several blocks that each leave it as found.

    A driver that runs several probes on the model in a row (one
    measurement step) records the model's state once here instead of once per
    probe: a probe entered inside (:func:`held_snapshot`) restores only the
    flags, ``requires_grad`` and whatever grads and buffers moved, from this
    snapshot, and plain attributes are put back once, on exit, with
    everything else. Nested calls on the same model are one block.

    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> with held(bn):
    ...     _ = bn(torch.randn(8, 3) + 5)
    >>> int(bn.num_batches_tracked)
    0
    """
    entry = _HELD.get(id(model))
    if entry is not None and entry[0] is model:
        yield model
        return
    snap = snapshot(model)
    _HELD[id(model)] = [model, snap, 0]
    try:
        with attributes_kept(model):
            yield model
    finally:
        del _HELD[id(model)]
        restore(snap)


@contextmanager
def held_snapshot(
    model: nn.Module, modules: list[nn.Module] | None = None
) -> Iterator[ModelSnapshot | None]:
    """Inside :func:`held`: put the model back on exit as the block found it, from the held
    snapshot, and yield the snapshot it puts back; outside, do nothing and yield None (the
    caller preserves the model itself).

    A block directly inside :func:`held` restores what moved (version counters) from the
    held snapshot. A block inside another such block (a probe run within another probe's
    session) may find grads and buffers that the outer block changed: it copies those
    (:func:`snapshot_since`), reuses the held copies of the rest, restores what moved on
    exit, and puts back the plain attributes of ``modules`` (default: the model's) as
    :func:`preserved` and :func:`~normprobe.batch.attributes_kept` would, without copying
    the whole state again.
    """
    entry = _HELD.get(id(model))
    if entry is None or entry[0] is not model:
        yield None
        return
    nested = entry[2] > 0
    snap = snapshot_since(entry[1]) if nested else entry[1]
    entry[2] += 1
    try:
        if nested:
            with attributes_kept(model if modules is None else modules):
                yield snap
        else:
            yield snap
    finally:
        entry[2] -= 1
        restore(snap, changed_only=True)


def restore_moved_buffers(snap: ModelSnapshot) -> None:
    """Put back the buffers that a pass moved (rebound, or their version counter moved) since
    ``snap``: before each pass of a probe, so that every pass sees the buffers the probe found.

    A forward pass that updates a buffer in train mode although the probe froze the running
    statistics (spectral norm's power iteration on ``weight_u``, an EMA codebook, a call
    counter) would otherwise give a probe's second pass another network than its first.
    """
    moved = [i for i, entry in enumerate(snap.buffers) if entry[2] is not None and _moved(snap, i)]
    if not moved:
        return
    with torch.no_grad():
        kept = _holding([(snap.buffers[i][2], snap.buffers[i][3]) for i in moved])
        for i, same in zip(moved, kept):
            module, name, buf, saved = snap.buffers[i]
            if not same:
                buf.copy_(saved)
            module._buffers[name] = buf
            snap.buffer_versions[i] = buf._version  # holds the recorded values again


def _moved(snap: ModelSnapshot, i: int) -> bool:
    """Whether buffer ``i`` of ``snap`` was rebound or written in place since (its version)."""
    module, name, buf, _ = snap.buffers[i]
    return module._buffers.get(name) is not buf or buf._version != snap.buffer_versions[i]


def snapshot_since(earlier: ModelSnapshot) -> ModelSnapshot:
    """The model's state now, as :func:`snapshot` records it, over the modules, parameters
    and buffers that ``earlier`` covers: a grad or buffer that is still the tensor
    ``earlier`` recorded, at the same version, shares its copy; any other is copied now."""
    grads = [
        (p, p.grad, _copy_unless_recorded(p.grad, grad, version, saved))
        for (p, grad, saved), version in zip(earlier.grads, earlier.grad_versions)
    ]
    buffers = [
        (module, name, module._buffers[name],
         _copy_unless_recorded(module._buffers[name], buf, version, saved))
        for (module, name, buf, saved), version in zip(earlier.buffers, earlier.buffer_versions)
        if name in module._buffers  # one removed since is not there for snapshot() to see
    ]  # fmt: skip
    training = [(m, m.training) for m, _ in earlier.training]
    return _assembled(training, [(n, p) for n, p, _ in earlier.versions], grads, buffers)


def _copy_unless_recorded(
    now: torch.Tensor | None, recorded: torch.Tensor | None, version: int | None, saved: Any
) -> torch.Tensor | None:
    """A copy of ``now``: ``saved`` where ``now`` is still the ``recorded`` tensor at the
    recorded ``version``, a fresh one otherwise."""
    if now is None:
        return None
    return saved if now is recorded and now._version == version else now.detach().clone()


def _running_stats_flag(module: nn.Module) -> Any:
    """``module.track_running_stats``, or None where it has none: read from the instance's
    attributes, or through ``getattr`` where its class defines the name (a property), without
    the AttributeError that ``nn.Module.__getattr__`` raises for every other module."""
    found = vars(module).get("track_running_stats", _NONE)
    if found is not _NONE:
        return found
    if hasattr(type(module), "track_running_stats"):
        return getattr(module, "track_running_stats", None)
    return None  # (a parameter, buffer or submodule of that name would not be a bool)


_NONE = object()


def _set_running_stats_flag(module: nn.Module, flag: bool) -> None:
    """``module.track_running_stats = flag``; an instance attribute is written in place, as
    ``nn.Module.__setattr__`` would for a bool, without its checks (a property is set)."""
    attributes = vars(module)
    if "track_running_stats" in attributes:
        attributes["track_running_stats"] = flag
    else:
        module.track_running_stats = flag


def warn_of_frozen_statistics(model: nn.Module, option: str) -> None:
    """Warn when ``model`` is in train mode but holds normalization layers with running
    statistics in eval mode (batch norm frozen for fine-tuning): ``option`` (``mode='train'``,
    ``norm_mode='train'``) runs every module in train mode, so those layers normalize with
    the batch's statistics, not the running ones the model trains with."""
    if not model.training:
        return
    held = [
        name or "the model"
        for name, m in model.named_modules()
        if not m.training and _running_stats_flag(m) is True
    ]
    if held:
        warnings.warn(
            f"{option} runs every module in train mode, and the model (in train mode) holds "
            f"{listed(held, 5)} in eval mode (batch norm frozen?): those layers will "
            f"normalize with the batch's statistics, not the running ones the model trains "
            f"with; where every such layer is frozen, {option.split('=')[0]}='eval' measures "
            f"them as they train",
            stacklevel=user_stacklevel(),
        )


@contextmanager
def frozen_statistics(
    model: nn.Module, modules: list[nn.Module] | None = None
) -> Iterator[nn.Module]:
    """Use batch statistics in train mode without updating running statistics or counters.

    Sets ``track_running_stats = False`` on every module that has that flag
    (torch's BatchNorm/InstanceNorm and normprobe's normalizers), restoring it
    on exit (``modules``: ``list(model.modules())`` when the caller has it). torch gives the flag
    exactly this meaning for a module that has
    running buffers: train mode normalizes with the batch's statistics and
    leaves the buffers alone.

    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> with frozen_statistics(bn):
    ...     _ = bn(torch.randn(8, 3) + 5)
    >>> int(bn.num_batches_tracked), bn.track_running_stats
    (0, True)
    """
    flagged = [
        (m, flag)
        for m in (model.modules() if modules is None else modules)
        if isinstance(flag := _running_stats_flag(m), bool)
    ]
    try:
        for m, _ in flagged:
            _set_running_stats_flag(m, False)
        yield model
    finally:
        for m, flag in flagged:
            _set_running_stats_flag(m, flag)
