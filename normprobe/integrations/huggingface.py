"""A Hugging Face ``transformers`` ``TrainerCallback`` that records the probes and the Hessian.

The ``Trainer``'s ``state.global_step`` (optimizer updates so far) is the
monitor's step: the model is measured at step 0 when training begins and at
the end of each step the schedule names; the numbers the ``Trainer`` logs
(``loss``, ``eval_loss``, ``eval_accuracy``, ``learning_rate``, ...) are
recorded under their names at the step they are logged (``trainer_grad_norm``
for its gradient norm, which is not the probe's per-layer ``grad_norm``). Needs
``pip install "normprobe[huggingface]"``.

>>> import torch
>>> callback = NormprobeCallback(({"input_ids": torch.zeros(8, 5, dtype=torch.long)},
...                               torch.zeros(8, 5, dtype=torch.long)), schedule=50)
>>> callback.monitor is None  # built when training begins, on the Trainer's model
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import transformers

from normprobe.monitor import Monitor, logged_name
from normprobe.results import Results

__all__ = ["NormprobeCallback"]


class NormprobeCallback(transformers.TrainerCallback):
    """Drive a :class:`~normprobe.Monitor` from a Hugging Face ``Trainer``.

    ``probe_data`` and every keyword are the :class:`~normprobe.Monitor`'s;
    ``loss_fn``: the loss of the gradient probes and the Hessian, on the
    prediction the batch contract reads (``logits``) and the targets
    (default: mean cross-entropy; a language model sets
    ``model.classes_last = True``, see the batch contract). The monitor is
    built on the ``Trainer``'s model when training begins
    (``callback.monitor``); ``callback.results`` are its results once
    training has ended.

    Example:
        >>> import torch
        >>> callback = NormprobeCallback((torch.randn(8, 2), torch.zeros(8, dtype=torch.long)),
        ...                              schedule=[0], hessian=False, out=None)
        >>> sorted(callback.options)
        ['hessian', 'out', 'schedule']
    """

    def __init__(
        self,
        probe_data: Any,
        *,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
        **options: Any,
    ) -> None:
        self.probe_data = probe_data
        self.loss_fn = loss_fn
        self.options = options
        self.monitor: Monitor | None = None
        self.results: Results | None = None

    def on_train_begin(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("the Trainer passed no model to NormprobeCallback.on_train_begin")
        options = dict(self.options)
        options.setdefault("lr", args.learning_rate)
        options.setdefault("seed", args.seed)
        if state.max_steps and state.max_steps > 0:
            options.setdefault("total_steps", int(state.max_steps))
        self.monitor = Monitor(model, self.loss_fn, self.probe_data, **options)
        self.monitor.step(state.global_step)

    def on_step_end(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        **kwargs: Any,
    ) -> None:
        assert self.monitor is not None
        self.monitor.step(state.global_step)

    def on_log(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.monitor is None or not logs:
            return
        numbers = {
            logged_name(k): float(v)
            for k, v in logs.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        if numbers:
            self.monitor.log(state.global_step, **numbers)

    def on_train_end(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        **kwargs: Any,
    ) -> None:
        assert self.monitor is not None
        self.results = self.monitor.close()
