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

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["preserved", "frozen_statistics", "ModelSnapshot", "snapshot", "restore"]


@dataclass
class ModelSnapshot:
    """What a probe may change in a model, recorded so it can be put back."""

    training: list[tuple[nn.Module, bool]]
    requires_grad: list[tuple[nn.Parameter, bool]]
    grads: list[tuple[nn.Parameter, torch.Tensor | None, torch.Tensor | None]]
    buffers: list[tuple[nn.Module, str, torch.Tensor | None, torch.Tensor | None]]
    versions: list[tuple[str, nn.Parameter, int]]


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
    return ModelSnapshot(
        training=training,
        requires_grad=[(p, p.requires_grad) for _, p in params],
        grads=[(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for _, p in params],
        buffers=buffers,
        versions=[(name, p, p._version) for name, p in params],
    )


def restore(snap: ModelSnapshot) -> None:
    """Put back what :func:`snapshot` recorded; the same tensor objects are kept where possible."""
    for module, flag in snap.training:
        if module.training is not flag:
            module.training = flag
    for p, flag in snap.requires_grad:
        if p.requires_grad is not flag:
            p.requires_grad_(flag)
    with torch.no_grad():
        for p, grad, saved in snap.grads:
            if grad is None:
                p.grad = None
            else:
                grad.copy_(saved)
                p.grad = grad
        for module, name, buf, saved in snap.buffers:
            if buf is None:
                module._buffers[name] = None
            else:
                buf.copy_(saved)
                module._buffers[name] = buf
    changed = [name for name, p, version in snap.versions if p._version != version]
    if changed:
        raise RuntimeError(
            f"parameters {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''} were "
            f"modified in place while the model's state was preserved; this is a bug in the code "
            f"that ran inside normprobe.state.preserved()"
        )


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
        (m, m.track_running_stats)
        for m in (model.modules() if modules is None else modules)
        if isinstance(getattr(m, "track_running_stats", None), bool)
    ]
    try:
        for m, _ in flagged:
            m.track_running_stats = False
        yield model
    finally:
        for m, flag in flagged:
            m.track_running_stats = flag
