"""A PyTorch Lightning ``Callback`` that records the probes and the Hessian with a Monitor.

The trainer's ``global_step`` (optimizer updates so far) is the monitor's
step: the model is measured at step 0 when training starts and after each
update the schedule names; the training loss the ``training_step`` returns
is logged as ``batch_loss``, once per update, at the step the update starts
from (with ``accumulate_grad_batches``: the mean of the losses of the batches
the update accumulates), and the values Lightning logs (``self.log``:
e.g. ``val_acc``) are recorded at each measured step. Needs
``pip install "normprobe[lightning]"`` (``pytorch-lightning``); with the
``lightning`` distribution installed, the callback subclasses
``lightning.pytorch.Callback`` instead (:func:`lightning_package` says which,
and how to choose when both are installed).

>>> import torch, torch.nn.functional as F
>>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
>>> callback = NormprobeCallback((x, y), loss_fn=F.cross_entropy, schedule=10, hessian=False)
>>> callback.monitor is None  # built when training starts, on the LightningModule
True
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from normprobe.monitor import Monitor, logged_name
from normprobe.results import Results

__all__ = ["NormprobeCallback", "LIGHTNING", "lightning_package"]

#: the packages that provide Lightning's ``Callback``, in the order they are tried
PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def lightning_package(choice: str | None = None) -> ModuleType:
    """The Lightning package the callback subclasses: ``lightning.pytorch`` (the ``lightning``
    distribution) if it imports, else ``pytorch_lightning`` (the ``pytorch-lightning`` one).

    A ``Trainer`` accepts only callbacks of its own package, so with both installed, set
    ``NORMPROBE_LIGHTNING=pytorch_lightning`` (or pass ``choice``) to follow a training
    script that imports ``pytorch_lightning``.

    >>> lightning_package("pytorch_lightning").__name__
    'pytorch_lightning'
    """
    choice = choice or os.environ.get("NORMPROBE_LIGHTNING") or None
    if choice is not None and choice not in PACKAGES:
        raise ImportError(f"NORMPROBE_LIGHTNING={choice!r}: expected one of {', '.join(PACKAGES)}")
    tried = []
    for name in [choice] if choice else PACKAGES:
        try:
            return importlib.import_module(name)
        except ImportError as err:
            tried.append(f"{name} ({err})")
    raise ImportError(
        f'the Lightning callback needs PyTorch Lightning: pip install "normprobe[lightning]" '
        f"(or the lightning package); tried {'; '.join(tried)}"
    )


pl = lightning_package()
#: the name of the package the callback subclasses: "lightning.pytorch" or "pytorch_lightning"
LIGHTNING: str = pl.__name__


class NormprobeCallback(pl.Callback):
    """Drive a :class:`~normprobe.Monitor` from a Lightning ``Trainer``.

    ``probe_data`` and every keyword are the :class:`~normprobe.Monitor`'s
    (``schedule=50``, ``hessian={...}``, ``out="runs/mine"``, ...);
    ``loss_fn``: the loss of the gradient probes and the Hessian (default:
    mean cross-entropy). The monitor is built on the ``LightningModule``
    when training starts (``callback.monitor``); ``callback.results`` are its
    results once training has ended.

    Example:
        >>> import torch
        >>> callback = NormprobeCallback((torch.randn(8, 2), torch.zeros(8, dtype=torch.long)),
        ...                              schedule=[0], hessian=False, normalizer="layer")
        >>> callback.options["normalizer"]
        'layer'
    """

    def __init__(
        self,
        probe_data: Any,
        *,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.probe_data = probe_data
        self.loss_fn = loss_fn
        self.options = options
        self.monitor: Monitor | None = None
        self.results: Results | None = None
        self._stepped: int | None = None
        self._losses: list[float] = []  # the losses of the batches of the coming update
        self._update_from = 0  # the step the coming update starts from

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        options = dict(self.options)
        if "lr" not in options and "optimizer" not in options and trainer.optimizers:
            options["optimizer"] = trainer.optimizers[0]
        if "total_steps" not in options and math.isfinite(trainer.estimated_stepping_batches):
            options["total_steps"] = int(trainer.estimated_stepping_batches)
        self.monitor = Monitor(pl_module, self.loss_fn, self.probe_data, **options)
        self._losses, self._update_from = [], trainer.global_step
        self._measure(trainer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        assert self.monitor is not None
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            value = loss.detach().item()
            if pl_module.automatic_optimization:
                # Lightning divides the loss it passes on by accumulate_grad_batches
                value *= trainer.accumulate_grad_batches
            self._losses.append(value)
        if trainer.global_step != self._update_from:  # this batch ended an update
            if self._losses:
                # the mean loss of the batches the update was computed on (accumulated batches
                # share one update), at the step it started from
                mean = sum(self._losses) / len(self._losses)
                self.monitor.log(self._update_from, batch_loss=mean)
            self._losses, self._update_from = [], trainer.global_step
        self._measure(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.monitor is not None
        self._measure(trainer)
        self.results = self.monitor.close()

    def _measure(self, trainer: pl.Trainer) -> None:
        """Measure at the trainer's step, once per step (accumulating batches share one)."""
        assert self.monitor is not None
        step = trainer.global_step
        if step == self._stepped:
            return
        self._stepped = step
        if self.monitor.due(step):
            logged = {
                logged_name(k): float(v)
                for k, v in trainer.callback_metrics.items()
                if isinstance(v, (torch.Tensor, float, int)) and torch.as_tensor(v).numel() == 1
            }
            if logged:
                self.monitor.log(step, **logged)
        self.monitor.step(step)
